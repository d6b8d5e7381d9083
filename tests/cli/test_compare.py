import json
from pathlib import Path

from embcompress.cli.main import main
from tests.builders import write_sentiment_jsonl

FAST = ["--batch-size", "16", "--device", "cpu"]


def test_compare_as_typed_after_factorize_and_finetune(capsys, tmp_path: Path) -> None:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 30, 1)
    assert main(["train", "--data", str(train), "--dev", str(dev), "-o", "model.safetensors", "--epochs", "1",
                 "--embed-dim", "16", *FAST]) == 0
    assert main(["factorize", "model.safetensors", "--reduction", "0.9"]) == 0
    assert main(["finetune", "--data", str(train), "--epochs", "1", *FAST]) == 0
    capsys.readouterr()
    assert main(["compare", "--baselines", "quant8,quant16,offline", "--repeats", "2", "--finetune-epochs", "1",
                 "--plot", "cmp.png", "--csv", "cmp.csv", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith("model.safetensors")
    assert result["settings"]["reductions"] == [0.9]
    proposed = [r for r in result["rows"] if r["method"] == "proposed"]
    assert proposed[0]["note"] == "reused from the workspace record"
    assert proposed[0]["checkpoint"].endswith("model.r90.ft.safetensors")
    assert [r["method"] for r in result["rows"]] == ["uncompressed", "quant16", "quant8", "proposed", "offline"]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp.csv").read_text().startswith("method,R,size_MB")


def test_compare_bad_baseline_is_one_line(capsys, tmp_path: Path) -> None:
    assert main(["compare", "x.safetensors", "--baselines", "quant4", "--data", "d.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quant4" in err
