"""Files written by embcompress 0.1.0.dev0 (tests/fixtures/v0_1_0_dev0, made by its make_fixtures.py with that
version's code) load with today's code and give the outputs recorded when they were written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embcompress.classifier import load_classifier
from embcompress.data import collate, read_jsonl
from embcompress.train.run import evaluate_classifier

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1_0_dev0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CLASSIFIERS = ["lstm", "lstm.r50", "lstm.r50.int8", "lstm.fp16", "lstm.gr50", "lstm.trim"]
FOLDERS = ["bert", "bert-r50", "bert-r50-int8"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_legacy_classifier_gives_the_recorded_outputs(name: str) -> None:
    path, data = FIXTURES / f"{name}.safetensors", FIXTURES / "data.jsonl"
    clf = load_classifier(path)
    batch = collate([clf.encode(read_jsonl(data))[i] for i in range(16)])
    with torch.no_grad():
        logits = clf.model.eval()(batch.ids, batch.lengths)
    torch.testing.assert_close(logits, torch.tensor(EXPECTED[name]["logits"]), rtol=1e-5, atol=1e-5)
    assert evaluate_classifier(path, data, device="cpu").result.accuracy == EXPECTED[name]["accuracy"]


@pytest.mark.parametrize("name", FOLDERS)
def test_legacy_hf_folder_gives_the_recorded_embeddings(name: str) -> None:
    hf = pytest.importorskip("embcompress.hf")
    pytest.importorskip("transformers")
    folder = FIXTURES / name
    model = hf.load(folder, device="cpu")
    got = hf.embed(model, hf.load_tokenizer(folder), ["the film is good", "a very bad movie",
                                                      "low rank tables of a model", "it was not one small film"])
    torch.testing.assert_close(got, torch.tensor(EXPECTED[name]["embeddings"]), rtol=1e-5, atol=1e-5)
