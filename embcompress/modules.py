"""FactorizedEmbedding and the swap that puts it into any ``nn.Module``.

``FactorizedEmbedding`` holds W_a (V x k) and W_b (k x d) and returns ``W_a[ids] @ W_b``: the paper's factorized
lookup. ``compress_embeddings`` finds the ``nn.Embedding`` modules of a model (the same name and shape rules as
``tables.find_embeddings``), replaces each by its factorized version with ``setattr`` on the parent (as peft swaps
its adapters), and keeps an output layer that shared the table tied to the new factors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TableError
from .rank import choose_rank
from .svd import factorize_matrix


class FactorizedEmbedding(nn.Module):
    """An embedding table stored as W_a (V x k) times W_b (k x d).

    ``padding_idx`` behaves as in ``nn.Embedding``: its row of W_a gets no gradient, and it is zero after
    ``from_dense`` when the dense row was zero.
    """

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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_a, self.padding_idx) @ self.weight_b

    def dense_weight(self) -> torch.Tensor:
        """The V x d table W_a @ W_b (materialises it: for export to dense tools and for tests)."""
        return self.weight_a @ self.weight_b

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


class TiedFactorizedLinear(nn.Module):
    """An output layer tied to a FactorizedEmbedding: ``h @ (W_a W_b)^T + bias`` computed as ``(h W_b^T) W_a^T``.

    It owns no table of its own, so the tie survives training and saving; the two small products cost
    k(d + V) multiply-adds per position instead of V*d.
    """

    def __init__(self, embedding: FactorizedEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list keeps it out of this module's parameters and state dict
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def tied_to(self) -> FactorizedEmbedding:
        return self.embedding[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        emb = self.tied_to
        return F.linear(F.linear(hidden, emb.weight_b), emb.weight_a, self.bias)


@dataclass(frozen=True)
class SwapReport:
    """What ``compress_embeddings`` did to one module."""

    name: str
    num_embeddings: int
    embedding_dim: int
    rank: int
    rel_error: float | None
    tied: tuple[str, ...]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _select_embeddings(model: nn.Module, tables: list[str] | None) -> list[tuple[str, nn.Embedding]]:
    from .tables import is_embedding_candidate

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if tables:
        for pattern in tables:
            if not any(_matches(n, [pattern]) or _matches(f"{n}.weight", [pattern]) for n, _ in found):
                names = ", ".join(n for n, _ in found) or "none"
                raise TableError(f"--tables {pattern!r} matches no nn.Embedding module (modules: {names})")
        return [(n, m) for n, m in found if _matches(n, tables) or _matches(f"{n}.weight", tables)]
    chosen = [(n, m) for n, m in found if is_embedding_candidate(f"{n}.weight", tuple(m.weight.shape))[0]]
    if not chosen:
        raise TableError("no embedding table found in the model; name one with tables=[...]")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compress_embeddings(
    model: nn.Module,
    *,
    reduction: float | None = None,
    rank: int | None = None,
    tables: list[str] | None = None,
    method: str = "exact",
    force: bool = False,
) -> list[SwapReport]:
    """Replace the model's embedding tables by ``FactorizedEmbedding`` in place; return what was swapped.

    Give exactly one of ``reduction`` (the fraction of each table's parameters to remove; eq. 5 picks k) or
    ``rank``. ``tables`` lists module names or globs; by default the tables ``find_embeddings`` would choose.
    Output layers whose weight *is* a swapped table become ``TiedFactorizedLinear``, so the tie survives.
    """
    reports = []
    for name, emb in _select_embeddings(model, tables):
        V, d = emb.weight.shape
        k = choose_rank(V, d, reduction=reduction, rank=rank, force=force, table=name)
        new = FactorizedEmbedding.from_embedding(emb, k, method=method)
        tied = []
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
                tied.append(lin_name)
        _set_submodule(model, name, new)
        reports.append(SwapReport(name, V, d, k, new.rel_error, tuple(tied)))
    return reports


def factorized_shapes(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap the named ``nn.Embedding`` modules for empty ``FactorizedEmbedding`` of the given ranks (no SVD).

    Used before ``load_state_dict`` of a factorized checkpoint: the shapes must match before the weights load.
    Tied output layers are re-tied as in ``compress_embeddings``.
    """
    for name, k in ranks.items():
        emb = model.get_submodule(name)
        if not isinstance(emb, nn.Embedding):
            raise TableError(f"{name!r} is not an nn.Embedding in this model")
        V, d = emb.weight.shape
        new = FactorizedEmbedding(V, d, k, emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype)
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
        _set_submodule(model, name, new)
