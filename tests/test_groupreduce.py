import math
from pathlib import Path

import numpy as np
import pytest
import torch

from embcompress import load_checkpoint
from embcompress.classifier import load_classifier
from embcompress.errors import InputError
from embcompress.factorize import factorize
from embcompress.groupreduce import group_reduce, groups_bytes
from embcompress.modules import GroupedFactorizedEmbedding
from embcompress.svd import factorize_matrix, factorize_weighted
from embcompress.train.loop import TrainConfig
from embcompress.train.run import train_classifier
from embcompress.weighting import load_counts
from tests.builders import low_rank_table, write_sentiment_jsonl


def _zipf_weights(V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1000.0 / torch.arange(1, V + 1, dtype=torch.float64))[torch.randperm(V, generator=g)] + 1.0


def _weighted_rel(W: torch.Tensor, approx: torch.Tensor, w: torch.Tensor) -> float:
    err = ((W.double() - approx.double()) ** 2).sum(1)
    return math.sqrt(float((w * err).sum() / (w * (W.double() ** 2).sum(1)).sum()))


def _dense(f) -> torch.Tensor:
    return GroupedFactorizedEmbedding.from_factors(f.a, f.b, f.groups).dense_weight().detach()


def test_group_reduce_beats_plain_and_weighted_svd_at_the_same_budget() -> None:
    V, d, k = 400, 24, 4
    W = low_rank_table(V, d, 24, seed=1, noise=0.1)
    w = _zipf_weights(V)
    budget = k * (V + d)
    g = group_reduce(W, w, budget=budget, blocks=4, rounds=3)
    assert g.params + math.ceil(groups_bytes(V) / 4) <= budget
    assert g.ranks[0] == max(g.ranks)  # the most frequent block gets the most rank
    plain = factorize_matrix(W, k)
    weighted = factorize_weighted(W, k, w)
    ours = _weighted_rel(W, _dense(g), w)
    assert ours == pytest.approx(g.weighted_rel_error, rel=1e-4)
    assert ours < _weighted_rel(W, weighted.a @ weighted.b, w) < _weighted_rel(W, plain.a @ plain.b, w)
    assert g.rel_error == pytest.approx(float(torch.linalg.norm(W - _dense(g)) / torch.linalg.norm(W)), rel=1e-4)


def test_refinement_never_raises_the_weighted_error_and_keeps_block_sizes() -> None:
    W = low_rank_table(300, 16, 16, seed=2, noise=0.2)
    w = _zipf_weights(300, seed=2)
    start = group_reduce(W, w, budget=5 * 316, blocks=3, rounds=0)
    refined = group_reduce(W, w, budget=5 * 316, blocks=3, rounds=4)
    assert refined.history[0] == pytest.approx(start.weighted_rel_error)
    assert all(b <= a for a, b in zip(refined.history, refined.history[1:]))
    assert [a.shape[0] for a in refined.a] == [a.shape[0] for a in start.a]


def test_one_block_is_the_weighted_svd() -> None:
    W = low_rank_table(120, 12, 12, seed=3, noise=0.1)
    w = _zipf_weights(120, seed=3)
    g = group_reduce(W, w, budget=3 * 132 + 30, blocks=1)  # 30 parameters pay for the 120-byte groups map
    weighted = factorize_weighted(W, 3, w)
    assert g.ranks == [3]
    assert _weighted_rel(W, _dense(g), w) == pytest.approx(_weighted_rel(W, weighted.a @ weighted.b, w), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"blocks": 0}, "--blocks"), ({"rounds": -1}, "--rounds"), ({"budget": 50}, "cannot give each")],
)
def test_group_reduce_refuses_bad_options(kwargs: dict, match: str) -> None:
    W = low_rank_table(60, 8, 8)
    options = {"budget": 2 * 68, "blocks": 4, **kwargs}
    with pytest.raises(InputError, match=match):
        group_reduce(W, torch.ones(60, dtype=torch.float64), **options)


