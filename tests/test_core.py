"""The in-memory core: specs, compress_ on a live module, the file form of a table, and attach."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embcompress import core
from embcompress.errors import InputError
from embcompress.methods import BudgetError, StoredTable, TiedLinear
from embcompress.methods.base import CodeTraining


class TinyLM(nn.Module):
    def __init__(self, V: int = 400, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.pos = nn.Embedding(16, d)
        self.head = nn.Linear(d, V)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) + self.pos.weight[: ids.shape[1]])


IDS = torch.randint(0, 400, (3, 9), generator=torch.Generator().manual_seed(1))
COUNTS = torch.randint(0, 30, (400,), generator=torch.Generator().manual_seed(2)).double()


@pytest.mark.parametrize("method,options", [("svd", {"rank": 8}), ("svd+int8", {"rank": 8}), ("int8", {}),
                                            ("fp16", {}), ("groupreduce+fp16", {"rank": 8, "blocks": 3}),
                                            ("weighted", {"rank": 6})])
def test_compress_save_attach_round_trip(method: str, options: dict) -> None:
    model = TinyLM()
    done = core.compress_(model, core.make_spec(method, options), counts=COUNTS)
    assert [d.name for d in done] == ["emb"]  # the position table (fewer rows than 2 d) is left alone
    assert isinstance(model.head, TiedLinear) and model.head.tied_to is model.emb
    assert done[0].bytes_after < done[0].bytes_before
    with torch.no_grad():
        out = model(IDS)
    state, entries = core.model_state(model)
    assert "head.weight" not in state and set(entries) == {"emb.weight"}
    assert entries["emb.weight"]["bytes"] == done[0].bytes_after
    fresh = TinyLM()
    core.attach(fresh, state, entries)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), out)


def test_stored_table_stays_packed_and_decodes_rows() -> None:
    model = TinyLM()
    core.compress_(model, "int8")
    table = model.emb
    assert isinstance(table, StoredTable) and table.weight.dtype == torch.int8
    assert not list(table.parameters())  # nothing float32 of table size is held
    rows = table(torch.tensor([3, 5]))
    torch.testing.assert_close(rows, table.dense_weight()[[3, 5]])


def test_storage_makes_memory_equal_file() -> None:
    """With a storage on factors, the module in memory computes what the saved and reloaded one computes."""
    model = TinyLM()
    core.compress_(model, core.make_spec("svd+int8", {"rank": 8}))
    W = model.emb.dense_weight().detach()
    state, entries = core.model_state(model)
    assert state["emb.weight_a"].dtype == torch.int8 and "emb.weight_a_scale" in state
    rebuilt = core.table_from_tensors(entries["emb.weight"], {k[4:]: v for k, v in state.items()
                                                              if k.startswith("emb.")})
    torch.testing.assert_close(rebuilt.dense_weight(), W)


def test_spec_for_budget_fits() -> None:
    for method in ("svd", "svd+int8", "int8", "fp16"):
        budget = int(0.55 * 4 * 1000 * 64)
        spec = core.spec_for_budget(method, 1000, 64, budget)
        table = core.encode_table(torch.randn(1000, 64), spec)
        assert core.table_entry(table)["bytes"] <= budget, method
    with pytest.raises(BudgetError):
        core.spec_for_budget("int8", 1000, 64, int(0.2 * 4 * 1000 * 64))
    with pytest.raises(BudgetError):
        core.spec_for_budget("svd", 1000, 64, 4 * 1000 * 64)


def test_a_combination_that_cannot_fit_says_what_its_smallest_sizing_stores() -> None:
    """groupreduce+lowbit pads each block's rank to a group of 32: at rank 1 a 14816 x 50 table's left factors
    alone take 20 bytes a row, over a budget of 10."""
    with pytest.raises(BudgetError, match=r"the smallest sizing tried \(rank 1\) stores (\d+) bytes") as e:
        core.spec_for_budget("groupreduce+lowbit", 14816, 50, 148160)
    assert int(str(e.value).split(" stores ")[1].split()[0]) > 20 * 14816


@pytest.mark.parametrize("text,match", [("nope", "unknown method"), ("int8+svd", "structure comes first"),
                                        ("svd+int8+fp16", "structure, a storage"), ("dense", "changes nothing"),
                                        ("int8+fp16", "one storage")])
def test_bad_method_names(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        core.parse_method(text)


def test_counted_method_without_counts_is_refused() -> None:
    with pytest.raises(InputError, match="needs token counts"):
        core.compress_(TinyLM(), core.make_spec("groupreduce", {"rank": 4}))


def test_unknown_option_is_refused() -> None:
    with pytest.raises(InputError, match="unknown option"):
        core.make_spec("svd", {"rank": 4, "bits": 2})


@pytest.mark.parametrize("storage,bits", [("lowbit", 2), ("int8", None)])
def test_low_rank_with_a_storage_is_fitted_as_lplr(storage: str, bits: int | None) -> None:
    """The right factor solved against the stored left one: never worse than storing both factors as they are."""
    W = torch.randn(600, 64, generator=torch.Generator().manual_seed(4))
    options = {"bits": bits} if bits else {}
    spec = core.make_spec(f"svd+{storage}", {"rank": 32}, options)
    fitted = core.encode_table(W, spec)
    plain = core.encode_table(W, core.Spec(spec.structure, spec.structure_config))
    core.store_(plain, spec.storage, spec.storage_config)
    assert fitted.info()["rel_error"] <= core.relative_error(W, plain) + 1e-6
    stored = core.table_tensors(fitted)  # what the file holds decodes to what the module computes
    again = core.table_from_tensors(core.table_entry(fitted), stored)
    torch.testing.assert_close(again.dense_weight(), fitted.dense_weight())


def test_budget_with_low_bit_factors_rounds_the_rank_to_the_group() -> None:
    spec = core.spec_for_budget("svd+lowbit", 2000, 64, int(0.05 * 4 * 2000 * 64), storage_options={"bits": 2})
    assert spec.structure_config.rank % spec.storage_config.group_size == 0


def test_set_options_split_by_config_and_dotted_keys() -> None:
    s, t = core.split_options("svd+lowbit", ["rank=64", "bits=2", "refine=true"])
    assert s == {"rank": 64} and t == {"bits": 2, "refine": True}
    s, _ = core.split_options("tiered", ["method=pq", "high.subvector=3", "low.centroids=128"])
    assert s == {"method": "pq", "high": {"subvector": 3}, "low": {"centroids": 128}}
    with pytest.raises(InputError, match="no such option"):
        core.split_options("int8", ["rank=4"])
    with pytest.raises(InputError, match="name=value"):
        core.split_options("svd", ["rank"])


@pytest.mark.parametrize("text", ["pq+int8", "iiq+fp16", "tiered+lowbit"])
def test_a_structure_with_its_own_storage_takes_no_other(text: str) -> None:
    with pytest.raises(InputError, match="keeps its own storage"):
        core.parse_method(text)


def test_groupreduce_kept_in_int8_fits_its_budget() -> None:
    W = torch.randn(3000, 64, generator=torch.Generator().manual_seed(6))
    counts = torch.arange(3000, 0, -1).double()
    budget = int(0.25 * 4 * W.numel())
    spec = core.spec_for_budget("groupreduce+int8", 3000, 64, budget, {"blocks": 4})
    table = core.encode_table(W, spec, core.Context(counts=counts))
    assert core.table_entry(table)["bytes"] <= budget


@pytest.mark.parametrize("method,options,storage_options", [
    ("svd+lowbit", {"rank": 40}, {"bits": 2, "refine": True}),
    ("svd+lowbit", {"rank": 48}, {"bits": 3}),
    ("groupreduce+lowbit", {"rank": 24, "blocks": 3}, {"bits": 2}),
    ("svd+int8", {"rank": 24}, {}),
])
def test_the_file_holds_exactly_what_the_module_computes(method: str, options: dict, storage_options: dict) -> None:
    """Quantizing decoded low-bit values again need not give the same codes; the file is written from the codes the
    module was decoded from, so save -> load -> save is exact, and the loaded table equals the one in memory."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(500, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    counts = torch.rand(500, generator=g) * 100
    fitted = core.encode_table(W, core.make_spec(method, options, storage_options),
                               core.Context(counts=counts))
    stored = core.table_tensors(fitted)
    again = core.table_from_tensors(core.table_entry(fitted), stored)
    assert torch.equal(again.dense_weight(), fitted.dense_weight())
    restored = core.table_tensors(again)
    assert stored.keys() == restored.keys()
    assert all(torch.equal(stored[k], restored[k]) for k in stored)


