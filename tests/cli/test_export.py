import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from embcompress.cli.main import main  # noqa: E402
from embcompress.errors import DependencyError  # noqa: E402
from embcompress.runtime import MISSING  # noqa: E402
from embcompress.train.loop import TrainConfig  # noqa: E402
from embcompress.train.run import train_classifier  # noqa: E402
from tests.builders import write_sentiment_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def dan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli-export")
    data = write_sentiment_jsonl(root / "train.jsonl", 64)
    out = train_classifier(data, None, root / "dan.safetensors", embed_dim=8,
                           config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output
    torch.set_num_threads(threads)
    return Path(out)


@pytest.fixture
def model(dan: Path, tmp_path: Path) -> Path:
    """A private copy, so that outputs beside it land in this test's folder."""
    path = tmp_path / "dan.safetensors"
    path.write_bytes(dan.read_bytes())
    return path


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in (*args, "--threads", "1", "--device", "cpu")])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_default_output_and_record(capsys, model: Path) -> None:
    code, out, err = run(capsys, "export", model, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["output"] == str(model.parent / "dan.onnx") and Path(data["output"]).is_file()
    assert data["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert data["outputs"][0]["name"] == "logits" and data["parity"]["fp32_max_abs_diff"] <= 1e-4
    assert data["checker"] == "passed" and data["graph"]
    record = json.loads((model.parent / "embcompress-workspace.json").read_text())["entries"][-1]
    assert record["command"] == "export" and record["outputs"][0]["role"] == "onnx"


def test_human_output_int8(capsys, model: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, "export", model, "-o", tmp_path / "q.onnx", "--quantize", "int8", "--opset", "18")
    assert code == 0, err
    assert "input_ids" in out and "logits" in out and "opset 18" in out
    assert "float32: max |logit difference|" in out and "int8: max |logit difference|" in out
    assert "predictions identical" in out


def test_model_from_workspace_record(capsys, model: Path, tmp_path: Path) -> None:
    assert main(["factorize", str(model), "--rank", "2", "--json"]) == 0  # records dan.k2.safetensors
    capsys.readouterr()
    code, out, err = run(capsys, "export", "-o", tmp_path / "r.onnx")
    assert code == 0, err
    assert "dan.k2.safetensors (the last model in the workspace record)" in " ".join(err.split())
    assert "k = 2" in out and (tmp_path / "r.onnx").is_file()


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("missing", 2, "no such file"),
        ("not_classifier", 2, "not an embcompress classifier"),
        ("exists", 3, "already exists; use --force"),
        ("same", 3, "would overwrite the input"),
        ("quantize", 2, "--quantize must be one of int8, int4, fp16"),
        ("opset", 2, "--opset must be between"),
        ("decode", 2, "--decode-at-load: the model has no compressed table"),
        ("tune", 2, "--tune is for the int4 export of a Hugging Face encoder"),
    ],
)
def test_one_line_errors(capsys, model: Path, dan: Path, dan_file: Path, tmp_path: Path, case: str, code: int,
                         message: str) -> None:
    (tmp_path / "taken.onnx").write_bytes(b"keep")
    args = {
        "missing": [tmp_path / "nope.safetensors"],
        "not_classifier": [dan_file, "-o", tmp_path / "x.onnx"],
        "exists": [model, "-o", tmp_path / "taken.onnx"],
        "same": [model, "-o", model, "--force"],
        "quantize": [model, "--quantize", "int2"],
        "opset": [model, "--opset", "99"],
        "decode": [dan, "-o", tmp_path / "x.onnx", "--decode-at-load"],
        "tune": [dan, "-o", tmp_path / "x.onnx", "--quantize", "int4", "--tune", "5"],
    }[case]
    got, out, err = run(capsys, "export", *args)
    assert got == code and out == ""
    assert err.count("\n") == 1 and err.startswith("embcompress: error: ") and message in err
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep"
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "dan.onnx").exists()


def test_missing_onnxruntime(capsys, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing():
        raise DependencyError(MISSING)

    monkeypatch.setattr("embcompress.runtime.import_onnxruntime", missing)
    code, _, err = run(capsys, "export", model)
    assert code == 4 and err.strip() == f"embcompress: error: {MISSING}"


def test_help_ends_with_examples(capsys) -> None:
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and out.rstrip().splitlines()[-1].strip().startswith("embcompress export")
