"""The one recovery loop: what it trains of a compressed table, straight-through training of a table kept in a
storage (it stays in its storage, its bytes do not change), and warm-up + cosine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embcompress import core
from embcompress.checkpoint import load_checkpoint
from embcompress.classifier import load_classifier
from embcompress.ops.compress import compress
from embcompress.recover.loop import recoverable_parameters, stored_tables
from embcompress.train.loop import TrainConfig
from embcompress.train.run import finetune_classifier
from embcompress.train.schedules import WarmupCosine, make_schedule
from tests.builders import write_classifier


def _entry(path: Path) -> dict:
    with load_checkpoint(path) as ckpt:
        return ckpt.embcompress_meta["tables"]["embedding.weight"]


def test_svd_int8_table_fine_tuned_stays_int8_and_within_its_bytes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    clf = write_classifier(tmp_path / "dan.safetensors", words=120, embed_dim=16)
    small = compress(clf, "svd+int8", budget=0.2, output=tmp_path / "dan.svd-int8.safetensors").output
    before = load_classifier(small).model.embedding
    assert stored_tables(load_classifier(small).model) == ["embedding"]
    texts = [json.dumps({"text": " ".join(f"w{(7 * i + j) % 120}" for j in range(6)), "label": "abc"[i % 3]})
             for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(texts) + "\n")
    ft = finetune_classifier(small, tmp_path / "train.jsonl", None, tmp_path / "ft.safetensors",
                             config=TrainConfig(epochs=2, batch_size=16, lr=5e-2, device="cpu"))
    table = load_classifier(ft.output).model.embedding
    trained = {n: t.detach().clone() for n, t in table.named_parameters()}
    assert any(not torch.equal(trained[n], t) for n, t in before.named_parameters())  # the factors did move
    core.store_(table, table.storage, table.storage_config)  # re-quantizing what was saved changes nothing
    assert all(torch.equal(trained[n], t) for n, t in table.named_parameters())
    assert _entry(Path(ft.output))["bytes"] == _entry(Path(small))["bytes"]
    assert _entry(Path(ft.output))["storage"] == "int8"


def test_recoverable_parameters_follow_the_table() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 2))
    core.compress_(model, core.make_spec("int8"))  # a dense table kept in int8: nothing of it trains
    assert [p.shape for p in recoverable_parameters(model)] == [torch.Size([2, 8]), torch.Size([2])]
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 2))
    core.compress_(model, core.make_spec("svd", {"rank": 3}))
    table = core.tables_of(model)["0"]
    assert {id(p) for p in table.recoverable()} <= {id(p) for p in recoverable_parameters(model)}


def test_warmup_cosine() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule("warmup-cosine", opt, steps_per_epoch=10, total_steps=40, warmup=0.1)
    assert isinstance(sched, WarmupCosine) and sched.warmup_steps == 4
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(rates[3:], rates[4:])) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert rates[4 + 18] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(19 / 36 * torch.pi)).item()))
