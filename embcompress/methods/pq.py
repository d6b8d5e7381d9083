"""``pq`` structure: product quantization of the table (Jegou, Douze and Schmid, 2011).

Each row of the V x d table is cut into M = d / S subvectors of S dims; subspace m has its own codebook of K <= 256
centroids (S dims each), found by k-means on the rows' m-th subvectors, and a row is stored as M one-byte codes,
the index of the nearest centroid in each subspace. A lookup gathers the row's codes, gathers the centroids they
name and concatenates them: two Gathers in ONNX.

Stored: the codes (uint8, V x M) and the codebooks (``codebook_dtype``, fp16 by default, M x K x S):
V d / S + 2 d K bytes, e.g. 0.067 of the float32 table at S = 4, K = 256 for MiniLM's 30522 x 384 table.

k-means runs on a sample of at most 64 K rows (all rows when V is smaller), then every row is assigned to its
nearest centroid in blocks. faiss (the ``[faiss]`` extra, ``faiss-cpu``) is used when it can be imported; otherwise
a batched torch k-means (k-means++ seeding, Lloyd iterations, all subspaces at once, distances by batched matmul in
row blocks) reaches the same error (tests/methods/test_pq.py checks within 2 % when faiss is installed).

Token counts (``Context.counts``, from ``--corpus`` / ``--counts``) weight k-means when ``weighted`` is on: row r
weighs sqrt(max(count_r, 0.1)), the square root GroupReduce also uses for its ranks, so a token seen 10 000 times
pulls the centroids 100 times harder than one seen once, and a token never seen still weighs sqrt(0.1) = 0.32 of a
single sighting (rare tokens must not be abandoned: the counts come from a sample of the user's texts). With weights
the k-means sample is the half of the rows that weigh most plus a uniform draw of the rest, the latter weighted up by
the inverse of its sampling rate, so the sample's objective estimates the whole table's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .base import (
    FLOAT32_BYTES,
    STRUCTURE,
    BudgetError,
    CodeTraining,
    Config,
    Context,
    Method,
    Table,
    register,
)

MAX_CENTROIDS = 256  # one byte a code
UNSEEN_COUNT = 0.1  # the count a never-seen row is weighted as
SAMPLE_PER_CENTROID = 64  # k-means trains on at most this many rows per centroid
_SEED_PER_CENTROID = 8  # k-means++ seeds from at most this many rows per centroid
_BLOCK_ELEMS = 1 << 21  # distance entries (subspaces x rows x centroids) per block of the assignment
# faiss computes distances by BLAS from this many queries: the default of faiss 1.15 (128 000) sends k-means on
# small subspaces (below 8 dims, or 4 000-16 000 points) down a direct loop about 10x slower
FAISS_BLAS_FROM = 20
COMPILE_ENTRIES = 2_000_000_000  # distance entries from which the assignment kernel is compiled

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- shared helpers (iiq uses them too) --------------------------------------------------------------------------


def float_dtype(name: str, option: str) -> torch.dtype:
    """The torch dtype of a float storage option (``float16``, ``bfloat16``, ``float32``); refused otherwise."""
    if name not in FLOAT_DTYPES:
        raise InputError(f"{option} must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return FLOAT_DTYPES[name]


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in float32 holding only values ``dtype`` represents (so storing it in ``dtype`` loses nothing)."""
    return t.detach().to(dtype).to(torch.float32)


def check_table(w: torch.Tensor, method: str) -> torch.Tensor:
    if w.dim() != 2 or not w.is_floating_point() or w.shape[0] < 1 or w.shape[1] < 1:
        raise InputError(f"{method} needs a 2-D floating table, got {w.dtype} {tuple(w.shape)}")
    w = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise InputError(f"{method} cannot encode a table holding NaN or infinite values")
    return w


