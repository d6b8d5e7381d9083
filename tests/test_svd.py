"""Tests of the SVD engine (embcompress.svd): exactness against the Eckart-Young optimum on controlled spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embcompress import svd
from embcompress.errors import InputError

V, D = 2000, 64


def _table(s: list[float] | torch.Tensor, *, rows: int = V, cols: int = D, offset: float = 0.0, seed: int = 0
           ) -> torch.Tensor:
    """U diag(s) V^T (float64) from random orthogonal factors, plus the same row mu added to every row, with
    |mu| sqrt(rows) = ``offset`` * s1 (a mean direction of singular value ~ offset * s1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    r = s.numel()
    U = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64)).Q
    Vt = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64)).Q
    W = (U * s) @ Vt.T
    if offset:
        mu = torch.randn(cols, generator=g, dtype=torch.float64)
        W = W + mu / mu.norm() * offset * float(s[0]) / math.sqrt(rows)
    return W


DECAY = [1 / math.sqrt(i) for i in range(1, D + 1)]
SPECTRA = {
    "decaying": _table(DECAY),
    "mean": _table(DECAY, offset=300.0),  # one dominant mean direction, s1/s2 ~ 400
    "flat": _table([1.0] * D),
    "rank10": _table([1.0 / i for i in range(1, 11)]),
    "steep": _table([10 ** (-i / 5) for i in range(D)]),  # 13 decades: the float32 Gram alone is not enough
}


F32 = {name: W.float() for name, W in SPECTRA.items()}
_SVDVALS: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

# The checks below use numpy: alternating torch's OpenMP kernels with the engine's numpy BLAS calls makes both
# thread pools wait for each other, which slows a busy machine down a lot.


def _f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().to(torch.float64).numpy()


def _optimum(W: torch.Tensor, k: int) -> float:
    """sqrt(sum_{i>k} s_i^2) from a float64 SVD of W (cached per tensor: the tests reuse their tables)."""
    key = id(W)
    if key not in _SVDVALS or _SVDVALS[key][0] is not W:
        _SVDVALS[key] = (W, np.linalg.svd(_f64(W), compute_uv=False))
    return float(np.sqrt((_SVDVALS[key][1][k:] ** 2).sum()))


def _error(W: torch.Tensor, f: svd.Factors) -> float:
    return float(np.linalg.norm(_f64(W) - _f64(f.a) @ _f64(f.b)))


def _floor(W: torch.Tensor) -> float:
    """The error a perfect SVD still shows once its factors are rounded to W's dtype."""
    return 4 * torch.finfo(W.dtype).eps / 2 * float(np.linalg.norm(_f64(W)))


def _norm(W: torch.Tensor) -> float:
    return float(np.linalg.norm(_f64(W)))


def _assert_orthonormal(a: torch.Tensor, tol: float) -> None:
    a = _f64(a)
    a = a[:, np.linalg.norm(a, axis=0) > 0]
    assert np.abs(a.T @ a - np.eye(a.shape[1])).max() < tol


