"""A method installed from outside the package shows up everywhere with no other change: the library, ``--method``,
``embcompress methods``; and it runs through compress -> load -> fine-tune -> export."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from embcompress import methods
from embcompress.classifier import load_classifier
from embcompress.cli.main import main
from embcompress.train.loop import TrainConfig
from embcompress.train.run import finetune_classifier

PLUGIN = Path(__file__).parent / "toy_plugin" / "toy_method.py"


@pytest.fixture
def toy() -> object:
    spec = importlib.util.spec_from_file_location("toy_method", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_method"] = module
    spec.loader.exec_module(module)
    yield module
    methods.unregister("toy")
    sys.modules.pop("toy_method", None)


def test_unknown_before_registration() -> None:
    with pytest.raises(Exception, match="unknown method 'toy'"):
        methods.get("toy")


def test_toy_method_end_to_end(toy: object, classifier: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["toy"]["kind"] == "structure" and listed["toy"]["options"][0]["name"] == "gain"

    model, train = classifier
    out = tmp_path / "toy.safetensors"
    assert main(["compress", str(model), "--method", "toy", "--set", "gain=4", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tables"][0]["config"] == {"gain": 4.0}
    assert result["table_bytes_after"] < result["table_bytes_before"]

    original, loaded = load_classifier(model), load_classifier(out)
    assert type(loaded.model.embedding).__name__ == "ToyTable"
    ids = torch.arange(2, 40).reshape(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.embedding(ids), original.model.embedding(ids), atol=1e-2, rtol=1e-2)

    tuned = tmp_path / "toy-ft.safetensors"
    finetune_classifier(out, train, None, tuned, config=TrainConfig(epochs=1, batch_size=16, lr=0.05, device="cpu"))
    again = load_classifier(tuned)
    assert type(again.model.embedding).__name__ == "ToyTable"
    assert float(again.model.embedding.gain) != pytest.approx(4.0)  # recovery trained the toy's parameter

    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "toy.onnx"
    assert main(["export", str(tuned), "-o", str(onnx_path), "--data", str(train), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert onnx_path.is_file() and report["parity"]["fp32_max_abs_diff"] < 1e-4
