from pathlib import Path

import pytest

from embcompress import factorize, inspect_checkpoint
from embcompress.summary import group_name


def test_groups_tables_and_projections(hf_folder: Path) -> None:
    report = inspect_checkpoint(hf_folder)
    groups = {g.name: g for g in report.groups}
    assert set(groups) == {"embeddings", "encoder.layer.*", "pooler"}
    assert groups["encoder.layer.*"].tensors == 4
    assert sum(g.share for g in report.groups) == pytest.approx(1.0)
    (table,) = report.tables
    assert table.name == "embeddings.word_embeddings.weight"
    assert [p.reduction for p in table.projections] == [0.5, 0.7, 0.9]
    ks = [p.rank for p in table.projections]
    assert ks == sorted(ks, reverse=True)
    energies = [p.energy_kept for p in table.projections]
    assert energies == sorted(energies, reverse=True) and all(0 < e <= 1 for e in energies)
    assert table.projections[0].bytes_saved > 0.49 * table.bytes


def test_inspect_a_factorized_file(dan_file: Path) -> None:
    out = factorize(dan_file, reduction=0.5).output
    report = inspect_checkpoint(out)
    assert "embedding.weight" in report.factorized
    assert report.tables == [] and "already factorized" in report.note


def test_group_name() -> None:
    assert group_name("encoder.layer.3.attention.self.query.weight") == "encoder.layer.*"
    assert group_name("embeddings.word_embeddings.weight") == "embeddings"
    assert group_name("lm_head.weight") == "lm_head"
