"""Fixtures: tiny checkpoints of every kind embcompress reads, built in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.builders import bert_state, dan_state, low_rank_table, write_hf_folder, write_sentiment_jsonl


@pytest.fixture(autouse=True)
def _workspace_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's workspace record (and relative outputs) inside its own temporary folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMBCOMPRESS_WORKSPACE", raising=False)
    monkeypatch.delenv("EMBCOMPRESS_DEBUG", raising=False)


@pytest.fixture
def classifier(tmp_path: Path) -> tuple[Path, Path]:
    """A DAN classifier trained one epoch on 120 sentiment lines, and those lines (train.jsonl)."""
    from embcompress.train.loop import TrainConfig
    from embcompress.train.run import train_classifier

    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    model = train_classifier(train, None, tmp_path / "m.safetensors", embed_dim=16,
                             config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output
    return Path(model), train


@pytest.fixture
def dan_file(tmp_path: Path) -> Path:
    path = tmp_path / "dan.safetensors"
    save_file(dan_state(), str(path), metadata={"format": "pt"})
    return path


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    return write_hf_folder(tmp_path / "bert", bert_state())


@pytest.fixture
def sharded_folder(tmp_path: Path) -> Path:
    state = bert_state()
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


@pytest.fixture
def tied_pt(tmp_path: Path) -> Path:
    """A GPT-2-like torch state dict whose lm_head shares storage with wte."""
    wte = low_rank_table(800, 24, 10, seed=5)
    state = {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": torch.randn(40, 24),
        "transformer.ln_f.weight": torch.ones(24),
        "lm_head.weight": wte,
    }
    path = tmp_path / "gpt.pt"
    torch.save(state, path)
    return path


@pytest.fixture
def tied_safetensors(tmp_path: Path) -> Path:
    """A file whose output layer holds an identical copy of the table (a tie saved as two tensors)."""
    wte = low_rank_table(800, 24, 10, seed=6)
    path = tmp_path / "tied.safetensors"
    save_file({"tok_embeddings.weight": wte, "output.weight": wte.clone(), "norm.weight": torch.ones(24)}, str(path))
    return path
