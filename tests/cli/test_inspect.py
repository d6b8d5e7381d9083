import json
from pathlib import Path

from embcompress.cli.main import main


def test_inspect_table_and_json(capsys, hf_folder: Path) -> None:
    assert main(["inspect", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    assert "embeddings.word_embeddings.weight" in out and "energy kept" in out and "encoder.layer.*" in out
    assert main(["inspect", str(hf_folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tables"][0]["shape"] == [1000, 32]
    assert [p["reduction"] for p in data["tables"][0]["projections"]] == [0.5, 0.7, 0.9]


def test_inspect_missing_path(capsys, tmp_path: Path) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_lists_commands_and_examples(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "factorize" in out and "history" in out
    assert main(["inspect", "--help"]) == 0
    assert "embcompress inspect model.safetensors" in capsys.readouterr().out
