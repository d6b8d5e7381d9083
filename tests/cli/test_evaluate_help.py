"""``evaluate --help`` covers both uses: a classifier on labelled JSON Lines, and a Hugging Face encoder against
its original (``--similarity-to``) on plain ``.txt`` texts."""

from __future__ import annotations

from embcompress.cli.main import main


def test_help_covers_classifiers_and_encoders(capsys) -> None:
    assert main(["evaluate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "classifier" in out and "JSON Lines" in out and "Hugging Face encoder" in out
    assert ".txt (one a line)" in out and "labels ignored" in out
    assert "--similarity-to ./all-MiniLM-L6-v2 --data texts.txt" in out
    assert "embcompress evaluate model.safetensors --data test.jsonl" in out