def test_a_trained_tensor_is_stored_from_its_new_values() -> None:
    W = torch.randn(300, 64, generator=torch.Generator().manual_seed(8))
    fitted = core.encode_table(W, core.make_spec("svd+lowbit", {"rank": 32}, {"bits": 4}))
    before = core.table_tensors(fitted)
    with torch.no_grad():
        fitted.weight_b.add_(0.5)  # as an optimizer step would: the remembered codes no longer hold
    after = core.table_tensors(fitted)
    assert not torch.equal(before["weight_b"], after["weight_b"])
    assert torch.equal(before["weight_a"], after["weight_a"])


class Untied(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 400)


def test_code_training_swaps_pq_tables_and_settles_them_back() -> None:
    model = Untied()
    core.compress_(model, core.make_spec("pq", {"subvector": 4, "centroids": 16, "iterations": 4}))
    first = model.emb
    assert core.train_codes_(model) == ["emb"] and isinstance(model.emb, CodeTraining)
    model(IDS).sum().backward()
    assert model.emb.weight.grad is not None
    assert core.settle_codes_(model) == ["emb"]
    assert type(model.emb) is type(first) and model.emb is not first
    assert {k: v.shape for k, v in model.emb.tensors().items()} == {k: v.shape for k, v in first.tensors().items()}
    core.train_codes_(model)
    kept = model.emb.table()
    core.settle_codes_(model, keep={"emb": kept})  # the table it came from, where recovery did not win
    assert model.emb is kept


def test_code_training_leaves_tied_and_codeless_tables_alone() -> None:
    tied = TinyLM()
    core.compress_(tied, core.make_spec("pq", {"subvector": 4, "centroids": 16, "iterations": 4}))
    assert core.train_codes_(tied) == [] and not isinstance(tied.emb, CodeTraining)
    low = Untied()
    core.compress_(low, core.make_spec("svd", {"rank": 8}))
    assert core.train_codes_(low) == [] and core.settle_codes_(low) == []
