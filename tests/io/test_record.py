"""The one record: files written by 0.1.0.dev0 (version 1) load, and saving them writes format 2 (the registry's
entry with 0.1's fields kept), the model's outputs unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embcompress import core
from embcompress.checkpoint import META_KEY, load_checkpoint
from embcompress.classifier import load_classifier, save_classifier
from embcompress.data import collate, read_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1_0_dev0"
LEGACY_FIELDS = ("rank", "rank_rule", "reduction_requested", "reduction_achieved", "method", "rel_error",
                 "energy_kept", "factors", "tied")


def _logits(path: Path) -> torch.Tensor:
    clf = load_classifier(path)
    batch = collate([clf.encode(read_jsonl(FIXTURES / "data.jsonl"))[i] for i in range(16)])
    with torch.no_grad():
        return clf.model.eval()(batch.ids, batch.lengths)


@pytest.mark.parametrize(("name", "structure"), [("lstm.r50", "svd"), ("lstm.gr50", "groupreduce")])
def test_legacy_classifier_saved_again_is_format_2(tmp_path: Path, name: str, structure: str) -> None:
    src = FIXTURES / f"{name}.safetensors"
    with load_checkpoint(src) as ckpt:
        old = next(iter(ckpt.embcompress_meta["tables"].values()))
    out = tmp_path / "again.safetensors"
    save_classifier(load_classifier(src), out, op="finetune", options={"epochs": 0})
    with load_checkpoint(out) as ckpt:
        record = ckpt.embcompress_meta
        names = set(ckpt.names)
    (table, entry), = record["tables"].items()
    assert record["format_version"] == 2 and core.is_v2_entry(entry) and entry["structure"] == structure
    assert {k: entry[k] for k in LEGACY_FIELDS} == {k: old[k] for k in LEGACY_FIELDS}
    assert set(entry["factors"]) <= names and entry["trained"] is True
    assert (entry.get("blocks") or {}).get("ranks") == (old.get("blocks") or {}).get("ranks")
    assert [h["op"] for h in record["history"]] == ["finetune"]
    torch.testing.assert_close(_logits(out), _logits(src), rtol=0, atol=0)


def test_legacy_hf_folder_saved_again_is_format_2(tmp_path: Path) -> None:
    hf = pytest.importorskip("embcompress.hf")
    pytest.importorskip("transformers")
    src = FIXTURES / "bert-r50"
    with load_checkpoint(src) as ckpt:
        old = next(iter(ckpt.embcompress_meta["tables"].values()))
    model = hf.load(src)
    out = hf.save(model, tmp_path / "again", like=src, extra_meta={"finetuned": {"epochs": 1, "history": []}})
    with load_checkpoint(out) as ckpt:
        record = json.loads(ckpt.metadata[META_KEY])
    (_, entry), = record["tables"].items()
    assert record["format_version"] == 2 and entry["structure"] == "svd" and entry["trained"] is True
    assert {k: entry[k] for k in LEGACY_FIELDS} == {k: old[k] for k in LEGACY_FIELDS}
    assert record["history"] == [{"op": "finetune", "tool": record["tool"], "options": {"epochs": 1}}]
    texts = ["the film is good", "a very bad movie"]
    tok = hf.load_tokenizer(src)
    torch.testing.assert_close(hf.embed(hf.load(out), tok, texts), hf.embed(model, tok, texts))


def test_quantized_legacy_folder_loads_and_saves_float(tmp_path: Path) -> None:
    hf = pytest.importorskip("embcompress.hf")
    pytest.importorskip("transformers")
    src = FIXTURES / "bert-r50-int8"
    model = hf.load(src)
    out = hf.save(model, tmp_path / "float", like=src)
    with load_checkpoint(out) as ckpt:
        record = ckpt.embcompress_meta
        assert "embcompress.quant" not in ckpt.metadata and ckpt.infos[next(iter(record["tables"]))
                                                                     + "_a"].dtype == "F32"
    assert "tensors" not in record and record["tables"]
