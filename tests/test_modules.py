from pathlib import Path

import pytest
import torch
from torch import nn

from embcompress import FactorizedEmbedding, compress_embeddings, factorize, load_factorized
from embcompress.errors import InputError, TableError
from embcompress.modules import GroupedFactorizedEmbedding, TiedFactorizedLinear
from tests.builders import low_rank_table


class Classifier(nn.Module):
    def __init__(self, V: int = 600, d: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(V, d, padding_idx=0)
        self.out = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(ids).mean(1))


class TinyLM(nn.Module):
    def __init__(self, V: int = 500, d: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(8, d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.wte(ids) + self.wpe.weight[: ids.shape[1]])


def test_forward_is_wa_rows_times_wb() -> None:
    emb = FactorizedEmbedding(50, 8, 3, padding_idx=0)
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    out = emb(ids)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, emb.weight_a[ids] @ emb.weight_b)
    assert torch.count_nonzero(out[0, 0]) == 0


def test_padding_row_gets_no_gradient() -> None:
    emb = FactorizedEmbedding(20, 4, 2, padding_idx=0)
    emb(torch.tensor([[0, 1, 0]])).sum().backward()
    assert torch.count_nonzero(emb.weight_a.grad[0]) == 0
    assert torch.count_nonzero(emb.weight_a.grad[1]) > 0


def test_from_dense_is_optimal_and_keeps_zero_padding_row() -> None:
    W = low_rank_table(300, 20, 6)
    W[0] = 0
    emb = FactorizedEmbedding.from_dense(W, 6, padding_idx=0)
    s = torch.linalg.svdvals(W.double())
    optimum = float(s[6:].square().sum().sqrt() / s.square().sum().sqrt())
    err = float((W.double() - emb.dense_weight().detach().double()).norm() / W.double().norm())
    assert err == pytest.approx(optimum, rel=1e-4)
    assert torch.count_nonzero(emb.dense_weight()[0]) == 0


def test_compress_embeddings_swaps_in_place_and_keeps_outputs_close() -> None:
    torch.manual_seed(0)
    model = Classifier()
    with torch.no_grad():
        model.embedding.weight.copy_(low_rank_table(600, 16, 4, noise=0.0))
        model.embedding.weight[0] = 0
    ids = torch.randint(0, 600, (5, 7))
    before = model(ids)
    reports = compress_embeddings(model, rank=4)
    assert isinstance(model.embedding, FactorizedEmbedding)
    assert model.embedding.padding_idx == 0
    assert reports[0].name == "embedding" and reports[0].rank == 4
    torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=1e-4)


def test_tied_output_layer_stays_tied() -> None:
    model = TinyLM()
    compress_embeddings(model, reduction=0.5)
    assert isinstance(model.wte, FactorizedEmbedding)
    assert isinstance(model.wpe, nn.Embedding)  # positions are left alone
    assert isinstance(model.lm_head, TiedFactorizedLinear)
    assert model.lm_head.tied_to is model.wte
    ids = torch.randint(0, 500, (2, 5))
    logits = model(ids)
    h = model.wte(ids) + model.wpe.weight[:5]
    torch.testing.assert_close(logits, h @ model.wte.dense_weight().T, atol=1e-5, rtol=1e-4)
    names = dict(model.named_parameters())
    assert "lm_head.weight" not in names and "wte.weight_a" in names


def test_compress_embeddings_errors() -> None:
    with pytest.raises(TableError, match="matches no nn.Embedding"):
        compress_embeddings(Classifier(), rank=2, tables=["nope"])
    with pytest.raises(InputError, match="exactly one"):
        compress_embeddings(Classifier())


def test_factorized_checkpoint_loads_back_into_a_model(tmp_path: Path) -> None:
    model = TinyLM()
    path = tmp_path / "lm.pt"
    torch.save(model.state_dict(), path)
    result = factorize(path, reduction=0.5, output=tmp_path / "lm.r50.safetensors")
    assert result.tables[0].tied == {"lm_head.weight": "same storage"}
    fresh = TinyLM()
    load_factorized(fresh, result.output)
    assert isinstance(fresh.lm_head, TiedFactorizedLinear)
    ids = torch.randint(0, 500, (2, 5))
    expected = TinyLM()
    expected.load_state_dict(model.state_dict())
    compress_embeddings(expected, reduction=0.5)
    torch.testing.assert_close(fresh(ids), expected(ids), atol=1e-4, rtol=1e-4)