def resolve_padding(w: torch.Tensor, padding_idx: int | None, zero_padding: bool | None) -> tuple[int | None, bool]:
    """The padding row's index (negative ones counted from the end) and whether lookups serve it as zeros (by
    default: when the dense padding row is all zero, so the encoded table keeps ``nn.Embedding``'s zero row)."""
    if padding_idx is None:
        return None, False
    rows = w.shape[0]
    if not -rows <= padding_idx < rows:
        raise InputError(f"padding_idx {padding_idx} is outside a table of {rows} rows")
    padding_idx %= rows
    if zero_padding is None:
        zero_padding = not bool(w[padding_idx].any())
    return padding_idx, bool(zero_padding)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    norm = float(torch.linalg.norm(w))
    return float(torch.linalg.norm(w - w_hat)) / norm if norm > 0 else 0.0


def row_weights(counts: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """sqrt(max(count, UNSEEN_COUNT)) per row, or None without counts (or when they are all equal)."""
    if counts is None:
        return None
    counts = torch.as_tensor(counts).detach().to("cpu", torch.float64).reshape(-1)
    if counts.numel() != rows:
        raise InputError(f"token counts cover {counts.numel()} rows, the table has {rows}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise InputError("token counts must be finite and non-negative")
    w = counts.clamp(min=UNSEEN_COUNT).sqrt()
    if float(w.max() - w.min()) == 0.0:
        return None
    return (w / w.mean()).to(torch.float32)


# --- k-means -------------------------------------------------------------------------------------------------------


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:
        return False
    return True


def training_sample(rows: int, size: int, weights: torch.Tensor | None,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row indices to train k-means on and their weights (None: unweighted); see the module's docstring."""
    if rows <= size:
        return torch.arange(rows), weights
    if weights is None:
        return torch.randperm(rows, generator=generator)[:size].sort().values, None
    top = size // 2
    order = torch.argsort(weights, descending=True, stable=True)
    rest = order[top:]
    pick = rest[torch.randperm(rest.numel(), generator=generator)[: size - top]]
    idx = torch.cat([order[:top], pick])
    w = torch.cat([weights[order[:top]], weights[pick] * (rest.numel() / (size - top))])
    return idx, w


def _block_rows(subspaces: int, centroids: int) -> int:
    return max(16, _BLOCK_ELEMS // max(1, subspaces * centroids))


def _nearest_eager(x: torch.Tensor, ct: torch.Tensor, cn: torch.Tensor) -> torch.Tensor:
    """x (M, b, S), ct (M, S, K), cn (M, 1, K) -> nearest centroid (M, b): ||c||^2 - 2 x.c by batched matmul."""
    return torch.baddbmm(cn, x, ct, alpha=-2.0).argmin(-1)


def _nearest_fused(x: torch.Tensor, ct: torch.Tensor, cn: torch.Tensor) -> torch.Tensor:
    """The same written elementwise, for torch.compile to fuse into one loop that never stores the distances."""
    return (cn - 2.0 * (x.unsqueeze(-1) * ct.unsqueeze(1)).sum(2)).argmin(-1)


_compiled: Any = None  # None: not tried yet; False: torch.compile unavailable here


def _nearest_fn(entries: int) -> Any:
    """The block kernel for a job of ``entries`` distances: eager batched matmul for small jobs; for large ones
    (>= COMPILE_ENTRIES) the fused kernel compiled by torch.compile (5x faster on CPU, about 20 s to compile the
    first time), unless EMBCOMPRESS_NO_COMPILE=1 or compiling fails (then eager, silently)."""
    global _compiled
    if os.environ.get("EMBCOMPRESS_NO_COMPILE") == "1" or _compiled is False:
        return _nearest_eager
    if callable(_compiled) and entries >= COMPILE_ENTRIES // 20:  # compiled already: worth it for less
        return _compiled
    if entries < COMPILE_ENTRIES:
        return _nearest_eager
    if _compiled is None:
        try:
            _compiled = torch.compile(_nearest_fused, dynamic=False)
        except Exception:
            _compiled = False
            return _nearest_eager
    return _compiled


def _nearest_blocks(blocks: Any, total: int, centroids: torch.Tensor, kernel: Any) -> Any:
    """Run ``kernel`` on each block (M, b, S) of ``blocks``; a compiled kernel gets the last block padded to the
    block size (one compiled shape) and falls back to eager if it fails."""
    global _compiled
    ct = centroids.transpose(1, 2).contiguous()
    cn = (centroids * centroids).sum(-1).unsqueeze(1)
    for i, xb in blocks:
        if kernel is not _nearest_eager:
            b = xb.shape[1]
            step = _block_rows(centroids.shape[0], centroids.shape[1])
            if b < step:
                xb = torch.cat([xb, xb.new_zeros(xb.shape[0], step - b, xb.shape[2])], 1)
            try:
                yield i, kernel(xb.contiguous(), ct, cn)[:, :b]
                continue
            except Exception:
                _compiled = False
                kernel = _nearest_eager
                xb = xb[:, :b]
        yield i, _nearest_eager(xb, ct, cn)


def assign(x: torch.Tensor, centroids: torch.Tensor, kernel: Any = None) -> torch.Tensor:
    """Nearest centroid of every point, all subspaces at once: x (M, n, S), centroids (M, K, S) -> (M, n) int64."""
    m, n, _ = x.shape
    k = centroids.shape[1]
    kernel = kernel or _nearest_fn(m * n * k)
    step = _block_rows(m, k)
    out = torch.empty(m, n, dtype=torch.int64, device=x.device)
    blocks = ((i, x[:, i : i + step]) for i in range(0, n, step))
    for i, a in _nearest_blocks(blocks, n, centroids, kernel):
        out[:, i : i + a.shape[1]] = a
    return out


def encode_rows(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """PQ codes (V, M) uint8 of the rows of w (V, M S) against codebooks (M, K, S), in blocks of rows."""
    m, k, s = centroids.shape
    rows = w.shape[0]
    codes = torch.empty(rows, m, dtype=torch.uint8)
    step = _block_rows(m, k)
    blocks = ((i, w[i : i + step].reshape(-1, m, s).transpose(0, 1)) for i in range(0, rows, step))
    for i, a in _nearest_blocks(blocks, rows, centroids, _nearest_fn(rows * m * k)):
        codes[i : i + a.shape[1]] = a.T.to(torch.uint8)
    return codes


def _draw(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of p (M, n), drawn with probability proportional to p (cheaper than multinomial)."""
    cs = p.cumsum(1)
    u = torch.rand(p.shape[0], 1, generator=generator) * cs[:, -1:]
    return torch.searchsorted(cs, u).squeeze(1).clamp_(max=p.shape[1] - 1)


def _kmeans_pp(x: torch.Tensor, weights: torch.Tensor | None, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds for every subspace at once: x (M, n, S) -> (M, k, S)."""
    m, n, s = x.shape
    ar = torch.arange(m)
    base = torch.ones(n) if weights is None else weights.clamp(min=1e-12)
    first = _draw(base.expand(m, n), generator)
    seeds = torch.empty(m, k, s)
    seeds[:, 0] = x[ar, first]
    d2 = ((x - seeds[:, :1]) ** 2).sum(-1)  # (M, n)
    for j in range(1, k):
        pick = _draw(d2 * base + 1e-30, generator)
        seeds[:, j] = x[ar, pick]
        torch.minimum(d2, ((x - seeds[:, j : j + 1]) ** 2).sum(-1), out=d2)
    return seeds


def cell_means(x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor | None,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd update in every subspace at once: x (M, n, S) points, a (M, n) their cells, weights (n,) or None ->
    (each cell's weighted mean (M, k, S), its mass (M, k)); a cell that holds nothing has mean 0 and mass 0."""
    m, n, s = x.shape
    w = torch.ones(n, device=x.device) if weights is None else weights
    flat = (a + (torch.arange(m, device=x.device) * k).unsqueeze(1)).reshape(-1)
    sums = torch.zeros(m * k, s, device=x.device).index_add_(0, flat, (x * w.view(1, n, 1)).reshape(-1, s))
    mass = torch.zeros(m * k, device=x.device).index_add_(0, flat, w.expand(m, n).reshape(-1))
    return (sums / mass.clamp(min=1e-30).unsqueeze(1)).view(m, k, s), mass.view(m, k)


def kmeans_torch(x: torch.Tensor, weights: torch.Tensor | None, k: int, iterations: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means in every subspace at once: x (M, n, S) float32 -> centroids (M, k, S).

    k-means++ seeds from a subsample of at most 8 k points, then Lloyd iterations on all points; an empty cluster
    is moved to a random point of its subspace. Stops early when no assignment changes."""
    m, n, _ = x.shape
    seed_n = min(n, _SEED_PER_CENTROID * k)
    sub = torch.randperm(n, generator=generator)[:seed_n] if seed_n < n else torch.arange(n)
    c = _kmeans_pp(x[:, sub], None if weights is None else weights[sub], k, generator)
    kernel = _nearest_fn(iterations * m * n * k)
    previous = None
    for _ in range(iterations):
        a = assign(x, c, kernel)
        if previous is not None and torch.equal(a, previous):
            break
        previous = a
        c, mass = cell_means(x, a, weights, k)
        empty = mass <= 0
        if bool(empty.any()):
            pick = torch.randint(0, n, (m, k), generator=generator)
            c = torch.where(empty.unsqueeze(-1), x[torch.arange(m).unsqueeze(1), pick], c)
    return c


def faiss_threads() -> int:
    """Subspaces encoded at once by faiss: the CPU cores this process may use, at most faiss's OpenMP threads."""
    import faiss

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, faiss.omp_get_max_threads()))


def _faiss_points(x: torch.Tensor) -> Any:
    """x (n, S) as faiss wants it: a contiguous float32 array."""
    import numpy as np

    return np.ascontiguousarray(x.detach().to(torch.float32).numpy())


def _faiss_pool(job: Any, count: int) -> None:
    """Run ``job(j)`` for j < count on faiss_threads() threads (faiss releases the GIL), each faiss call on one
    OpenMP thread (S-dim subspaces are too small to share; OpenMP threads would only spin), distances by BLAS
    (``FAISS_BLAS_FROM``)."""
    import faiss

    threads, blas_from = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    workers = faiss_threads()
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_FROM
    try:
        if workers == 1:
            for j in range(count):
                job(j)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(job, range(count)))
    finally:
        faiss.omp_set_num_threads(threads)
        faiss.cvar.distance_compute_blas_threshold = blas_from


def kmeans_faiss(x: torch.Tensor, weights: torch.Tensor | None, k: int, iterations: int, seed: int) -> torch.Tensor:
    """The same with faiss, the subspaces spread over the cores (faiss seeds at random among the points)."""
    import faiss
    import numpy as np

    m, n, s = x.shape
    out = torch.empty(m, k, s)
    wn = None if weights is None else np.ascontiguousarray(weights.numpy(), dtype=np.float32)

    def job(j: int) -> None:
        km = faiss.Kmeans(s, k, niter=iterations, seed=seed + j, verbose=False,
                          max_points_per_centroid=max(1, n), min_points_per_centroid=1)
        km.train(_faiss_points(x[j]), weights=wn)
        out[j] = torch.from_numpy(km.centroids.reshape(k, s).copy())

    _faiss_pool(job, m)
    return out


def encode_rows_faiss(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each row's nearest centroid in every subspace, by faiss, the subspaces spread over the cores."""
    import faiss

    m, k, s = centroids.shape
    codes = torch.empty(w.shape[0], m, dtype=torch.uint8)

    def job(j: int) -> None:
        index = faiss.IndexFlatL2(s)
        index.add(_faiss_points(centroids[j]))
        _, idx = index.search(_faiss_points(w[:, j * s : (j + 1) * s]), 1)
        codes[:, j] = torch.from_numpy(idx[:, 0]).to(torch.uint8)

    _faiss_pool(job, m)
    return codes


# --- the method ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PQConfig(Config):
    """subvector: dims per subvector S (divides d); centroids: K per subspace (2..256, at most V); iterations of
    k-means; weighted: weight k-means by token counts when they are given; codebook_dtype: how codebooks are stored;
    seed of the sampling and seeding; zero_padding: serve the padding row as zeros (None: when it is zero)."""

    subvector: int = 4
    centroids: int = 256
    iterations: int = 20
    weighted: bool = True
    codebook_dtype: str = "float16"
    seed: int = 0
    zero_padding: bool | None = None

    def __post_init__(self) -> None:
        for name in ("subvector", "centroids", "iterations", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"pq option {name} must be an integer, got {value!r}")
        if self.subvector < 1:
            raise InputError(f"pq subvector must be at least 1, got {self.subvector}")
        if not 2 <= self.centroids <= MAX_CENTROIDS:
            raise InputError(f"pq centroids must be between 2 and {MAX_CENTROIDS} (one byte a code), "
                             f"got {self.centroids}")
        if self.iterations < 0:
            raise InputError(f"pq iterations must be at least 0, got {self.iterations}")
        float_dtype(self.codebook_dtype, "pq codebook_dtype")

    def check(self, rows: int, dim: int) -> None:
        """Refuse options that do not fit a rows x dim table."""
        if dim % self.subvector:
            raise InputError(f"pq subvector {self.subvector} does not divide the table's {dim} dims")
        if self.centroids > rows:
            raise InputError(f"pq centroids {self.centroids} is above the table's {rows} rows")

    def stored_bytes(self, rows: int, dim: int) -> int:
        self.check(rows, dim)
        m = dim // self.subvector
        item = torch.empty(0, dtype=float_dtype(self.codebook_dtype, "pq codebook_dtype")).element_size()
        return rows * m + m * self.centroids * self.subvector * item

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> PQConfig:
        """The setting that fits with the most code bits a dimension, log2(K) / S: for a large table, the smallest
        subvector S that fits with K = 256 (its codes dominate the bytes); for a small one, where codebooks weigh,
        fewer centroids may win (ties go to more centroids)."""
        if budget >= FLOAT32_BYTES * rows * dim:
            raise BudgetError(f"a budget of {budget} bytes is not below the float32 table's {FLOAT32_BYTES * rows * dim}")
        fixed_s, fixed_k = options.pop("subvector", None), options.pop("centroids", None)
        subvectors = [fixed_s] if fixed_s is not None else [s for s in range(1, dim + 1) if dim % s == 0]
        top = min(MAX_CENTROIDS, rows)
        ks = [fixed_k] if fixed_k is not None else [k for k in (2 ** i for i in range(8, 0, -1)) if k <= top]
        best, best_key = None, None
        smallest = None
        for s in subvectors:
            for k in ks:
                config = cls(subvector=s, centroids=k, **options)
                need = config.stored_bytes(rows, dim)
                smallest = need if smallest is None else min(smallest, need)
                key = (math.log2(k) / s, k)
                if need <= budget and (best_key is None or key > best_key):
                    best, best_key = config, key
        if best is None:
            raise BudgetError(f"pq needs at least {smallest} bytes for a {rows} x {dim} table, over the budget of "
                              f"{budget}")
        return best


class PQTable(Table):
    """A product-quantized table: ``codes`` (V x M uint8 buffer) index ``codebooks`` (M x K x S float parameter)."""

    method = "pq"
    trains_codes = True

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, config: PQConfig,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        rows, m = codes.shape
        if codebooks.dim() != 3 or codebooks.shape[0] != m:
            raise CheckpointError(f"pq codebooks of shape {tuple(codebooks.shape)} do not fit codes of shape "
                                  f"{tuple(codes.shape)}")
        k, s = codebooks.shape[1], codebooks.shape[2]
        self.num_embeddings, self.embedding_dim, self.padding_idx = rows, m * s, padding_idx
        self._config = config
        self.subspaces, self.centroids, self.subvector = m, k, s
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).clone())
        self.register_buffer("offsets", torch.arange(m, dtype=torch.int64) * k, persistent=False)
        self._info: dict[str, Any] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = torch.index_select(self.codes, 0, flat).to(torch.int64) + self.offsets  # (n, M)
        vectors = torch.index_select(self.codebooks.reshape(-1, self.subvector), 0, codes.reshape(-1))
        out = vectors.reshape(*ids.shape, self.embedding_dim)
        if self._config.zero_padding and self.padding_idx is not None:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.codes.device))

    def config(self) -> PQConfig:
        return self._config

    def tensors(self) -> dict[str, torch.Tensor]:
        dtype = float_dtype(self._config.codebook_dtype, "pq codebook_dtype")
        return {"codes": self.codes.detach(), "codebooks": self.codebooks.detach().to(dtype)}

    def storable(self) -> list[str]:
        return []

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> PQTable:
        config = PQConfig.from_dict(entry.get("config"))
        missing = sorted({"codes", "codebooks"} - set(tensors))
        if missing:
            raise CheckpointError(f"pq table lacks tensor(s) {', '.join(missing)}")
        codes, books = tensors["codes"], tensors["codebooks"]
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise CheckpointError(f"pq codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        if books.dim() != 3 or not books.is_floating_point():
            raise CheckpointError(f"pq codebooks must be a 3-D float tensor, got {books.dtype} {tuple(books.shape)}")
        if int(codes.max()) >= books.shape[1] if codes.numel() else False:
            raise CheckpointError(f"pq codes name centroid {int(codes.max())} of {books.shape[1]}")
        shape = list(entry.get("shape") or [codes.shape[0], books.shape[0] * books.shape[2]])
        if shape != [codes.shape[0], books.shape[0] * books.shape[2]]:
            raise CheckpointError(f"pq tensors give a {codes.shape[0]} x {books.shape[0] * books.shape[2]} table, "
                                  f"the record says {shape[0]} x {shape[1]}")
        table = cls(codes, books, config, entry.get("padding_idx"))
        table._info = dict(entry.get("info") or {})
        return table

    def macs(self) -> dict[str, int]:
        return {"lookup": 0, "logits": self.num_embeddings * self.embedding_dim}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, subvector={self.subvector}, centroids={self.centroids}"

    def code_training(self, start: torch.Tensor | None = None,
                      counts: torch.Tensor | None = None) -> PQCodeTraining:
        return PQCodeTraining(self, start, counts)


REFIT_EVERY = 50  # optimizer steps between two re-fits of the codebooks during code training
REFIT_ITERATIONS = 3  # Lloyd iterations of each re-fit


class PQCodeTraining(CodeTraining):
    """A pq table whose codes are trained: a float copy of the table (``weight``) is what the optimizer moves;
    each looked-up row is read through its nearest centroids (straight-through: the gradient reaches the row), so
    a row whose training carries it across a cell boundary changes code; every ``REFIT_EVERY`` steps the codebooks
    are re-fitted to the rows they hold (a few Lloyd iterations; rows weighted by ``row_weights(counts)`` where the
    table was encoded weighted). As in VQ-VAE (van den Oord et al., 2017), ``penalty`` is the mean squared distance
    of the looked-up rows to their centroids."""

    def __init__(self, table: PQTable, start: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> None:
        super().__init__()
        start = table.dense_weight() if start is None else start
        if tuple(start.shape) != (table.num_embeddings, table.embedding_dim):
            raise InputError(f"code training starts from a {tuple(start.shape)} table, the pq table is "
                             f"{table.num_embeddings} x {table.embedding_dim}")
        self._config, self.padding_idx = table.config(), table.padding_idx
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.shape = (table.subspaces, table.centroids, table.subvector)
        self.weight = nn.Parameter(start.detach().to("cpu", torch.float32).clone())  # recovery moves the module
        self.register_buffer("codebooks", table.codebooks.detach().to(torch.float32).clone())
        weights = row_weights(counts, table.num_embeddings) if self._config.weighted else None
        self.register_buffer("row_weights", torch.ones(table.num_embeddings) if weights is None else weights)
        self._info, self._steps = dict(table.info()), 0
        self.refit()

    def _books(self) -> torch.Tensor:
        """The codebooks as they will be stored (``codebook_dtype``), so training reads what the file will hold."""
        return rounded(self.codebooks, float_dtype(self._config.codebook_dtype, "pq codebook_dtype"))

    def _read(self, w: torch.Tensor) -> torch.Tensor:
        """Each row of w through its nearest centroids (no gradient)."""
        m, k, s = self.shape
        books = self._books()
        a = assign(w.detach().reshape(-1, m, s).transpose(0, 1), books)  # (M, n)
        q = torch.gather(books, 1, a.unsqueeze(-1).expand(m, a.shape[1], s))  # (M, n, S)
        return q.transpose(0, 1).reshape(w.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = nn.functional.embedding(ids.reshape(-1), self.weight)
        q = self._read(w)
        self.penalty = ((w - q) ** 2).mean()
        out = (q + (w - w.detach())).reshape(*ids.shape, self.embedding_dim)  # the value q, the gradient to w
        if self._config.zero_padding and self.padding_idx is not None:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out

    @torch.no_grad()
    def refit(self) -> None:
        """Lloyd iterations on the codebooks from where they are (an empty cell keeps its centroid)."""
        m, k, s = self.shape
        x = self.weight.detach().reshape(-1, m, s).transpose(0, 1)  # (M, V, S)
        for _ in range(REFIT_ITERATIONS):
            means, mass = cell_means(x, assign(x, self.codebooks), self.row_weights, k)
            held = mass > 0
            self.codebooks[held] = means[held]

    def step(self) -> None:
        self._steps += 1
        if self._steps % REFIT_EVERY == 0:
            self.refit()

    def table(self) -> PQTable:
        books = self._books().cpu()
        table = PQTable(encode_rows(self.weight.detach().cpu(), books), books, self._config, self.padding_idx)
        table._info = {k: v for k, v in self._info.items() if k != "rel_error"}  # it measured the first codes
        table._info["codes_trained"] = True
        return table


def encode_pq(w: torch.Tensor, config: PQConfig, context: Context | None = None, *,
              backend: str = "auto") -> PQTable:
    """Product-quantize ``w``; ``backend`` is ``auto`` (faiss when importable), ``faiss`` or ``torch``."""
    context = context or Context()
    w = check_table(w, "pq")
    rows, dim = w.shape
    config.check(rows, dim)
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend not in ("faiss", "torch"):
        raise InputError(f"pq backend must be auto, faiss or torch, got {backend!r}")
    padding_idx, zero_padding = resolve_padding(w, context.padding_idx, config.zero_padding)
    config = dataclasses.replace(config, zero_padding=zero_padding)
    start = time.perf_counter()
    s, k = config.subvector, config.centroids
    m = dim // s
    weights = row_weights(context.counts, rows) if config.weighted else None
    if weights is not None and padding_idx is not None and zero_padding:
        weights = weights.clone()
        weights[padding_idx] = 0.0  # served as zeros whatever its code
    generator = torch.Generator().manual_seed(config.seed)
    idx, sample_w = training_sample(rows, SAMPLE_PER_CENTROID * k, weights, generator)
    x = w[idx].reshape(-1, m, s).transpose(0, 1).contiguous()  # (M, n, S)
    if backend == "faiss":
        books = kmeans_faiss(x, sample_w, k, max(1, config.iterations), config.seed)
    else:
        books = kmeans_torch(x, sample_w, k, config.iterations, generator)
    dtype = float_dtype(config.codebook_dtype, "pq codebook_dtype")
    books = rounded(books, dtype)
    codes = encode_rows_faiss(w, books) if backend == "faiss" else encode_rows(w, books)
    table = PQTable(codes, books, config, padding_idx)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        w_hat = table.dense_weight()
        info: dict[str, Any] = {"rel_error": relative_error(w, w_hat), "subvector": s, "centroids": k,
                                "subspaces": m, "backend": backend, "train_rows": int(idx.numel()),
                                "weighted": weights is not None, "seconds": round(seconds, 3)}
        if weights is not None:
            info["weighted_rel_error"] = relative_error(w * weights.sqrt().unsqueeze(1),
                                                        w_hat * weights.sqrt().unsqueeze(1))
    table._info = info
    return table


def _encode(w: torch.Tensor, config: PQConfig, context: Context) -> PQTable:
    return encode_pq(w, config, context)


METHOD = register(Method(
    name="pq",
    kind=STRUCTURE,
    config=PQConfig,
    description="product quantization: S-dim subvectors, K <= 256 centroids each, one byte a code "
                "(0.067 of float32 at S = 4)",
    encode=_encode,
    table=PQTable,
    budget_options=("subvector", "centroids"),
    takes_storage=False,
))

