import json
from pathlib import Path

from embcompress.cli.main import main
from embcompress.workspace import RECORD_NAME, sha256_of


def test_factorize_is_recorded_and_history_shows_it(capsys, tmp_path: Path, dan_file: Path) -> None:
    assert main(["factorize", str(dan_file), "-r", "0.5"]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    (entry,) = record["entries"]
    assert entry["command"] == "factorize" and entry["options"]["reduction"] == 0.5
    assert entry["inputs"][0] == {"role": "model", "path": "dan.safetensors", "sha256": sha256_of(dan_file)}
    assert entry["outputs"][0]["path"] == "dan.r50.safetensors"
    assert entry["figures"]["tables"]["embedding.weight"]["rank"] == 7
    assert main(["history"]) == 0
    assert "factorize" in capsys.readouterr().out
    assert main(["history", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["entries"]) == 1


def test_recording_off(capsys, tmp_path: Path, dan_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMBCOMPRESS_WORKSPACE", "off")
    assert main(["factorize", str(dan_file), "-r", "0.5"]) == 0
    assert not (tmp_path / RECORD_NAME).exists()


def test_failed_command_records_nothing(capsys, tmp_path: Path, dan_file: Path) -> None:
    assert main(["factorize", str(dan_file), "-r", "2"]) == 2
    assert not (tmp_path / RECORD_NAME).exists()


def test_corrupt_record_is_one_line_error(capsys, tmp_path: Path) -> None:
    (tmp_path / RECORD_NAME).write_text("{oops")
    assert main(["history"]) == 2
    assert "unreadable" in capsys.readouterr().err