# --- GroupedFactorizedEmbedding (GroupReduce blocks) --------------------------------------------------------


def _grouped(V: int = 40, d: int = 6, padding_idx: int | None = 0) -> GroupedFactorizedEmbedding:
    torch.manual_seed(0)
    groups = torch.randint(0, 3, (V,))
    sizes = torch.bincount(groups, minlength=3).tolist()
    return GroupedFactorizedEmbedding([2, 3, 1], sizes, d, padding_idx, groups=groups)


def test_grouped_forward_and_tied_logits_equal_the_dense_table() -> None:
    emb = _grouped()
    W = emb.dense_weight().detach()
    ids = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(emb(ids), W[ids])
    h = torch.randn(4, 6)
    bias = torch.randn(40)
    torch.testing.assert_close(emb.logits(h, bias), h @ W.T + bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(TiedFactorizedLinear(emb, bias)(h), h @ W.T + bias, atol=1e-5, rtol=1e-5)
    for c in range(3):  # each block's rows follow token id order
        torch.testing.assert_close(W[emb.weight_groups == c], emb.weight_a[c].detach() @ emb.weight_b[c].detach())


def test_grouped_padding_row_is_zero_and_gets_no_gradient() -> None:
    emb = _grouped()
    assert torch.count_nonzero(emb(torch.tensor([0]))) == 0
    emb(torch.tensor([[0, 0, 1, 2]])).sum().backward()
    c = int(emb.weight_groups[0])
    assert torch.count_nonzero(emb.weight_a[c].grad[emb.rows[0]]) == 0
    assert any(torch.count_nonzero(a.grad) for a in emb.weight_a)


def test_grouped_state_dict_round_trip_recomputes_the_index() -> None:
    emb = _grouped(padding_idx=None)
    state = emb.state_dict()
    assert set(state) == {"weight_groups", *(f"weight_{x}.{c}" for x in "ab" for c in range(3))}
    assert state["weight_groups"].dtype == torch.uint8  # one byte a row on disk
    fresh = GroupedFactorizedEmbedding(emb.ranks, [a.shape[0] for a in emb.weight_a], 6)  # contiguous until loaded
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.dense_weight(), emb.dense_weight())
    bad = dict(state, weight_groups=torch.zeros(40, dtype=torch.uint8))  # every row in block 0: sizes disagree
    with pytest.raises(TableError, match="block sizes"):
        fresh.load_state_dict(bad)


def test_groupreduce_checkpoint_loads_back_into_a_model_with_its_tie(tmp_path: Path) -> None:
    import numpy as np

    from embcompress.weighting import Counts

    model = TinyLM()
    path = tmp_path / "lm.pt"
    torch.save(model.state_dict(), path)
    counts = Counts(np.arange(500, 0, -1, dtype=np.float64), "test", 1000)
    result = factorize(path, reduction=0.5, method="groupreduce", counts=counts, blocks=4,
                       output=tmp_path / "lm.g.safetensors")
    fresh = TinyLM()
    load_factorized(fresh, result.output)
    assert isinstance(fresh.wte, GroupedFactorizedEmbedding) and fresh.lm_head.tied_to is fresh.wte
    ids = torch.randint(0, 500, (2, 5))
    W = fresh.wte.dense_weight()
    expected = (W[ids] + fresh.wpe.weight[:5]) @ W.T
    torch.testing.assert_close(fresh(ids), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        rel = float(torch.linalg.norm(W - model.wte.weight) / torch.linalg.norm(model.wte.weight))
    assert rel == pytest.approx(result.tables[0].rel_error, rel=1e-4)


def test_compress_embeddings_by_groupreduce_keeps_the_tie() -> None:
    model = TinyLM()
    counts = 1000.0 / torch.arange(1, 501, dtype=torch.float64)
    reports = compress_embeddings(model, reduction=0.5, method="groupreduce", weights=counts, blocks=4,
                                  tables=["wte"])
    assert isinstance(model.wte, GroupedFactorizedEmbedding) and model.lm_head.tied_to is model.wte
    assert reports[0].rank == model.wte.rank and reports[0].tied == ("lm_head",)
    assert sum(p.numel() for p in model.wte.parameters()) <= 0.5 * 500 * 12
    with pytest.raises(TableError, match="needs row weights"):
        compress_embeddings(TinyLM(), reduction=0.5, method="groupreduce")