def _blocks_of(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(svd, "_BLOCK_BYTES", rows * D * 4)
    monkeypatch.setattr(svd, "_MIN_BLOCKS", 1)


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    """One block takes the float64 Gram directly; blocks of 256 rows exercise the float32 route."""
    _blocks_of(monkeypatch, V if request.param == "one block" else 256)
    return request.param


@pytest.mark.parametrize("name", list(SPECTRA))
def test_exact_error_is_the_optimum(name, blocks):
    W = F32[name]
    norm = _norm(W)
    for k in (1, 5, 10, 32):
        f = svd.factorize_matrix(W, k)
        opt, err = _optimum(W, k), _error(W, f)
        assert abs(err - opt) <= 1e-4 * opt + _floor(W), k
        assert f.rel_error == pytest.approx(err / norm, rel=1e-4, abs=_floor(W) / norm), k
        _assert_orthonormal(f.a, 1e-5)
        assert f.method == "exact"
        assert f.a.shape == (V, k) and f.b.shape == (k, D)
        s = f.singular_values
        assert s.dtype == torch.float64 and s.device.type == "cpu" and s.numel() == D
        assert bool((s[:-1] >= s[1:]).all())


def test_dominant_mean_stays_on_the_float32_route(monkeypatch):
    _blocks_of(monkeypatch, 256)
    W = F32["mean"]
    s = np.linalg.svd(_f64(W), compute_uv=False)
    assert s[0] / s[1] > 300
    spec = svd.spectrum(W)
    for k in (1, 8, 32):
        f = spec.factors(W, k)
        assert abs(_error(W, f) - _optimum(W, k)) <= 1e-6 * _optimum(W, k)  # far inside the tolerance
    assert spec.route == "float32"


def test_steep_spectrum_moves_to_a_more_precise_route(monkeypatch):
    _blocks_of(monkeypatch, 256)
    W = F32["steep"]
    spec = svd.spectrum(W)
    assert spec.route == "float32"
    f = spec.factors(W, 32)
    assert spec.route in ("float64", "qr")
    assert abs(_error(W, f) - _optimum(W, 32)) <= 1e-4 * _optimum(W, 32) + _floor(W)


def test_float64_table_beyond_the_float64_gram_uses_qr():
    W = _table([10 ** (-i / 3) for i in range(D)])  # 21 decades
    spec = svd.spectrum(W)
    assert spec.route == "float64"
    f = spec.factors(W, 40)
    assert spec.route == "qr"
    opt = _optimum(W, 40)
    assert abs(_error(W, f) - opt) <= 1e-4 * opt + _floor(W)
    _assert_orthonormal(f.a, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_are_preserved(dtype):
    W = SPECTRA["decaying"].to(dtype)
    f = svd.factorize_matrix(W, 8)
    assert f.a.dtype == dtype and f.b.dtype == dtype
    opt, err = _optimum(W, 8), _error(W, f)
    # the factors are rounded to W's dtype: a few units of its roundoff on top of the optimum
    assert abs(err - opt) <= 1e-4 * opt + 2 * math.sqrt(8) * _floor(W)
    assert f.rel_error == pytest.approx(err / _norm(W), rel=1e-3)
    _assert_orthonormal(f.a, 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps * math.sqrt(V))


def test_wide_table_by_symmetry():
    W = F32["decaying"].T  # 64 x 2000, a non-contiguous view
    for k in (1, 8, 64):
        f = svd.factorize_matrix(W, k)
        assert f.a.shape == (D, k) and f.b.shape == (k, V)
        opt, err = _optimum(W, k), _error(W, f)
        assert abs(err - opt) <= 1e-4 * opt + _floor(W)
        _assert_orthonormal(f.a, 1e-5)
    f = svd.factorize_matrix(W.contiguous(), 8, method="randomized")
    assert f.a.shape == (D, 8) and f.b.shape == (8, V)


def test_zero_table_and_zero_singular_values():
    f = svd.factorize_matrix(torch.zeros(100, 20), 5)
    assert torch.equal(f.a, torch.zeros(100, 5)) and torch.equal(f.b, torch.zeros(5, 20))
    assert f.rel_error == 0.0 and not f.singular_values.isnan().any()
    assert svd.spectrum(torch.zeros(100, 20)).energy_kept(3) == 1.0
    W = F32["rank10"]
    f = svd.factorize_matrix(W, 20)
    assert not (f.a.isnan().any() or f.b.isnan().any())
    assert _error(W, f) <= _floor(W)
    assert torch.equal(f.a[:, 10:], torch.zeros(V, 10))  # U's columns for s_i == 0 are zero
    _assert_orthonormal(f.a, 1e-5)


@pytest.mark.parametrize("name", ["decaying", "mean", "rank10"])
def test_spectrum_singular_values_and_energy(name, blocks):
    W = F32[name]
    spec = svd.spectrum(W)
    ref = np.linalg.svd(_f64(W), compute_uv=False)
    assert spec.singular_values.dtype == torch.float64 and spec.singular_values.shape == (D,)
    s = spec.singular_values.numpy()
    if blocks == "one block":  # float64 Gram: tight on the singular values themselves
        assert np.abs(s - ref).max() <= 1e-7 * ref[0]
    else:  # float32 Gram: tight on s^2 (what energies use); a zero s_i shows as ~sqrt(eps) * s1
        assert np.abs(s**2 - ref**2).max() <= 1e-6 * ref[0] ** 2
    for k in (0, 1, 10, D):
        want = float((ref[:k] ** 2).sum() / (ref**2).sum())
        assert spec.energy_kept(k) == pytest.approx(want, abs=1e-6)
    assert spec.energy_kept(D) == 1.0


def test_spectrum_is_reusable_for_several_k():
    W = F32["decaying"]
    spec = svd.spectrum(W)
    for k in (3, 17):
        f = svd.factorize_matrix(W, k, spectrum=spec)
        g = svd.factorize_matrix(W, k)
        assert torch.allclose(f.a @ f.b, g.a @ g.b, atol=1e-6)
        assert f.rel_error == pytest.approx(g.rel_error, rel=1e-6)


def test_randomized_is_close_and_deterministic():
    W = F32["decaying"]
    k = 10
    f = svd.factorize_matrix(W, k, method="randomized", seed=3)
    opt, err = _optimum(W, k), _error(W, f)
    assert err <= 1.02 * opt
    assert f.rel_error == pytest.approx(err / _norm(W), rel=1e-4)
    assert f.method == "randomized" and f.singular_values.numel() == k
    _assert_orthonormal(f.a, 1e-5)
    g = svd.factorize_matrix(W, k, method="randomized", seed=3)
    assert torch.equal(f.a, g.a) and torch.equal(f.b, g.b)
    h = svd.factorize_matrix(F32["mean"], k, method="randomized")
    assert _error(F32["mean"], h) <= 1.02 * _optimum(F32["mean"], k)


def test_randomized_streams_over_blocks(monkeypatch):
    _blocks_of(monkeypatch, 256)
    W = F32["mean"]
    f = svd.factorize_matrix(W, 10, method="randomized")
    assert _error(W, f) <= 1.02 * _optimum(W, 10)


def test_parameter_with_grad_is_accepted():
    p = torch.nn.Parameter(F32["decaying"])
    f = svd.factorize_matrix(p, 4)
    assert not f.a.requires_grad and not f.b.requires_grad


def test_accelerator_code_path_on_cpu(monkeypatch):
    """The torch work arrays used on CUDA, exercised on CPU: same results as the numpy path."""
    init = svd._Rows.__init__

    def torch_arrays(self, W):
        init(self, W)
        self.cpu = False

    monkeypatch.setattr(svd._Rows, "__init__", torch_arrays)
    _blocks_of(monkeypatch, 256)
    for name, k in (("mean", 8), ("steep", 32), ("rank10", 20)):
        W = F32[name]
        f = svd.factorize_matrix(W, k)
        assert abs(_error(W, f) - _optimum(W, k)) <= 1e-4 * _optimum(W, k) + _floor(W)
        _assert_orthonormal(f.a, 1e-5)
    W = _table([10 ** (-i / 3) for i in range(D)])
    spec = svd.spectrum(W)
    f = spec.factors(W, 40)
    assert spec.route == "qr" and abs(_error(W, f) - _optimum(W, 40)) <= 1e-4 * _optimum(W, 40) + _floor(W)
    W = SPECTRA["decaying"].to(torch.bfloat16).T
    f = svd.factorize_matrix(W, 8)
    assert f.a.dtype == torch.bfloat16 and f.a.shape == (D, 8)
    assert f.rel_error == pytest.approx(_error(W, f) / _norm(W), rel=1e-3)
    W = F32["mean"]
    f = svd.factorize_matrix(W, 10, method="randomized")
    assert _error(W, f) <= 1.02 * _optimum(W, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", svd.METHODS)
def test_cuda_device_is_preserved(method):
    W = F32["mean"].cuda()
    f = svd.factorize_matrix(W, 8, method=method)
    assert f.a.device == W.device and f.b.device == W.device
    assert f.singular_values.device.type == "cpu"
    tol = 1e-4 if method == "exact" else 2e-2
    assert _error(W.cpu(), f) <= (1 + tol) * _optimum(W.cpu(), 8) + _floor(W)


@pytest.mark.parametrize(
    "W, k",
    [
        (torch.randn(10, 4), 0),
        (torch.randn(10, 4), 5),
        (torch.randn(10, 4), 2.0),
        (torch.randn(10, 4), True),
        (torch.randn(10), 1),
        (torch.randn(2, 3, 4), 1),
        (torch.ones(10, 4, dtype=torch.int64), 1),
        (torch.zeros(0, 4), 1),
    ],
)
def test_bad_input_raises(W, k):
    with pytest.raises(InputError):
        svd.factorize_matrix(W, k)


def test_bad_method_and_mismatched_spectrum_raise():
    W = torch.randn(10, 4)
    with pytest.raises(InputError, match="method"):
        svd.factorize_matrix(W, 2, method="lanczos")
    spec = svd.spectrum(W)
    with pytest.raises(InputError):
        spec.factors(torch.randn(11, 4), 2)
    with pytest.raises(InputError):
        spec.energy_kept(5)
    with pytest.raises(InputError):
        svd.spectrum(torch.randn(3))


def test_a_rank_multiple_out_of_budget_says_so():
    """With the rank a multiple of a low-bit group, the refusal names that multiple and what it needs, not rank 1
    (whose bytes the budget holds)."""
    from embcompress.methods.base import BudgetError
    from embcompress.methods.svd import SVDConfig

    rows, dim = 14566, 300
    budget = 800864  # rank 13 fits, rank 32 does not
    assert budget // (4 * (rows + dim)) == 13
    with pytest.raises(BudgetError) as info:
        SVDConfig.for_budget(rows, dim, budget, multiple=32)
    message = str(info.value)
    assert "multiple of 32" in message and f"{32 * 4 * (rows + dim)}" in message and "rank 1 " not in message
    assert SVDConfig.for_budget(rows, dim, budget, multiple=8).rank == 8
    with pytest.raises(BudgetError, match=f"rank 1 needs {4 * (rows + dim)} bytes"):
        SVDConfig.for_budget(rows, dim, 4 * (rows + dim) - 1)
