import json
from pathlib import Path

import pytest

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
                 "--methods", "svd,lowbit", "--budgets", "0.3", "--plot", "cmp.png", "--csv", "cmp.csv",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["uncompressed", "svd", "lowbit", "quant16", "quant8", "proposed",
                                           "offline"]
    for r in rows:
        assert {"method", "budget", "table_bytes", "file_bytes", "quality", "recovered", "pareto"} <= set(r)
    proposed = [r for r in rows if r["method"] == "proposed"]
    assert proposed[0]["note"] == "reused from the workspace record" and proposed[0]["recovered"]
    assert proposed[0]["checkpoint"].endswith("model.r90.ft.safetensors")
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp.csv").read_text().startswith("method,budget,table_bytes")
    assert (tmp_path / "model.compare" / "compare.md").is_file()


def test_compare_bad_baseline_is_one_line(capsys, tmp_path: Path) -> None:
    assert main(["compare", "x.safetensors", "--baselines", "quant4", "--data", "d.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quant4" in err


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    from tests.test_hf import tiny_bert

    return tiny_bert(tmp_path / "bert")


def _texts(tmp_path: Path) -> Path:
    from tests.test_hf import TEXTS

    p = tmp_path / "t.txt"
    p.write_text("\n".join(TEXTS * 2) + "\n", encoding="utf-8")
    return p


def test_compare_an_encoder(capsys, bert: Path, tmp_path: Path) -> None:
    texts = _texts(tmp_path)
    assert main(["compare", str(bert), "--data", str(texts), "--budgets", "0.3,0.1", "--methods", "svd,lowbit,int8",
                 "--no-latency", "-o", "out"]) == 0
    shown = capsys.readouterr()
    assert "Pareto front" in shown.out and "latency" not in shown.out
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png", "compare.log"):
        assert (tmp_path / "out" / name).is_file()
    assert "[6/6]" in (tmp_path / "out" / "compare.log").read_text()
    assert main(["compare", str(bert), "--data", str(texts), "--budgets", "0.3", "--methods", "svd",
                 "--no-latency", "-o", "out", "--force", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["uncompressed", "svd"] and rows[1]["budget"] == 0.3
    assert isinstance(rows[1]["pareto"], bool) and rows[1]["recovered"] is False


@pytest.mark.parametrize("args, words", [
    (["--budgets", "1.2"], "(0, 1)"), (["--budgets", "0"], "budget"), (["--budgets", "9GB"], "at or above"),
    (["--methods", "svd,nope"], "nope"), (["--data", "missing.txt"], "no such file"),
    (["--data", "empty.txt"], "no texts"), (["--data", "mixed.jsonl"], "mixed"),
])
def test_compare_bad_input_is_one_line_and_writes_nothing(capsys, bert: Path, tmp_path: Path, args: list[str],
                                                          words: str) -> None:
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n',
                                          encoding="utf-8")
    capsys.readouterr()
    before = set(tmp_path.iterdir())
    base = ["compare", str(bert), "--no-latency", "-o", "out"]
    if "--data" not in args:
        base += ["--data", str(_texts(tmp_path))]
        before = set(tmp_path.iterdir())
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert set(tmp_path.iterdir()) == before
