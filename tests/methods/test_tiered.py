"""tiered: frequent rows in more bits, the budget setting how many; its file form and its ONNX lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embcompress import core
from embcompress.errors import InputError
from embcompress.methods import BudgetError, Context
from embcompress.methods.tiered import TieredConfig

W = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
COUNTS = torch.arange(1000, 0, -1).double()  # row 0 the most frequent


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fraction", [0.09, 0.1, 0.13])
def test_budget_sets_the_frequent_rows_and_fits(fraction: float) -> None:
    budget = int(fraction * 4 * W.numel())
    spec = core.spec_for_budget("tiered", 1000, 64, budget)
    table = core.encode_table(W, spec, Context(counts=COUNTS))
    entry = core.table_entry(table)
    assert entry["bytes"] <= budget and entry["bytes"] == spec.structure_config.stored_bytes(1000, 64)
    high = table.info()["frequent_rows"]
    assert high == round(spec.structure_config.frequent * 1000) > 0
    assert set((table.weight_tiers == 0).nonzero().flatten().tolist()) == set(range(high))  # the most frequent
    dense = table.dense_weight()
    torch.testing.assert_close(dense[[3, 700]], table(torch.tensor([3, 700])))
    assert _error(dense[:high], W[:high]) < 0.5 * _error(dense[high:], W[high:])  # 4 bits against 2


def test_more_budget_lowers_the_error() -> None:
    errors = [core.encode_table(W, core.spec_for_budget("tiered", 1000, 64, int(f * 4 * W.numel())),
                                Context(counts=COUNTS)).info()["rel_error"] for f in (0.09, 0.11, 0.14)]
    assert errors[0] > errors[1] > errors[2]


def test_file_form_round_trip() -> None:
    table = core.encode_table(W, core.make_spec("tiered", {"frequent": 0.2}), Context(counts=COUNTS, padding_idx=0))
    again = core.table_from_tensors(core.table_entry(table), core.table_tensors(table))
    ids = torch.tensor([[0, 5, 999, 400]])
    torch.testing.assert_close(again(ids), table(ids))


def test_refused() -> None:
    with pytest.raises(InputError, match="needs token counts"):
        core.encode_table(W, core.make_spec("tiered"))
    with pytest.raises(InputError, match="tiered method"):
        TieredConfig(method="svd")
    with pytest.raises(InputError, match="bits"):
        TieredConfig(high={"bits": 5})
    with pytest.raises(BudgetError):
        core.spec_for_budget("tiered", 1000, 64, int(0.05 * 4 * W.numel()))


def test_onnx_lookup_matches_torch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    table = core.encode_table(W, core.make_spec("tiered", {"frequent": 0.3}), Context(counts=COUNTS))
    path = tmp_path / "tiered.onnx"
    ids = torch.tensor([[0, 1, 500, 999], [3, 2, 700, 10]])
    torch.onnx.export(table, (ids,), str(path), input_names=["ids"], output_names=["rows"], opset_version=17,
                      dynamo=False, custom_opsets={"com.microsoft": 1},
                      dynamic_axes={"ids": {0: "b", 1: "t"}, "rows": {0: "b", 1: "t"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), table(ids))


def test_pq_tiers_and_an_empty_tier() -> None:
    W2 = torch.randn(2000, 32, generator=torch.Generator().manual_seed(5))
    counts = torch.arange(2000, 0, -1).double()
    spec = core.make_spec("tiered", {"method": "pq", "frequent": 0.3, "high": {"subvector": 2, "centroids": 64},
                                     "low": {"subvector": 8, "centroids": 64, "iterations": 5}})
    table = core.encode_table(W2, spec, Context(counts=counts))
    entry = core.table_entry(table)
    assert entry["bytes"] == spec.structure_config.stored_bytes(2000, 32)
    assert sum(p.numel() for p in table.recoverable()) > 0  # the codebooks train in recovery
    dense = table.dense_weight()
    assert _error(dense[:600], W2[:600]) < _error(dense[600:], W2[600:])
    empty = core.make_spec("tiered", {"method": "pq", "frequent": 0.0, "low": {"subvector": 8, "centroids": 64}})
    flat = core.encode_table(W2, empty, Context(counts=counts))
    again = core.table_from_tensors(core.table_entry(flat), core.table_tensors(flat))
    torch.testing.assert_close(again(torch.tensor([0, 1999])), flat(torch.tensor([0, 1999])))


def test_a_model_with_a_tiered_table_saves_one_table() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 64))
    core.compress_(model, core.make_spec("tiered", {"frequent": 0.2}), tables=["0"], counts=COUNTS)
    assert list(core.tables_of(model)) == ["0"]
    state, entries = core.model_state(model)
    assert list(entries) == ["0.weight"] and "0.parts.0.weight" in state
    fresh = torch.nn.Sequential(torch.nn.Embedding(1000, 64))
    core.attach(fresh, state, entries)
    torch.testing.assert_close(fresh(torch.tensor([1, 2, 900])), model(torch.tensor([1, 2, 900])))


def test_budget_below_low_bit_tiers_falls_back_to_codebook_tiers() -> None:
    config = TieredConfig.for_budget(30000, 48, int(0.05 * 4 * 30000 * 48))
    assert config.method == "pq" and config.high == {"subvector": 3} and config.low == {"subvector": 8}
    assert 0 < config.frequent < 1 and config.stored_bytes(30000, 48) <= int(0.05 * 4 * 30000 * 48)
    assert TieredConfig.for_budget(30000, 64, int(0.12 * 4 * 30000 * 64)).method == "lowbit"


def test_pq_tiers_export_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    W2 = torch.randn(1500, 32, generator=torch.Generator().manual_seed(7))
    counts = torch.arange(1500, 0, -1).double()
    spec = core.make_spec("tiered", {"method": "pq", "frequent": 0.4, "high": {"subvector": 2, "centroids": 64},
                                     "low": {"subvector": 8, "centroids": 64, "iterations": 5}})
    table = core.encode_table(W2, spec, Context(counts=counts))
    path = tmp_path / "tiered-pq.onnx"
    ids = torch.tensor([[0, 1, 700, 1499], [3, 2, 900, 10]])
    torch.onnx.export(table, (ids,), str(path), input_names=["ids"], output_names=["rows"], opset_version=17,
                      dynamo=False, dynamic_axes={"ids": {0: "b", 1: "t"}, "rows": {0: "b", 1: "t"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), table(ids))


def test_a_50_dim_table_gets_codebook_tiers_or_its_real_minimum() -> None:
    """50 dims: no codebook subvector of the usual list divides them, so the fallback takes one that does; below
    every tier method's least bytes the refusal gives that least (not None), and a table no tier method can hold
    at all gets the method's reason."""
    budget = 40000  # under 2-bit groups (padded to 64 values) for 2000 rows
    config = TieredConfig.for_budget(2000, 50, budget)
    assert config.method == "pq" and 50 % config.low["subvector"] == 0 and 50 % config.high["subvector"] == 0
    assert 0 < config.stored_bytes(2000, 50) <= budget
    least = min(TieredConfig(frequent=0.0).stored_bytes(2000, 50),
                TieredConfig(frequent=0.0, method="pq", high=config.high, low=config.low).stored_bytes(2000, 50))
    with pytest.raises(BudgetError, match=f"tiered needs at least {least} bytes for a 2000 x 50 table"):
        TieredConfig.for_budget(2000, 50, least - 1)
    with pytest.raises(BudgetError, match="pq tiers cannot hold a 2000 x 50 table: pq subvector 8 does not divide"):
        TieredConfig.for_budget(2000, 50, budget, method="pq", low={"subvector": 8})
