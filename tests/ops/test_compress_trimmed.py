"""compress --trim: trim the vocabulary to the texts, then compress the rows kept, the budget a share of the original."""

from __future__ import annotations

from pathlib import Path

import pytest

from embcompress.classifier import load_classifier
from embcompress.cli.main import main
from embcompress.errors import InputError
from embcompress.ops.compress import compress_trimmed
from tests.builders import write_classifier

TEXTS = ["w1 w2 w3", "w4 w5 w1", "w7 w8 w9 w10"]


def test_trim_then_compress_spends_the_original_budget_on_the_rows_kept(tmp_path: Path) -> None:
    clf = write_classifier(tmp_path / "clf.safetensors", words=120, embed_dim=4)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    result = compress_trimmed(clf, "int8", texts, budget=0.06, output=tmp_path / "out.safetensors")
    (table,) = result.tables
    original = 4 * 122 * 4
    assert result.table_bytes_before == original and result.trimmed["rows_before"] == 122
    assert table["shape"][0] == result.trimmed["rows_after"] < 20
    assert table["bytes"] <= int(0.06 * original) < 4 * table["shape"][0] * 4  # int8 needed to fit
    loaded = load_classifier(result.output)
    assert loaded.model.embedding.num_embeddings == table["shape"][0]
    assert not list(tmp_path.glob(".*embcompress-tmp*"))  # the trimmed intermediate is gone


def test_trim_alone_enough_or_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clf = write_classifier(tmp_path / "clf.safetensors", words=120, embed_dim=4)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    with pytest.raises(InputError, match="trim` alone is enough"):
        compress_trimmed(clf, "int8", texts, budget=0.5, output=tmp_path / "out.safetensors")
    assert main(["compress", str(clf), "--method", "int8", "--trim", str(tmp_path / "missing.txt"), "--budget",
                 "0.1", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors", "texts.txt"]
