import json
from pathlib import Path

import pytest

from embcompress.cli.main import main
from embcompress.workspace import load_record
from tests.builders import write_classifier

CORPUS = "w1 w2 w3 w4 w5\nw5 w7 w1 unknownword\nw10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20\n"


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    return write_classifier(tmp_path / "clf.safetensors"), corpus


def test_trim_json_default_output_and_record(capsys, files) -> None:
    model, corpus = files
    code, out, err = run(capsys, "trim", model, "--corpus", corpus, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["output"] == str(model.parent / "clf.trim.safetensors") and Path(data["output"]).is_file()
    assert data["rows_before"] == 122 and data["rows_after"] == data["tokens_kept"] == 2 + 17
    assert data["coverage"] == 1.0 and data["texts_changed"] == 0 and data["bytes_after"] < data["bytes_before"]
    entry = load_record()[-1]
    assert entry["command"] == "trim" and entry["options"] == {"keep_top": None, "min_count": 1}
    assert [a["role"] for a in entry["inputs"]] == ["model", "corpus"]
    assert entry["outputs"][0]["path"] == "clf.trim.safetensors" and entry["figures"]["rows_after"] == 19


def test_trim_table_then_factorize(capsys, files, tmp_path: Path) -> None:
    model, corpus = files
    code, out, err = run(capsys, "trim", model, "--corpus", corpus, "-o", tmp_path / "t.safetensors",
                         "--keep-top", "10", "--min-count", "1")
    assert code == 0, err
    assert "embedding.weight" in out and "122 x 8" in out and "12 x 8" in out
    assert "vocabulary: 122 -> 12 tokens" in out and "texts tokenize differently" in out and "whole file" in out
    code, out, err = run(capsys, "trim", model, "--corpus", corpus, "-o", tmp_path / "t.safetensors")
    assert code == 3 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert run(capsys, "trim", model, "--corpus", corpus, "-o", tmp_path / "t.safetensors", "--force")[0] == 0
    code, out, err = run(capsys, "factorize", tmp_path / "t.safetensors", "--rank", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["tables"][0]["shape"] == [19, 8]


@pytest.mark.parametrize(("make", "code", "message"), [
    (lambda p, m, c: [m, "--corpus", p / "missing.txt"], 2, "no such corpus"),
    (lambda p, m, c: [m, "--corpus", _write(p / "x.txt", "zzz qqq\n")], 2, "no token of the corpus"),
    (lambda p, m, c: [m, "--corpus", c, "-o", m], 3, "overwrite the input"),
    (lambda p, m, c: [_plain(p), "--corpus", c], 2, "tokenizer is unknown"),
    (lambda p, m, c: [m, "--corpus", c, "--keep-top", "0"], 2, "--keep-top"),
])
def test_trim_bad_input_one_line(capsys, files, tmp_path: Path, make, code: int, message: str) -> None:
    model, corpus = files
    args = make(tmp_path, model, corpus)
    before = {p.name for p in tmp_path.iterdir()}
    got, out, err = run(capsys, "trim", *args)
    assert got == code and message in err and len(err.strip().splitlines()) == 1 and out == ""
    assert {p.name for p in tmp_path.iterdir()} == before


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _plain(folder: Path) -> Path:
    from safetensors.torch import save_file

    from tests.builders import dan_state

    path = folder / "plain.safetensors"
    save_file(dan_state(), str(path))
    return path


def test_trim_help_ends_with_examples(capsys) -> None:
    code, out, _ = run(capsys, "trim", "--help")
    assert code == 0
    assert "--corpus" in out and "--keep-top" in out and "--min-count" in out
    tail = " ".join(out.split()[-12:])
    assert "embcompress factorize dan.trim.safetensors --reduction 0.5" in tail
    assert "embcompress trim dan.safetensors --corpus train.jsonl" in out
