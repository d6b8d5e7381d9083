"""FactorizedEmbedding and the swap that puts it into any ``nn.Module``.

``FactorizedEmbedding`` holds W_a (V x k) and W_b (k x d) and returns ``W_a[ids] @ W_b``: the paper's factorized
lookup. ``compress_embeddings`` finds the ``nn.Embedding`` modules of a model (the same name and shape rules as
``tables.find_embeddings``), replaces each by its factorized version with ``setattr`` on the parent (as peft swaps
its adapters), and keeps an output layer that shared the table tied to the new factors.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TableError
from .groupreduce import group_reduce
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

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden @ (W_a W_b)^T (+ bias)`` as (hidden W_b^T) W_a^T: k(d + V) multiply-adds per position."""
        return F.linear(F.linear(hidden, self.weight_b), self.weight_a, bias)

    def dense_weight(self) -> torch.Tensor:
        """The V x d table W_a @ W_b (materialises it: for export to dense tools and for tests)."""
        return self.weight_a @ self.weight_b

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


class GroupedFactorizedEmbedding(nn.Module):
    """An embedding table stored block-wise (GroupReduce): the rows of block c are a_c (n_c x k_c) times b_c.

    ``weight_groups`` (V, uint8) names each row's block; a row's place inside its block follows token id order.
    Parameters are ``weight_a.<c>`` and ``weight_b.<c>``, so a state dict uses the factor names that
    ``embcompress.factorize`` writes. The lookup runs one gather and one k_c x d product per block, masked to the
    tokens of that block: plain tensor ops that ONNX exports as they are.
    """

    def __init__(
        self,
        ranks: list[int],
        sizes: list[int],
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        groups: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(ranks) != len(sizes) or not ranks:
            raise TableError(f"one rank per block is needed: {len(ranks)} ranks for {len(sizes)} blocks")
        if min(ranks) < 1 or min(sizes) < 1:
            raise TableError(f"every block needs rank and size at least 1, got ranks {ranks} and sizes {sizes}")
        V = sum(sizes)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += V
        self.num_embeddings = V
        self.embedding_dim = embedding_dim
        self.ranks = list(ranks)
        self.padding_idx = padding_idx
        self.rel_error: float | None = None
        self.weight_a = nn.ParameterList(
            [nn.Parameter(torch.empty(n, k, device=device, dtype=dtype)) for n, k in zip(sizes, ranks)])
        self.weight_b = nn.ParameterList(
            [nn.Parameter(torch.empty(k, embedding_dim, device=device, dtype=dtype)) for k in ranks])
        if groups is None:  # contiguous blocks until a state dict or from_factors sets the real map
            groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.register_buffer("weight_groups", groups.to(device=device, dtype=torch.uint8).clone())
        self.register_buffer("rows", torch.empty(V, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("order", torch.empty(V, dtype=torch.long, device=device), persistent=False)
        self._index()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._index())
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """The sum of the block ranks (the width of the block-diagonal W_a)."""
        return sum(self.ranks)

    def _index(self) -> None:
        """Each row's place inside its block (``rows``) and in the concatenation of all blocks (``order``)."""
        groups = self.weight_groups.long()
        sizes = torch.bincount(groups, minlength=len(self.ranks))
        if sizes.tolist() != [a.shape[0] for a in self.weight_a]:
            raise TableError(f"the groups map gives block sizes {sizes.tolist()}, the factors "
                             f"{[a.shape[0] for a in self.weight_a]}")
        by_block = torch.argsort(groups * self.num_embeddings + torch.arange(self.num_embeddings,
                                                                            device=groups.device))
        offsets = torch.cumsum(sizes, 0) - sizes
        place = torch.empty_like(by_block)
        place[by_block] = torch.arange(self.num_embeddings, device=groups.device)
        self.order.copy_(place)
        self.rows.copy_(place - offsets[groups])
        self._pad_rows: list[int | None] = [None] * len(self.ranks)
        if self.padding_idx is not None:
            self._pad_rows[int(groups[self.padding_idx])] = int(self.rows[self.padding_idx])

    def reset_parameters(self) -> None:
        """Random factors as in ``FactorizedEmbedding``."""
        for a, b in zip(self.weight_a, self.weight_b):
            nn.init.normal_(a, std=a.shape[1] ** -0.25)
            nn.init.normal_(b, std=b.shape[0] ** -0.25)
        self._zero_padding()

    def _zero_padding(self) -> None:
        with torch.no_grad():
            for a, row in zip(self.weight_a, self._pad_rows):
                if row is not None:
                    a[row].zero_()

    @classmethod
    def from_factors(
        cls,
        a: list[torch.Tensor],
        b: list[torch.Tensor],
        groups: torch.Tensor,
        padding_idx: int | None = None,
    ) -> GroupedFactorizedEmbedding:
        """Wrap existing per-block factors and their row -> block map (copied into new parameters)."""
        module = cls([x.shape[1] for x in a], [x.shape[0] for x in a], b[0].shape[1], padding_idx,
                     groups=groups, device=a[0].device, dtype=a[0].dtype)
        with torch.no_grad():
            for p, x in zip(module.weight_a, a):
                p.copy_(x)
            for p, x in zip(module.weight_b, b):
                p.copy_(x)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        groups = self.weight_groups[ids]
        rows = self.rows[ids]
        out = None
        for c, (a, b) in enumerate(zip(self.weight_a, self.weight_b)):
            mine = groups == c
            part = F.embedding(torch.where(mine, rows, torch.zeros_like(rows)), a, self._pad_rows[c])
            part = (part * mine.unsqueeze(-1).to(a.dtype)) @ b
            out = part if out is None else out + part
        return out

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden @ W^T (+ bias)`` block by block: (hidden b_c^T) a_c^T, the blocks' columns put back in id order."""
        parts = [F.linear(F.linear(hidden, b), a) for a, b in zip(self.weight_a, self.weight_b)]
        out = torch.cat(parts, dim=-1).index_select(-1, self.order)
        return out if bias is None else out + bias

    def dense_weight(self) -> torch.Tensor:
        """The V x d table (materialises it: for export to dense tools and for tests)."""
        return self.forward(torch.arange(self.num_embeddings, device=self.weight_groups.device))

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, ranks={self.ranks}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


FACTORIZED = (FactorizedEmbedding, GroupedFactorizedEmbedding)


class TiedFactorizedLinear(nn.Module):
    """An output layer tied to a FactorizedEmbedding: ``h @ (W_a W_b)^T + bias`` computed as ``(h W_b^T) W_a^T``.

    It owns no table of its own, so the tie survives training and saving; the two small products cost
    k(d + V) multiply-adds per position instead of V*d.
    """

    def __init__(self, embedding: FactorizedEmbedding | GroupedFactorizedEmbedding,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list keeps it out of this module's parameters and state dict
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def tied_to(self) -> FactorizedEmbedding | GroupedFactorizedEmbedding:
        return self.embedding[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tied_to.logits(hidden, self.bias)


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
    weights: torch.Tensor | None = None,
    blocks: int = 8,
    force: bool = False,
) -> list[SwapReport]:
    """Replace the model's embedding tables by factorized ones in place; return what was swapped.

    Give exactly one of ``reduction`` (the fraction of each table's parameters to remove; eq. 5 picks k) or
    ``rank``. ``tables`` lists module names or globs; by default the tables ``find_embeddings`` would choose.
    ``method`` is ``exact`` or ``randomized`` (truncated SVD), or ``groupreduce`` with per-row ``weights`` (token
    counts, > 0) and ``blocks``: a ``GroupedFactorizedEmbedding`` in the budget of rank k.
    Output layers whose weight *is* a swapped table become ``TiedFactorizedLinear``, so the tie survives.
    """
    if (method == "groupreduce") != (weights is not None):
        raise TableError("method='groupreduce' needs row weights (token counts), and weights need groupreduce")
    reports = []
    for name, emb in _select_embeddings(model, tables):
        V, d = emb.weight.shape
        k = choose_rank(V, d, reduction=reduction, rank=rank, force=force, table=name)
        new: FactorizedEmbedding | GroupedFactorizedEmbedding
        if weights is not None:
            g = group_reduce(emb.weight.detach(), weights, budget=k * (V + d), blocks=blocks)
            new = GroupedFactorizedEmbedding.from_factors(g.a, g.b, g.groups, emb.padding_idx)
            new.rel_error, k = g.rel_error, sum(g.ranks)
        else:
            new = FactorizedEmbedding.from_embedding(emb, k, method=method)
        tied = []
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
                tied.append(lin_name)
        _set_submodule(model, name, new)
        reports.append(SwapReport(name, V, d, k, new.rel_error, tuple(tied)))
    return reports


# a factorized table's shape: its rank k, or per block (rows n_c, rank k_c) for GroupReduce
FactorSpec = int | list[tuple[int, int]]
_BLOCK_FACTOR = re.compile(r"^(?P<module>.+)\.weight_a\.(?P<block>\d+)$")


def factor_specs(shapes: dict[str, tuple[int, ...]]) -> dict[str, FactorSpec]:
    """Module name -> ``FactorSpec`` read off a state dict's tensor shapes: ``<m>.weight_a`` (V x k) gives k,
    ``<m>.weight_a.<c>`` (n_c x k_c) the per-block list."""
    specs: dict[str, FactorSpec] = {}
    blocks: dict[str, dict[int, tuple[int, int]]] = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if name.endswith(".weight_a"):
            specs[name.removesuffix(".weight_a")] = int(shape[1])
        elif m := _BLOCK_FACTOR.match(name):
            blocks.setdefault(m["module"], {})[int(m["block"])] = (int(shape[0]), int(shape[1]))
    for module, found in blocks.items():
        if sorted(found) != list(range(len(found))):
            raise TableError(f"{module}: block factors {sorted(found)} are not numbered 0..{len(found) - 1}")
        specs[module] = [found[c] for c in range(len(found))]
    return specs


def factorized_shapes(model: nn.Module, ranks: dict[str, FactorSpec]) -> None:
    """Swap the named ``nn.Embedding`` modules for empty factorized ones of the given shapes (no SVD).

    A rank gives a ``FactorizedEmbedding``, a per-block list a ``GroupedFactorizedEmbedding`` (its groups map
    arrives with the state dict). Used before ``load_state_dict`` of a factorized checkpoint: the shapes must match
    before the weights load. Tied output layers are re-tied as in ``compress_embeddings``.
    """
    for name, spec in ranks.items():
        emb = model.get_submodule(name)
        if not isinstance(emb, nn.Embedding):
            raise TableError(f"{name!r} is not an nn.Embedding in this model")
        V, d = emb.weight.shape
        where = {"device": emb.weight.device, "dtype": emb.weight.dtype}
        new: nn.Module
        if isinstance(spec, int):
            new = FactorizedEmbedding(V, d, spec, emb.padding_idx, **where)
        else:
            sizes = [n for n, _ in spec]
            if sum(sizes) != V:
                raise TableError(f"{name}: the blocks hold {sum(sizes)} rows, the table {V}")
            new = GroupedFactorizedEmbedding([k for _, k in spec], sizes, d, emb.padding_idx, **where)
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
        _set_submodule(model, name, new)
