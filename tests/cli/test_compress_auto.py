"""``embcompress compress --method auto``: every method measured on --data, the best written, bad input refused."""

import json
from pathlib import Path

import pytest

from embcompress.cli.main import main


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    from tests.test_hf import tiny_bert

    return tiny_bert(tmp_path / "bert")


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    from tests.test_hf import TEXTS

    p = tmp_path / "t.txt"
    p.write_text("\n".join(TEXTS * 2) + "\n", encoding="utf-8")
    return p


def test_auto_prints_the_front_and_why(capsys, bert: Path, texts: Path, tmp_path: Path) -> None:
    assert main(["compress", str(bert), "--method", "auto", "--budget", "0.3", "--data", str(texts), "-o", "out"]) == 0
    out = capsys.readouterr().out
    assert "The front" in out and "chose " in out and "highest" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["compress", str(bert), "--method", "auto", "--budget", "0.3", "--data", str(texts), "-o", "o2",
                 "--min-quality", "0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "smallest" in doc["auto"]["why"] and doc["auto"]["row"]["quality"] >= 0.5


@pytest.mark.parametrize("args, words", [
    (["--budget", "0.3"], "--data"), (["--budget", "0.3", "--min-quality", "0"], "--min-quality"),
    (["--budget", "0.3", "--min-quality", "1.5"], "--min-quality"), (["--budget", "1.5"], "(0, 1)"),
    (["--budget", "9GB"], "at or above"),
])
def test_auto_bad_input_is_one_line(capsys, bert: Path, texts: Path, tmp_path: Path, args: list[str],
                                    words: str) -> None:
    data = ["--data", str(texts)] if args[-1] != "0.3" or "--min-quality" in args else []
    capsys.readouterr()
    before = set(tmp_path.iterdir())
    assert main(["compress", str(bert), "--method", "auto", "-o", "out", *args, *data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert set(tmp_path.iterdir()) == before


def test_auto_counts_tokens_in_the_corpus_when_given(capsys, bert: Path, texts: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the film is good\n" * 5, encoding="utf-8")
    assert main(["compress", str(bert), "--method", "auto", "--budget", "0.3", "--data", str(texts), "--corpus",
                 str(corpus), "--methods", "groupreduce", "-o", "out", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (table,) = doc["tables"]
    assert table["method"] == "groupreduce"
    from embcompress.checkpoint import load_checkpoint

    with load_checkpoint(tmp_path / "out") as ckpt:
        entry = ckpt.embcompress_meta["tables"]["embeddings.word_embeddings.weight"]
    assert entry["counts"]["source"] == str(corpus)  # counted in the corpus, not in --data


def test_a_second_auto_says_it_read_the_cache(capsys, bert: Path, texts: Path, tmp_path: Path) -> None:
    args = ["compress", str(bert), "--method", "auto", "--budget", "0.3", "--data", str(texts), "--methods",
            "svd,lowbit"]
    assert main([*args, "-o", "first"]) == 0
    assert "read from the cache" not in capsys.readouterr().out
    assert main([*args, "-o", "second"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "rows read from the cache" in out and "the chosen tables written as measured" in out
