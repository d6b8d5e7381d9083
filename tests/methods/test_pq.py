"""The ``pq`` structure: lookups, file round trip, bytes, error trends, count weighting, faiss parity, options,
budgets, padding, recovery and ONNX parity."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from safetensors.torch import load, save

from embcompress.errors import InputError
from embcompress.methods import pq
from embcompress.methods.base import BudgetError, Context, get


def _table(rows: int = 600, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Anisotropic rows with a shared offset, like a trained embedding table."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, 0.1, dim)
    return torch.randn(rows, dim, generator=g) * scales @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0] \
        + 0.3 * torch.randn(dim, generator=g)


def _encode(w: torch.Tensor, backend: str = "torch", counts: torch.Tensor | None = None,
            padding_idx: int | None = None, **options: object) -> pq.PQTable:
    config = pq.PQConfig(**{"iterations": 10, **options})
    return pq.encode_pq(w, config, Context(counts=counts, padding_idx=padding_idx), backend=backend)


def _entry(table: pq.PQTable) -> dict:
    return {"config": table.config().to_dict(), "shape": [table.num_embeddings, table.embedding_dim],
            "padding_idx": table.padding_idx}


def test_registered() -> None:
    method = get("pq")
    assert method.kind == "structure" and method.config is pq.PQConfig and method.table is pq.PQTable
    table = method.encode(_table(), pq.PQConfig(iterations=2, centroids=16), Context())
    assert isinstance(table, pq.PQTable)


def test_forward_matches_dense_rows() -> None:
    table = _encode(_table(), centroids=32)
    ids = torch.randint(0, 600, (3, 7), generator=torch.Generator().manual_seed(1))
    dense = table.dense_weight()
    assert dense.shape == (600, 32)
    out = table(ids)
    assert out.shape == (3, 7, 32)
    assert torch.equal(out, dense[ids])
    assert 0 < table.info()["rel_error"] < 1


def test_file_round_trip_identical() -> None:
    table = _encode(_table(), centroids=64)
    tensors = table.tensors()
    assert tensors["codes"].dtype == torch.uint8 and tensors["codes"].shape == (600, 8)
    assert tensors["codebooks"].dtype == torch.float16 and tensors["codebooks"].shape == (8, 64, 4)
    again = pq.PQTable.from_tensors(load(save(tensors)), _entry(table))
    ids = torch.arange(600)
    assert torch.equal(again(ids), table(ids))
    assert again.config() == table.config()


def test_stored_bytes_as_planned() -> None:
    for s, k, dtype in ((4, 256, "float16"), (2, 64, "float32"), (8, 16, "bfloat16")):
        config = pq.PQConfig(subvector=s, centroids=k, iterations=2, codebook_dtype=dtype)
        table = pq.encode_pq(_table(), config, Context(), backend="torch")
        nbytes = sum(t.numel() * t.element_size() for t in table.tensors().values())
        assert table.stored_bytes() == nbytes == config.stored_bytes(600, 32)
        item = 4 if dtype == "float32" else 2
        assert nbytes == 600 * 32 // s + (32 // s) * k * s * item


def test_error_falls_with_centroids_and_smaller_subvectors() -> None:
    w = _table(rows=1200)
    by_k = [_encode(w, centroids=k).info()["rel_error"] for k in (8, 32, 128)]
    assert by_k[0] > by_k[1] > by_k[2], by_k
    by_s = [_encode(w, subvector=s, centroids=32).info()["rel_error"] for s in (8, 4, 2)]
    assert by_s[0] > by_s[1] > by_s[2], by_s


def test_counts_lower_the_error_of_frequent_rows() -> None:
    w = _table(rows=1500)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(1500)
    frequent = torch.randperm(1500, generator=g)[:100]
    counts[frequent] = 1000.0 / torch.arange(1, 101).float()  # Zipf-like head; the rest never seen
    plain = _encode(w, counts=counts, weighted=False, centroids=16)
    weighted = _encode(w, counts=counts, centroids=16)
    assert weighted.info()["weighted"] and not plain.info()["weighted"]

    def err(t: pq.PQTable) -> float:
        return float((t.dense_weight().detach()[frequent] - w[frequent]).norm() / w[frequent].norm())

    assert err(weighted) < 0.9 * err(plain), (err(weighted), err(plain))
    assert weighted.info()["rel_error"] < 1.5 * plain.info()["rel_error"]  # the rest is not abandoned


def test_row_weights() -> None:
    assert pq.row_weights(None, 3) is None
    assert pq.row_weights(torch.tensor([5.0, 5.0, 5.0]), 3) is None
    w = pq.row_weights(torch.tensor([0.0, 1.0, 100.0]), 3)
    assert torch.allclose(w / w[1], torch.tensor([0.1 ** 0.5, 1.0, 10.0]))
    with pytest.raises(InputError, match="cover 2 rows"):
        pq.row_weights(torch.ones(2), 3)
    with pytest.raises(InputError, match="non-negative"):
        pq.row_weights(torch.tensor([1.0, -1.0, 1.0]), 3)


def test_torch_kmeans_within_two_percent_of_faiss() -> None:
    pytest.importorskip("faiss")
    w = _table(rows=3000, dim=16, seed=5)
    for options in ({"subvector": 4, "centroids": 32}, {"subvector": 2, "centroids": 64}):
        ours = _encode(w, backend="torch", iterations=20, **options).info()
        theirs = _encode(w, backend="faiss", iterations=20, **options).info()
        assert theirs["backend"] == "faiss"
        assert ours["rel_error"] <= 1.02 * theirs["rel_error"], (ours, theirs)


def test_faiss_subspaces_on_threads_match_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subspaces run on a thread pool with faiss's BLAS distances: the codebooks are those faiss finds one
    subspace at a time with its own settings, the codes the nearest centroids torch finds, and faiss's settings
    are given back."""
    faiss = pytest.importorskip("faiss")
    import numpy as np

    w = _table(rows=1500, dim=12, seed=3)
    before = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
    monkeypatch.setattr(pq, "faiss_threads", lambda: 2)
    for s in (2, 3, 12):
        x = w.reshape(-1, 12 // s, s).transpose(0, 1).contiguous()
        books = pq.kmeans_faiss(x, None, 16, 5, seed=7)
        assert (faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()) == before
        for j in range(x.shape[0]):
            km = faiss.Kmeans(s, 16, niter=5, seed=7 + j, verbose=False, max_points_per_centroid=1500,
                              min_points_per_centroid=1)
            km.train(np.ascontiguousarray(x[j].numpy()))
            assert torch.allclose(books[j], torch.from_numpy(km.centroids), atol=1e-4), (s, j)
        assert torch.equal(pq.encode_rows_faiss(w, books), pq.encode_rows(w, books))


def test_bad_options_refused() -> None:
    for options, message in (({"centroids": 257}, "between 2 and 256"), ({"centroids": 1}, "between 2 and 256"),
                             ({"subvector": 0}, "at least 1"), ({"codebook_dtype": "int8"}, "codebook_dtype"),
                             ({"iterations": -1}, "at least 0"), ({"subvector": 2.5}, "integer")):
        with pytest.raises(InputError, match=message):
            pq.PQConfig(**options)
    with pytest.raises(InputError, match="subvector 5 does not divide the table's 32 dims"):
        _encode(_table(), subvector=5)
    with pytest.raises(InputError, match="centroids 256 is above the table's 100 rows"):
        _encode(_table(rows=100), centroids=256)
    with pytest.raises(InputError, match="unknown option"):
        pq.PQConfig.from_dict({"rank": 3})
    with pytest.raises(InputError, match="NaN"):
        _encode(torch.full((300, 8), float("nan")), centroids=4)
    with pytest.raises(InputError, match="backend"):
        _encode(_table(), backend="cuda")


def test_for_budget() -> None:
    rows, dim = 30522, 384
    f32 = 4 * rows * dim
    config = pq.PQConfig.for_budget(rows, dim, int(0.07 * f32))
    assert (config.subvector, config.centroids) == (4, 256)
    assert pq.PQConfig.for_budget(rows, dim, int(0.13 * f32)).subvector == 2
    tight = pq.PQConfig.for_budget(rows, dim, int(0.0345 * f32))
    assert tight.subvector == 8 and tight.stored_bytes(rows, dim) <= 0.0345 * f32
    smaller_k = pq.PQConfig.for_budget(1000, 16, 1000 * 16 // 4 + 4 * 128 * 4 * 2)
    assert (smaller_k.subvector, smaller_k.centroids) == (4, 128)
    assert pq.PQConfig.for_budget(rows, dim, int(0.07 * f32), centroids=16).centroids == 16
    assert pq.PQConfig.for_budget(200, 16, 12000).centroids == 128  # K <= V
    with pytest.raises(BudgetError, match="pq needs at least"):
        pq.PQConfig.for_budget(rows, dim, rows)
    with pytest.raises(BudgetError, match="not below the float32"):
        pq.PQConfig.for_budget(rows, dim, f32)


def test_padding_row() -> None:
    w = _table()
    w[0] = 0.0
    table = _encode(w, padding_idx=0, centroids=16)
    assert table.config().zero_padding is True
    assert torch.equal(table(torch.tensor([[0, 1]]))[0, 0], torch.zeros(32))
    assert torch.equal(table.dense_weight()[0], torch.zeros(32))
    again = pq.PQTable.from_tensors(table.tensors(), _entry(table))
    assert torch.equal(again(torch.arange(600)), table(torch.arange(600)))
    kept = _encode(_table(), padding_idx=0, centroids=16)  # a non-zero padding row is served as encoded
    assert kept.config().zero_padding is False and kept.dense_weight()[0].abs().sum() > 0


def test_codebooks_are_recoverable() -> None:
    table = _encode(_table(), centroids=16)
    params = table.recoverable()
    assert len(params) == 1 and params[0] is table.codebooks
    table(torch.tensor([1, 2, 3])).sum().backward()
    assert table.codebooks.grad is not None and table.codebooks.grad.abs().sum() > 0
    assert "codes" not in dict(table.named_parameters())


def test_onnx_parity() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Wrap(torch.nn.Module):
        def __init__(self, table: torch.nn.Module) -> None:
            super().__init__()
            self.table = table

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table(ids)

    table = _encode(_table(), centroids=32, subvector=2)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(table).eval(), (torch.zeros(2, 3, dtype=torch.int64),), f, dynamo=False,
                          opset_version=17, input_names=["ids"], output_names=["out"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    graph = __import__("onnx").load_from_string(f.getvalue()).graph
    stored = {i.name for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in stored]
    assert len(gathers) == 2  # the lowering bench/quantize.py times: a row's codes, then the centroids they name
    assert not {"MatMul", "Gemm", "Mul"} & {n.op_type for n in graph.node}
    ids = torch.randint(0, 600, (4, 9), generator=torch.Generator().manual_seed(2))
    got = session.run(None, {"ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), table(ids).detach(), rtol=1e-6, atol=1e-6)


def test_fused_kernel_agrees_with_matmul() -> None:
    """The elementwise kernel torch.compile fuses for large tables (run here uncompiled, through the padded-block
    path) names the same centroids as the batched matmul."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 1000, 4, generator=g)
    c = torch.randn(6, 32, 4, generator=g)
    eager = pq.assign(x, c, pq._nearest_eager)
    fused = pq.assign(x, c, pq._nearest_fused)
    assert torch.equal(eager, fused)
    assert torch.equal(eager, torch.cdist(x, c).argmin(-1))


def test_code_training_reads_what_the_file_will_hold() -> None:
    w = _table()
    table = _encode(w, centroids=16)
    training = table.code_training(w)
    ids = torch.tensor([[1, 5, 9], [2, 2, 599]])
    out = training(ids)
    assert torch.equal(out, training.table()(ids))  # the forward reads the codes and fp16 codebooks it will store
    assert float(training.penalty.detach()) > 0  # w is not on its centroids
    out.sum().backward()  # straight through: the float rows get the gradient of their codes' rows
    assert training.weight.grad is not None and training.weight.grad[[1, 2, 5, 9, 599]].abs().sum() > 0
    assert training.weight.grad[0].abs().sum() == 0


def test_code_training_reassigns_codes_in_the_same_bytes() -> None:
    w = _table()
    table = _encode(w, centroids=16)
    moved = w.clone()
    moved[:50] = _table(seed=3)[:50]  # rows that training carried elsewhere
    training = table.code_training(moved)
    again = training.table()
    before, after = table.tensors(), again.tensors()
    assert {k: (v.shape, v.dtype) for k, v in before.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    assert not torch.equal(after["codes"][:50], before["codes"][:50])
    # the re-fitted codebooks serve the moved rows better than the first codes do
    assert (again.dense_weight() - moved).norm() < (table.dense_weight() - moved).norm()
    assert again.config() == table.config() and again.info()["codes_trained"] is True
    loaded = pq.PQTable.from_tensors(load(save(after)), _entry(again))
    assert torch.equal(loaded.dense_weight(), again.dense_weight())


def test_code_training_refits_its_codebooks_every_few_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pq, "REFIT_EVERY", 2)
    table = _encode(_table(), centroids=16)
    training = table.code_training()
    with torch.no_grad():
        training.weight.mul_(1.5)
    books = training.codebooks.clone()
    training.step()
    assert torch.equal(training.codebooks, books)
    training.step()
    assert not torch.equal(training.codebooks, books)


def test_code_training_start_must_match_the_table() -> None:
    table = _encode(_table(), centroids=16)
    with pytest.raises(InputError, match=r"starts from a \(600, 16\) table"):
        table.code_training(torch.zeros(600, 16))


def test_code_training_keeps_the_padding_row_zero() -> None:
    w = _table()
    w[0] = 0.0
    table = _encode(w, padding_idx=0, centroids=16)
    training = table.code_training(_table(seed=4))
    assert torch.equal(training(torch.tensor([0]))[0], torch.zeros(32))
    assert training.table().padding_idx == 0
