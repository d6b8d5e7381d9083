"""Truncated SVD of embedding tables: W (V x d) ~= a @ b with a = U_k (V x k) and b = S_k V_k^T (k x d).

The exact route works on the small side of the table. With X the tall view (W, or W^T when V < d) and n its
column count, one streaming pass over row blocks accumulates the n x n Gram matrix G = X^T X, a float64 eigh
gives its eigenvectors V_k (cheap: n is at most ~1024), and one more pass computes Y = X V_k. The columns of Y are
orthogonal with norms s_i, so U_k = Y / s_i, and the singular values of the kept directions come exactly from the
column norms of Y; a k x k Rayleigh-Ritz step makes U_k orthonormal to working precision when rounding left it
less so. The truncation error ||X - Y V_k^T|| depends only on how well V_k spans the top right singular subspace:
it equals the Eckart-Young optimum sqrt(sum_{i>k} s_i^2) when V_k is the top-k eigenspace of the true G.

Why the Gram is accurate enough, and what happens when it is not:

* A float32 Gram of a raw table loses the small directions when one direction dominates. Real tables share a
  mean offset (s1/s2 in the hundreds), and the rounding error of G, ~ eps * s1^2, swamps the gaps between the
  other eigenvalues (up to 13 % off the optimum). So every block is centred by a fixed shift m (the mean of a
  sample of rows, rounded to float32) and G = Xc^T Xc + m c^T + c m^T + V m m^T with c = Xc^T 1 is assembled in
  float64 (an identity for any m). The float32 part now carries errors ~ eps * s2^2 only; the rank-one mean term
  is exact. A ones column appended to each centred block makes the same product return c and V.
* Each block's float32 Gram comes from BLAS syrk (half the flops of X^T X as a gemm) and the blocks are summed
  in float64, so the accumulation error is that of one block, not of the whole table.
* A Gram error E costs captured energy only to second order: L ~ sum_{i<=k<j} (q_i^T E q_j)^2 / (lambda_i -
  lambda_j); it shifts the eigenvalue tail that gives rel_error to first order, by ~ sum_{j>k} q_j^T E q_j.
  E is measured rather than guessed: the block with the most energy is re-accumulated in float64 once, and its
  error scaled by sqrt(number of blocks) (rounding errors of different blocks are independent; this predicted
  the loss of a full float32 Gram within a few per cent on 250002 x 768 tests) gives both for any k. When ten
  times that could cost more than 1e-4 of the optimum (above the rounding floor of W's own dtype), the Gram is
  re-accumulated in float64 (errors 2^29 times smaller), and if even that could fail (spectra spanning ~15
  decades) the SVD of R from a streaming float64 QR of X is used, which is backward stable: exact to ~1e-16
  ||W||. Centred tables with ordinary spectra never need the fallbacks; one dominant direction that is not the
  mean (which centring cannot remove) or a rank-deficient table usually does.
* rel_error comes from the float64 eigenvalue tail sum_{i>k} lambda_i of that accurate Gram, so it stays
  accurate when it is tiny; for float16/bfloat16 tables it is measured blockwise on the factors as rounded to
  that dtype.

Accuracy is relative to the optimum down to the rounding of the returned factors: a and b are stored in W's
dtype, which adds ~eps(dtype) * ||W||_F to any error, however good the subspace.

Work buffers are row blocks of at most 16 MiB and 1/8 of the table; the exact route's peak memory above the
table is the V x k output plus a few blocks.

``method="randomized"`` is a streaming randomized subspace iteration (Halko, Martinsson & Tropp 2011) on the same
centred implicit Gram: each pass applies G as Xc^T (Xc Q) without forming it, the n x (k + 10) basis Q is
re-orthonormalised on the small side, and after 3 power steps a Rayleigh-Ritz step picks the top k. It needs a
block of X and a V x (k + 10) array that becomes the output, and it is deterministic for a given seed.

On CPU the block loops call numpy's BLAS (syrk, gemm) and numpy's elementwise kernels only: torch's
OpenMP-parallel kernels between BLAS calls make the two thread pools spin against each other (~40 % slower).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

METHODS: tuple[str, ...] = ("exact", "randomized")

_BLOCK_BYTES = 16 << 20  # bytes per row block: stays in a large L3 cache and keeps syrk efficient
_MIN_BLOCKS = 8  # ... and at most 1/8 of the table, so work buffers stay small next to it
_SAMPLE_ROWS = 4096  # rows averaged for the centring shift
_LOSS_SAFETY = 10.0  # the predicted energy loss must stay below the allowance by this factor
_LOSS_TOL = 2e-4  # allowed loss of captured energy relative to the optimum squared (1e-4 on the error)
_ORTHO_TOL = 1e-6  # largest off-diagonal of the normalised Y^T Y accepted without a Rayleigh-Ritz rotation
_RSVD_OVERSAMPLE = 10
_RSVD_NITER = 3  # power steps: niter + 1 passes over the table
_U32 = 2.0**-24
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_F64 = {True: np.float64, False: torch.float64}  # float64 for numpy (CPU) or torch work arrays

Array = np.ndarray | torch.Tensor  # work arrays: numpy on CPU, torch on an accelerator


@dataclass(frozen=True)
class Factors:
    """The truncated SVD of one table: ``a @ b`` is the best rank-k approximation of W."""

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float
    method: str


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _np(x: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 (unknown to numpy) is widened to float32 through its bits."""
    if x.dtype == torch.bfloat16:
        bits = x.view(torch.int16).numpy().view(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return x.numpy()


def _tn_add(acc: Array, x: Array, y: Array | None = None) -> Array:
    """acc += x^T y (x^T x by syrk when y is None) with acc in float64; returns the product."""
    if isinstance(x, np.ndarray):
        p = x.T @ (x if y is None else y)
        np.add(acc, p, out=acc)
        return p
    p = x.T @ (x if y is None else y)
    acc += p
    return p


def _sq_norm(x: Array) -> float:
    """||x||_F^2: float32 sums of rows (short, so accurate) added in float64."""
    if isinstance(x, np.ndarray):
        return float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))
    return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)


