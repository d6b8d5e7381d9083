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


def _table_file(path: Path, W: "torch.Tensor") -> Path:
    from safetensors.torch import save_file

    save_file({"embedding.weight": W.contiguous()}, str(path))
    return path


def test_flat_spectrum_warns_low_bit_storage_beats_low_rank(tmp_path: Path) -> None:
    import torch

    W = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))  # nearly flat spectrum
    path = _table_file(tmp_path / "flat.safetensors", W)
    (table,) = inspect_checkpoint(path).tables
    options = {o.storage: o for o in table.storage}
    assert list(options) == ["int8", "lowbit4", "lowbit2"]
    four = options["lowbit4"]
    assert four.bytes == 2048 * (32 + 2 * 2 + 1) and four.fraction == pytest.approx(37 / 256)
    assert four.rows_measured == 2048 and four.svd_rank == four.bytes // (4 * (2048 + 64))
    # measured errors: finer codes lose less, and low rank at 4-bit bytes loses far more than 4-bit groups
    assert options["int8"].rel_error < four.rel_error < options["lowbit2"].rel_error < 1
    assert four.svd_rel_error > 2 * four.rel_error
    assert four.svd_rel_error == pytest.approx((1 - four.svd_energy_kept) ** 0.5)
    assert table.warning is not None and f"embcompress quantize {path} --bits 4" in table.warning
    budget = float(table.warning.rsplit("--budget ", 1)[1].rstrip(")"))
    assert four.fraction <= budget < four.fraction + 1e-4  # the budget suggested holds the 4-bit table


def test_low_rank_table_gets_no_warning(tmp_path: Path) -> None:
    from tests.builders import low_rank_table

    path = _table_file(tmp_path / "lowrank.safetensors", low_rank_table(2048, 64, 4))
    (table,) = inspect_checkpoint(path).tables
    four = next(o for o in table.storage if o.storage == "lowbit4")
    assert four.svd_rel_error < 2 * four.rel_error and table.warning is None


def test_storage_measured_on_a_row_sample() -> None:
    import torch

    from embcompress.summary import storage_options

    W = torch.randn(3000, 32, generator=torch.Generator().manual_seed(1))
    full, sample = storage_options(W, lambda k: 0.0, 10**6), storage_options(W, lambda k: 0.0, 500)
    assert [o.rows_measured for o in sample] == [500] * 3 and [o.rows_measured for o in full] == [3000] * 3
    for a, b in zip(full, sample):
        assert b.rel_error == pytest.approx(a.rel_error, rel=0.1) and a.bytes == b.bytes
    assert all(o.svd_rel_error == 1.0 for o in full)  # energy_kept(k) = 0: nothing kept


def test_low_bit_rows_for_a_dimension_32_does_not_divide() -> None:
    """A 50-d table (an LSTM's) gets the low-bit rows too, at lowbit's padded bytes (64 values a row)."""
    import torch

    from embcompress.methods.lowbit import LowBitConfig
    from embcompress.summary import LOWBIT_GROUP, storage_options

    W = torch.randn(2000, 50, generator=torch.Generator().manual_seed(2))
    options = {o.storage: o for o in storage_options(W, lambda k: 0.0)}
    assert list(options) == ["int8", "lowbit4", "lowbit2"]
    for bits in (4, 2):
        option = options[f"lowbit{bits}"]
        assert option.bytes == LowBitConfig(bits=bits, group_size=LOWBIT_GROUP).stored_bytes(2000, 50)
        assert option.bytes == 2000 * (64 * bits // 8 + 2 * 2 + -(-2 * bits // 8))  # codes, scales, zeros
        assert option.fraction == pytest.approx(option.bytes / (4 * 2000 * 50))
    assert options["int8"].rel_error < options["lowbit4"].rel_error < options["lowbit2"].rel_error < 1