def test_factorize_groupreduce_writes_blocks_that_load_back(classifier, tmp_path: Path) -> None:
    model, train = classifier
    counts = load_counts(model, None, None, train)
    out = tmp_path / "g.safetensors"
    result = factorize(model, reduction=0.5, method="groupreduce", counts=counts, blocks=3, output=out)
    table = result.tables[0]
    assert table.method == "groupreduce" and len(table.blocks["ranks"]) == 3
    assert table.bytes_after <= table.bytes_before * 0.5
    with load_checkpoint(out) as ckpt, load_checkpoint(model) as original:
        meta = ckpt.embcompress_meta["tables"]["embedding.weight"]
        W = original.tensor("embedding.weight")
        names = set(ckpt.names)
    assert {"embedding.weight_a.0", "embedding.weight_b.2", "embedding.weight_groups"} <= names
    assert "embedding.weight" not in names and meta["blocks"]["ranks"] == table.blocks["ranks"]
    clf = load_classifier(out)
    emb = clf.model.embedding
    assert isinstance(emb, GroupedFactorizedEmbedding) and clf.is_factorized
    rel = float(torch.linalg.norm(emb.dense_weight().detach() - W) / torch.linalg.norm(W))
    assert rel == pytest.approx(table.rel_error, rel=1e-4)
    with pytest.raises(InputError, match="--blocks"):
        factorize(model, reduction=0.5, method="groupreduce", counts=counts, blocks=0,
                  output=tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="groupreduce needs token counts"):
        factorize(model, reduction=0.5, method="groupreduce", output=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert np.isfinite(table.rel_error)


@pytest.mark.parametrize("arch", ["dan", "lstm"])
def test_groupreduce_classifier_finetunes_quantizes_and_exports(tmp_path: Path, arch: str) -> None:
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx
    from embcompress.quant import quantize
    from embcompress.train.run import finetune_classifier

    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    model = Path(train_classifier(train, None, tmp_path / "m.safetensors", arch=arch, embed_dim=16, hidden_dim=8,
                                  config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output)
    counts = load_counts(model, None, None, train)
    grouped = Path(factorize(model, reduction=0.5, method="groupreduce", counts=counts, blocks=3,
                             output=tmp_path / "g.safetensors").output)
    tuned = tmp_path / "g.ft.safetensors"
    finetune_classifier(grouped, train, None, tuned, config=TrainConfig(epochs=1, batch_size=16, device="cpu"))
    clf = load_classifier(tuned)
    assert isinstance(clf.model.embedding, GroupedFactorizedEmbedding)
    report = export_onnx(tuned, tmp_path / "g.onnx", data=train, device="cpu")
    assert report.parity.fp32_max_abs_diff < 1e-4 and report.parity.fp32_agreement == 1.0
    q = quantize(tuned, 8, tmp_path / "g.int8.safetensors")
    with torch.no_grad():
        back = load_classifier(q.output).model.embedding.dense_weight()
        W = clf.model.embedding.dense_weight()
    assert float(torch.linalg.norm(back - W) / torch.linalg.norm(W)) < 0.02


@pytest.mark.parametrize("dim, bits, fraction", [(64, 4, 0.12), (50, 2, 0.1), (96, 3, 0.08), (50, 4, 0.2)])
def test_groupreduce_kept_in_lowbit_pads_free_block_ranks_within_its_budget(dim: int, bits: int,
                                                                              fraction: float) -> None:
    """Block ranks need not be multiples of the low-bit group: each block's left factor is padded to whole groups,
    the file's bytes are lowbit's padded ones, and they fit the budget; the file loads back."""
    from embcompress import core

    V = 3000
    W = low_rank_table(V, dim, 12) + 0.05 * torch.randn(V, dim, generator=torch.Generator().manual_seed(dim))
    counts = _zipf_weights(V, seed=bits)
    budget = int(fraction * 4 * V * dim)
    spec = core.spec_for_budget("groupreduce+lowbit", V, dim, budget, {"blocks": 4}, {"bits": bits})
    assert spec.structure_config.multiple == 1  # the budget rank is not rounded to the group either
    table = core.encode_table(W, spec, core.Context(counts=counts))
    group = spec.storage_config.group_size
    assert any(k % group for k in table.ranks), table.ranks
    entry = core.table_entry(table)
    padded = sum(spec.storage_config.stored_bytes(*a.shape) + spec.storage_config.stored_bytes(*b.shape)
                 for a, b in zip(table.weight_a, table.weight_b)) + V
    assert entry["bytes"] == padded <= budget
    assert table.info()["rel_error"] < 0.5
    tensors = core.table_tensors(table)
    back = core.table_from_tensors(entry, tensors)
    with torch.no_grad():
        served, loaded = table(torch.arange(V)), back(torch.arange(V))
    # within lowbit's re-quantization of already decoded values (not bit-exact, as for svd+lowbit)
    assert float((loaded - served).norm() / served.norm()) < 0.02
