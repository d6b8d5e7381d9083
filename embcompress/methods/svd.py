"""``svd`` structure: the paper's truncated SVD, W (V x d) = W_a (V x k) W_b (k x d), eqs. 2-5.

``W_a = U_k`` and ``W_b = S_k V_k^T``; k from the reduction R (k = floor((1 - R) V d / (V + d))), a rank, or the
energy kept. ``algorithm="exact"`` reaches the Eckart-Young optimum; ``"randomized"`` streams the table in blocks
for tables too large for memory. Recovery trains both factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, TableError
from ..rank import break_even_rank, choose_rank
from ..svd import METHODS as ALGORITHMS
from ..svd import factorize_matrix, spectrum
from .base import STRUCTURE, BudgetError, Config, Context, Method, Table, register


class FactorizedEmbedding(Table):
    """An embedding table stored as W_a (V x k) times W_b (k x d).

    ``padding_idx`` behaves as in ``nn.Embedding``: its row of W_a gets no gradient, and it is zero after
    ``from_dense`` when the dense row was zero.
    """

    method = "svd"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise TableError(f"rank must be at least 1, got {rank}")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.padding_idx = padding_idx
        self.rel_error: float | None = None
        self._config: Config = SVDConfig(rank=rank)
        self.weight_a = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        self.weight_b = nn.Parameter(torch.empty(rank, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has roughly unit-variance entries, like ``nn.Embedding``."""
        nn.init.normal_(self.weight_a, std=self.rank**-0.25)
        nn.init.normal_(self.weight_b, std=self.rank**-0.25)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight_a[self.padding_idx].zero_()

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None = None) -> FactorizedEmbedding:
        """Wrap existing factors (copied into new parameters)."""
        module = cls(a.shape[0], b.shape[1], a.shape[1], padding_idx, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            module.weight_a.copy_(a)
            module.weight_b.copy_(b)
        return module

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        rank: int,
        padding_idx: int | None = None,
        *,
        method: str = "exact",
    ) -> FactorizedEmbedding:
        """Factorize a dense V x d table by truncated SVD (W_a = U_k, W_b = S_k V_k^T)."""
        factors = factorize_matrix(weight.detach(), rank, method=method)
        module = cls.from_factors(factors.a, factors.b, padding_idx)
        module.rel_error = factors.rel_error
        return module

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int, *, method: str = "exact") -> FactorizedEmbedding:
        """Factorize an ``nn.Embedding``, keeping its padding index."""
        return cls.from_dense(embedding.weight, rank, embedding.padding_idx, method=method)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> FactorizedEmbedding:
        return cls.from_factors(tensors["weight_a"], tensors["weight_b"], entry.get("padding_idx"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_a, self.padding_idx) @ self.weight_b

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden @ (W_a W_b)^T (+ bias)`` as (hidden W_b^T) W_a^T: k(d + V) multiply-adds per position."""
        return F.linear(F.linear(hidden, self.weight_b), self.weight_a, bias)

    def dense_weight(self) -> torch.Tensor:
        """The V x d table W_a @ W_b (materialises it: for export to dense tools and for tests)."""
        return self.weight_a @ self.weight_b

    def config(self) -> Config:
        return self._config

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "rel_error": self.rel_error, **super().info()}

    def macs(self) -> dict[str, int]:
        return {"lookup": self.rank * self.embedding_dim, "logits": self.rank * (self.embedding_dim
                                                                                 + self.num_embeddings)}

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


@dataclass(frozen=True)
class SVDConfig(Config):
    """Exactly one of ``reduction`` (R in (0, 1)), ``rank`` (k) or ``energy`` (fraction of sum s_i^2 kept)."""

    reduction: float | None = None
    rank: int | None = None
    energy: float | None = None
    algorithm: str = "exact"
    force: bool = False  # allow a rank at or above break-even
    multiple: int = 1  # the rank a multiple of this (a low-bit storage's group size along the rank)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.reduction, self.rank, self.energy)) != 1:
            raise InputError("give exactly one of --reduction, --rank or --energy")
        if self.reduction is not None and not 0.0 < self.reduction < 1.0:
            raise InputError(f"--reduction must be strictly between 0 and 1 (0.9 removes 90 %), got {self.reduction}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise InputError(f"--energy must be in (0, 1], got {self.energy}")
        if self.multiple < 1:
            raise InputError(f"multiple must be at least 1, got {self.multiple}")
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")

    def choose_rank(self, W: torch.Tensor, table: str = "table") -> int:
        """k for this table (the energy rule computes the spectrum)."""
        V, d = W.shape
        spec = spectrum(W) if self.energy is not None else None
        k = choose_rank(V, d, reduction=self.reduction, rank=self.rank, energy=self.energy,
                        singular_values=spec.singular_values if spec is not None else None, force=self.force,
                        table=table)
        if k % self.multiple:
            if k < self.multiple:
                raise InputError(f"{table}: rank {k} is below the multiple {self.multiple} a low-bit storage of the "
                                 "factors needs; give a larger budget or rank")
            k -= k % self.multiple
        return k

    def stored_bytes(self, rows: int, dim: int) -> int:
        if self.rank is None:
            raise InputError("the stored bytes of an SVD config are known from its rank")
        return 4 * self.rank * (rows + dim)

    def planned_shapes(self, rows: int, dim: int) -> dict[str, tuple[int, ...]] | None:
        return None if self.rank is None else {"weight_a": (rows, self.rank), "weight_b": (self.rank, dim)}

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> SVDConfig:
        multiple = int(options.get("multiple", 1))
        fits = budget // (4 * (rows + dim))
        k = fits - fits % multiple
        if fits >= 1 > k:
            raise BudgetError(f"the rank must be a multiple of {multiple} (the group a low-bit storage keeps along "
                              f"the rank; a smaller rank is padded to it at the same bytes): rank {multiple} needs "
                              f"{4 * multiple * (rows + dim)} bytes of float32 factors for a {rows} x {dim} table, "
                              f"over the {budget} this budget gives them (rank {fits} would fit)")
        if k < 1:
            raise BudgetError(f"rank 1 needs {4 * (rows + dim)} bytes for a {rows} x {dim} table, over {budget}")
        if k >= break_even_rank(rows, dim):
            raise BudgetError(f"a budget of {budget} bytes is not below the float32 table ({4 * rows * dim})")
        options = {k_: v for k_, v in options.items() if k_ not in ("reduction", "rank", "energy")}
        return cls(rank=int(k), **options)


def _roundtrip(t: torch.Tensor, storage: Method, config: Config) -> torch.Tensor:
    return storage.dequantize(storage.quantize(t.detach().float().cpu(), config), config, tuple(t.shape))


def refit_factors(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, storage: Method, config: Config) -> None:
    """LPLR (Saha, Srivastava and Pilanci, NeurIPS 2023) for one pair of factors, in place: keep the left factor in
    the storage, solve the right one by least squares against the stored left (so it absorbs the first
    quantization's error), then keep it in the storage too."""
    with torch.no_grad():
        qa = _roundtrip(a, storage, config).double()
        gram = qa.T @ qa
        gram += torch.eye(gram.shape[0], dtype=gram.dtype) * (1e-10 * float(gram.diagonal().mean()) + 1e-30)
        right = torch.linalg.solve(gram, qa.T @ W.detach().double().cpu())
        a.copy_(qa.to(a.dtype))
        b.copy_(_roundtrip(right.float(), storage, config).to(b.dtype))


def _fit_stored(W: torch.Tensor, table: Table, storage: Method, config: Config) -> None:
    refit_factors(W, table.weight_a, table.weight_b, storage, config)


def _encode(W: torch.Tensor, config: SVDConfig, context: Context) -> FactorizedEmbedding:
    k = config.choose_rank(W)
    factors = factorize_matrix(W.detach().to(context.device), k, method=config.algorithm)
    module = FactorizedEmbedding.from_factors(factors.a.cpu(), factors.b.cpu(), context.padding_idx)
    module.rel_error = factors.rel_error
    module._config = SVDConfig(rank=k, algorithm=config.algorithm, force=config.force, multiple=config.multiple)
    return module


METHOD = register(Method(
    name="svd",
    kind=STRUCTURE,
    config=SVDConfig,
    description="truncated SVD W = W_a W_b (the paper's eq. 2-5); exact or randomized",
    encode=_encode,
    table=FactorizedEmbedding,
    fit_stored=_fit_stored,
    budget_options=("rank",),
))