def _mm(x: Array, m: Array, out: Array) -> Array:
    """out = x @ m."""
    if isinstance(x, np.ndarray):
        return np.matmul(x, m, out=out)
    return torch.matmul(x, m, out=out)


class _Rows:
    """The tall view X of a table, read in row blocks that are converted (and centred) into work arrays.

    On CPU the work arrays are numpy arrays and every loop calls numpy's BLAS and elementwise kernels only:
    torch's OpenMP kernels between BLAS calls make the two thread pools spin against each other on few cores.
    """

    def __init__(self, W: torch.Tensor) -> None:
        self.wide = W.shape[0] < W.shape[1]
        self.X = W.T if self.wide else W
        self.rows, self.cols = self.X.shape
        self.dtype = W.dtype
        self.device = W.device
        self.cpu = W.device.type == "cpu"
        self.compute = torch.float64 if W.dtype == torch.float64 else torch.float32
        row32 = 4 * self.cols
        budget = min(_BLOCK_BYTES, max(64 * row32, self.rows * row32 // _MIN_BLOCKS))
        self.block = max(1, min(self.rows, budget // (row32 * (2 if self.compute == torch.float64 else 1))))
        self.block64 = max(1, min(self.rows, budget // (2 * row32)))  # rows per float64 block, same bytes
        self.nblocks = -(-self.rows // self.block)

    def spans(self, size: int | None = None, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """Row ranges of ``size`` rows (default: a compute block) covering [start, stop)."""
        size, stop = size or self.block, self.rows if stop is None else stop
        for i in range(start, stop, size):
            yield i, min(i + size, stop)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Array:
        dtype = dtype or self.compute
        if self.cpu:
            return np.empty(shape, _NP_DTYPE[dtype])
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return np.zeros(shape) if self.cpu else torch.zeros(shape, dtype=torch.float64, device=self.device)

    def put(self, a: np.ndarray, dtype: torch.dtype | None = None) -> Array:
        """A small host matrix as a work array in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute
        if self.cpu:
            return np.ascontiguousarray(a, dtype=_NP_DTYPE[dtype])
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype, device=self.device)

    def host(self, a: Array) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else a.double().cpu().numpy()

    def tensor(self, a: Array) -> torch.Tensor:
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    def shift(self) -> np.ndarray:
        """The mean of an even sample of rows, rounded to float32 so that both precisions centre by it exactly."""
        sample = self.X[:: max(1, self.rows // _SAMPLE_ROWS)]
        m = _np(sample).mean(0, dtype=np.float64) if self.cpu else sample.double().mean(0).cpu().numpy()
        return m.astype(np.float32).astype(np.float64)

    def load(self, s: int, e: int, out: Array, shift: Array | None = None) -> Array:
        """out = X[s:e] - shift, in out's dtype (out may be a strided view)."""
        x = self.X[s:e]
        if self.cpu:
            if shift is None:
                np.copyto(out, _np(x), casting="same_kind")
            else:
                np.subtract(_np(x), shift, out=out, casting="same_kind")
        elif shift is None:
            out.copy_(x)
        else:
            torch.sub(x, shift, out=out)
        return out


def _centred_gram(rows: _Rows, shift: np.ndarray, dtype: torch.dtype, span: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Sum over row blocks of [Xc 1]^T [Xc 1] in float64, each block's product computed in ``dtype``.

    Returns the (n+1) x (n+1) sum, the rows of the block with the most centred energy and that block's own
    product (for measuring rounding errors); ``span`` restricts the pass to those rows.
    """
    n = rows.cols
    size = rows.block64 if dtype == torch.float64 else rows.block
    buf = rows.empty((size, n + 1), dtype)
    buf[:, n] = 1
    m = rows.put(shift, dtype)
    acc = rows.zeros((n + 1, n + 1))
    best, best_energy, best_product = (0, 0), -1.0, None
    for s, e in rows.spans(size, *(span or (0, rows.rows))):
        c = buf[: e - s]
        rows.load(s, e, c[:, :n], m)
        p = _tn_add(acc, c)
        energy = float(p[:n, :n].trace())
        if span is None and energy > best_energy:
            best, best_energy, best_product = (s, e), energy, rows.host(p).astype(np.float64)
    return rows.host(acc), best, best_product


def _assemble(aug: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """G = Xc^T Xc + m c^T + c m^T + V m m^T from the augmented centred Gram."""
    n = aug.shape[0] - 1
    c, count = aug[:n, n], aug[n, n]
    G = aug[:n, :n] + np.outer(shift, c) + np.outer(c, shift) + count * np.outer(shift, shift)
    return (G + G.T) / 2


def _eigh_desc(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, Q = np.linalg.eigh(G)
    return lam[::-1].copy(), Q[:, ::-1].copy()


class Spectrum:
    """The result of one pass over W (the Gram route); reusable for several k without re-reading W's Gram.

    ``singular_values`` are the square roots of the Gram eigenvalues (float64, CPU, descending, length
    min(V, d)). ``route`` tells how the Gram was accumulated: "float32" (centred; the fast path), "float64" or
    "qr". ``factors`` moves to a more precise route by itself when the measured rounding error of the Gram could
    cost accuracy at the requested k; later calls reuse the more precise Gram.
    """

    def __init__(self, W: torch.Tensor) -> None:
        _check_matrix(W)
        rows = _Rows(W.detach())
        self._shape = tuple(W.shape)
        self._dtype = W.dtype
        self._shift = rows.shift()
        fast = rows.compute == torch.float32 and rows.nblocks > 1
        aug, j, p = _centred_gram(rows, self._shift, torch.float32 if fast else torch.float64)
        self._set_gram(_assemble(aug, self._shift), "float32" if fast else "float64")
        self._nblocks = rows.rows / (j[1] - j[0])  # blocks the size of the sampled one
        p32 = p if fast else _centred_gram(rows, self._shift, torch.float32, j)[0]
        p64 = _centred_gram(rows, self._shift, torch.float64, j)[0] if fast else p
        # the float32 rounding error of the most energetic block's Gram, in the form of G
        diff = p32 - p64
        c = diff[:-1, -1]
        self._err32 = diff[:-1, :-1] + np.outer(self._shift, c) + np.outer(c, self._shift)

    @property
    def singular_values(self) -> torch.Tensor:
        return torch.from_numpy(np.sqrt(np.clip(self._lam, 0, None)))

    @property
    def route(self) -> str:
        return self._route

    def energy_kept(self, k: int) -> float:
        """sum_{i<=k} s_i^2 / sum_i s_i^2 (1.0 for a zero table), from the tail so that 1 - it is accurate."""
        n = self._lam.size
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
            raise InputError(f"k must be an integer in [0, {n}], got {k!r}")
        lam = np.clip(self._lam, 0, None)
        total = float(lam.sum())
        return 1.0 if total == 0.0 else 1.0 - float(lam[k:].sum()) / total

    def factors(self, W: torch.Tensor, k: int) -> Factors:
        """The rank-k factors of W, the table this spectrum came from: one more pass, Y = W V_k."""
        _check_matrix(W)
        if tuple(W.shape) != self._shape:
            raise InputError(
                f"the spectrum is of a {self._shape[0]} x {self._shape[1]} table, not {W.shape[0]} x {W.shape[1]}"
            )
        _check_k(k, self._shape)
        rows = _Rows(W.detach())
        while self._route != "qr" and self._loss_too_big(k):
            if self._route == "float32":
                aug = _centred_gram(rows, self._shift, torch.float64)[0]
                self._set_gram(_assemble(aug, self._shift), "float64")
            else:
                self._qr(rows)
        return _finish(rows, self._Q[:, :k], self._lam, self._total, "exact")

    def _set_gram(self, G: np.ndarray, route: str) -> None:
        self._lam, self._Q = _eigh_desc(G)
        self._total = float(np.clip(G.diagonal(), 0, None).sum())
        self._route = route

    def _qr(self, rows: _Rows) -> None:
        """The SVD of R from a streaming float64 QR of X (backward stable, so exact to ~1e-16 ||W||)."""
        buf = rows.empty((rows.block64, rows.cols), torch.float64)
        R = buf[:0]
        for s, e in rows.spans(rows.block64):
            stacked = (np.vstack if rows.cpu else torch.cat)([R, rows.load(s, e, buf[: e - s])])
            R = np.linalg.qr(stacked, mode="r") if rows.cpu else torch.linalg.qr(stacked, mode="r").R
        _, S, Vh = np.linalg.svd(rows.host(R), full_matrices=False)
        self._lam, self._Q, self._total, self._route = S**2, Vh.T.copy(), float((S**2).sum()), "qr"

    def _loss_too_big(self, k: int) -> bool:
        """Could the Gram's rounding error cost more than 1e-4 of the optimal error at rank k (with margin)?

        Two effects: the directions turn (energy lost, second order in the error) and the eigenvalue tail that
        gives rel_error shifts (first order, which matters when the tail is tiny, e.g. for rank-deficient W).
        """
        lam = self._lam
        if k >= lam.size:
            return False
        u = _U32 if self._route == "float32" else _unit_roundoff(torch.float64)
        Et = self._Q.T @ (self._err32 * (math.sqrt(self._nblocks) * u / _U32)) @ self._Q[:, k:]
        gap = lam[:k, None] - lam[None, k:]
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where(gap > 0, np.minimum(Et[:k] ** 2 / gap, gap), 0.0).sum()
        shift = np.abs(Et[k:].diagonal()).sum()
        opt2 = float(np.clip(lam[k:], 0, None).sum())
        floor = _unit_roundoff(self._dtype) ** 2 * self._total  # what rounding the factors to W's dtype costs
        return _LOSS_SAFETY * float(loss + shift) > _LOSS_TOL * opt2 + floor


def spectrum(W: torch.Tensor) -> Spectrum:
    """All singular values of W from one streaming pass (centred float32 Gram, float64 eigh)."""
    return Spectrum(W)


def factorize_matrix(
    W: torch.Tensor,
    k: int,
    *,
    method: str = "exact",
    seed: int = 0,
    spectrum: Spectrum | None = None,
) -> Factors:
    """Truncated SVD W ~= a @ b, a = U_k (V x k), b = S_k V_k^T (k x d), in W's dtype and on W's device.

    ``method="exact"`` reaches the Eckart-Young optimum (see the module docstring); a ``spectrum`` of the same W
    saves its Gram pass. ``method="randomized"`` is a streaming randomized subspace iteration seeded by ``seed``;
    it does not use ``spectrum``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_matrix(W)
    _check_k(k, tuple(W.shape))
    if method == "randomized":
        return _randomized(W.detach(), k, seed)
    spec = spectrum if spectrum is not None else Spectrum(W)
    return spec.factors(W, k)


def factorize_weighted(W: torch.Tensor, k: int, weights: torch.Tensor, *, method: str = "exact",
                       seed: int = 0) -> Factors:
    """Frequency-weighted truncated SVD: a @ b minimises sum_i f_i ||w_i - (a b)_i||^2 for row weights f_i > 0.

    Row i is scaled by sqrt(f_i), the scaled table is factorized by ``method`` (optimal for the weighted error),
    and a's rows are scaled back. ``rel_error`` is the plain ||W - a b||_F / ||W||_F, measured blockwise (it is at
    least the plain SVD's: the weighted fit spends rank on frequent rows); ``singular_values`` are the weighted
    table's.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_matrix(W)
    _check_k(k, tuple(W.shape))
    w = torch.as_tensor(weights).detach().to(torch.float64).flatten().cpu()
    if w.numel() != W.shape[0]:
        raise InputError(f"{w.numel()} row weights for a table of {W.shape[0]} rows")
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise InputError("row weights must be finite and positive (add smoothing to zero counts)")
    root = w.sqrt()
    root = root / root.max()  # a common scale changes nothing but keeps the scaled table within W's range
    scale = root.to(dtype=torch.float32 if W.dtype != torch.float64 else torch.float64, device=W.device)
    scaled = (W.detach().to(scale.dtype) * scale[:, None]).to(W.dtype)
    f = factorize_matrix(scaled, k, method=method, seed=seed)
    del scaled
    a = (f.a.to(scale.dtype) / scale[:, None]).to(W.dtype)
    total = float(torch.linalg.vector_norm(W.detach(), dtype=torch.float64) ** 2)
    rel = _measured_error(_Rows(W.detach()), a, f.b) / math.sqrt(total) if total > 0 else 0.0
    return Factors(a=a, b=f.b, singular_values=f.singular_values, rel_error=rel, method="weighted")


def _check_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise InputError(f"expected a 2-D table, got a {W.ndim}-D tensor of shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise InputError(f"expected a floating-point table, got {W.dtype}")
    if W.numel() == 0:
        raise InputError(f"the table is empty (shape {tuple(W.shape)})")


def _check_k(k: int, shape: tuple[int, ...]) -> None:
    n = min(shape)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise InputError(f"rank k must be an integer in [1, {n}] for a {shape[0]} x {shape[1]} table, got {k!r}")


def _finish(rows: _Rows, Vk: np.ndarray, lam: np.ndarray | None, total: float, method: str,
            Y: Array | None = None) -> Factors:
    """From orthonormal directions Vk (n x k, float64): Y = X Vk, a Rayleigh-Ritz step, and the factors.

    ``lam`` (all eigenvalues of G) gives the error tail and the trailing singular values for the exact route;
    without it (randomized) the error is sqrt(||W||^2 - ||Y||^2). ``Y`` may come precomputed.
    """
    k = Vk.shape[1]
    dt = rows.compute
    C = rows.zeros((k, k))
    if Y is None:
        Vc = rows.put(Vk)
        Y = rows.empty((rows.rows, k))
        if rows.X.dtype == dt and (not rows.cpu or rows.X.is_contiguous()):
            _mm(_np(rows.X) if rows.cpu else rows.X, Vc, Y)  # one BLAS call: fewer thread barriers
        else:
            buf = rows.empty((rows.block, rows.cols))
            for s, e in rows.spans():
                _mm(rows.load(s, e, buf[: e - s]), Vc, Y[s:e])
    for s, e in rows.spans():
        _tn_add(C, Y[s:e])
    M, sigma, Vk = _rayleigh_ritz(rows.host(C), Vk, _unit_roundoff(dt) * math.sqrt(total))
    if M is None:
        Y *= rows.put(np.where(sigma > 0, 1.0 / np.where(sigma > 0, sigma, 1.0), 0.0))
    else:
        Mc, tmp = rows.put(M), rows.empty((rows.block, k))
        for s, e in rows.spans():
            Y[s:e] = _mm(Y[s:e], Mc, tmp[: e - s])
    if lam is not None:
        rest = np.sqrt(np.clip(lam[k:], 0, None))
        tail = float((rest**2).sum())
        singular_values = np.concatenate([sigma, np.minimum(rest, sigma[-1])])
    else:
        tail = max(total - float((sigma**2).sum()), 0.0)
        singular_values = sigma
    Yt = rows.tensor(Y)
    # X ~= Y diag(sigma) Vk^T now; for a wide table X = W^T, so W ~= Vk diag(sigma) Y^T
    if rows.wide:
        a = torch.from_numpy(Vk * (sigma > 0)).to(dtype=rows.dtype, device=rows.device)
        b = (Yt * rows.tensor(rows.put(sigma))).T.to(rows.dtype).contiguous()
    else:
        a = Yt.to(rows.dtype)
        b = torch.from_numpy(sigma[:, None] * Vk.T).to(dtype=rows.dtype, device=rows.device)
    rel = math.sqrt(tail / total) if total > 0 else 0.0
    if rows.dtype not in _NP_DTYPE and total > 0:
        rel = _measured_error(rows, a, b) / math.sqrt(total)
    return Factors(a=a, b=b, singular_values=torch.from_numpy(singular_values.copy()), rel_error=rel, method=method)


def _rayleigh_ritz(C: np.ndarray, Vk: np.ndarray, tiny: float) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Turn Y = X Vk, with Gram C = Y^T Y, into an exact SVD (Y M) diag(sigma) Vout^T of Y Vk^T.

    Columns whose norm is at most ``tiny`` (rounding noise of a zero singular value) become zero. When Y's
    columns are orthogonal to ``_ORTHO_TOL`` and their norms descend, M is diagonal: returned as None, scale Y's
    columns by 1/sigma. Otherwise the normalised Gram D^-1 C D^-1 (close to I, so its Cholesky factor L is
    accurate even when the singular values span many decades, unlike an eigh of C) orthonormalises Y, and the
    SVD of the small remainder L^T D Vk^T gives the rotation, the singular values and the right vectors.
    """
    k = C.shape[0]
    C = (C + C.T) / 2
    norms = np.sqrt(np.clip(C.diagonal(), 0, None))
    live = norms > tiny
    D = norms[live]
    Cn = C[np.ix_(live, live)] / np.outer(D, D)
    sigma = np.where(live, norms, 0.0)
    if np.all(sigma[:-1] >= sigma[1:]) and (Cn.size == 0 or np.abs(Cn - np.eye(D.size)).max() <= _ORTHO_TOL):
        return None, sigma, Vk
    try:
        L = np.linalg.cholesky(Cn)
        P, S, Rt = np.linalg.svd(L.T @ (D[:, None] * Vk[:, live].T), full_matrices=False)
        M_live = np.linalg.solve(L.T, P) / D[:, None]
        V_live = Rt.T
    except np.linalg.LinAlgError:
        lamC, R = _eigh_desc(C[np.ix_(live, live)])
        S = np.sqrt(np.clip(lamC, 0, None))
        M_live = R * np.where(S > tiny, 1.0 / np.where(S > tiny, S, 1.0), 0.0)
        V_live = Vk[:, live] @ R
    S = np.where(S > tiny, S, 0.0)
    r = int(live.sum())
    M = np.zeros((k, k))
    M[np.flatnonzero(live), :r] = M_live
    return M, np.concatenate([S, np.zeros(k - r)]), np.concatenate([V_live, Vk[:, ~live]], 1)


def _measured_error(rows: _Rows, a: torch.Tensor, b: torch.Tensor) -> float:
    """||W - a b||_F with the factors as returned (rounded to a half dtype), blockwise in float32."""
    W = rows.X.T if rows.wide else rows.X
    bf = b.float()
    err = 0.0
    for s in range(0, W.shape[0], rows.block):
        r = W[s : s + rows.block].float() - a[s : s + rows.block].float() @ bf
        err += float(torch.linalg.vector_norm(r, dtype=torch.float64) ** 2)
    return math.sqrt(err)


def _randomized(W: torch.Tensor, k: int, seed: int) -> Factors:
    """Randomized subspace iteration on the centred implicit Gram, streaming over row blocks.

    Each pass applies G = X^T X to an n x l basis Q (l = k + oversampling) as Xc^T (Xc Q) plus the rank-one mean
    terms, and re-orthonormalises on the small side. The last pass keeps T = Xc Q, so after a Rayleigh-Ritz step
    on Q^T G Q the output Y = X Q R_k = T R_k + 1 m^T Q R_k needs no further pass over X.
    """
    rows = _Rows(W)
    n, l = rows.cols, min(rows.cols, k + _RSVD_OVERSAMPLE)
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, l)))[0]
    shift = rows.shift()
    m = rows.put(shift)
    buf, T = rows.empty((rows.block, n)), rows.empty((rows.rows, l))
    colsum = rows.zeros((1, n))
    total = 0.0
    for it in range(_RSVD_NITER + 1):
        Qc = rows.put(Q)
        Z = rows.zeros((n, l))
        for s, e in rows.spans():
            c = rows.load(s, e, buf[: e - s], m)
            _tn_add(Z, c, _mm(c, Qc, T[s:e]))
            if it == 0:
                colsum += c.sum(0, dtype=_F64[rows.cpu])
                total += _sq_norm(c)
        if it == 0:
            csum = rows.host(colsum)[0]
            total += 2 * float(shift @ csum) + rows.rows * float(shift @ shift)
        # G Q = Xc^T Xc Q + m (c^T Q) + c (m^T Q) + V m (m^T Q), with c = Xc^T 1
        mQ = shift @ Q
        GQ = rows.host(Z) + np.outer(shift, csum @ Q) + np.outer(csum, mQ) + rows.rows * np.outer(shift, mQ)
        if it < _RSVD_NITER:
            Q = np.linalg.qr(GQ)[0]
    _, R = _eigh_desc((Q.T @ GQ + GQ.T @ Q) / 2)
    # Y = T R_k + 1 m^T Q R_k, written over T's own memory: row block by row block, the compact (V, k) layout
    # never runs ahead of the rows of T still to be read
    Rk, offset = rows.put(R[:, :k]), rows.put((mQ @ R[:, :k])[None, :])
    Y = T.reshape(-1)[: rows.rows * k].reshape(rows.rows, k)
    tmp = rows.empty((rows.block, k))
    for s, e in rows.spans():
        t = _mm(T[s:e], Rk, tmp[: e - s])
        t += offset
        Y[s:e] = t
    return _finish(rows, Q @ R[:, :k], None, max(total, 0.0), "randomized", Y)
