"""``groupreduce`` structure: GroupReduce (Chen et al., 2018), blocks of rows by frequency, a rank for each.

Rows are put in blocks by how often their token occurs in the user's texts (needs token counts); each block c gets
its own factors a_c (n_c x k_c) b_c (k_c x d), the ranks chosen greedily within the plain SVD's parameters and refined
by moving rows between blocks. ``weight_groups`` (uint8) names each row's block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, TableError
from ..groupreduce import DEFAULT_BLOCKS, DEFAULT_ROUNDS, MAX_BLOCKS, group_reduce
from .base import STRUCTURE, Config, Context, Method, Table, register
from .svd import refit_factors
from .weighted import WeightedConfig, row_weights


class GroupedFactorizedEmbedding(Table):
    """An embedding table stored block-wise (GroupReduce): the rows of block c are a_c (n_c x k_c) times b_c.

    ``weight_groups`` (V, uint8) names each row's block; a row's place inside its block follows token id order.
    Parameters are ``weight_a.<c>`` and ``weight_b.<c>``, so a state dict uses the factor names that
    ``embcompress.factorize`` writes. The lookup runs one gather and one k_c x d product per block, masked to the
    tokens of that block: plain tensor ops that ONNX exports as they are.
    """

    method = "groupreduce"

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
        self._config: Config = GroupReduceConfig(rank=sum(ranks))
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

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> GroupedFactorizedEmbedding:
        blocks = sum(1 for k in tensors if k.startswith("weight_a."))
        a = [tensors[f"weight_a.{c}"] for c in range(blocks)]
        b = [tensors[f"weight_b.{c}"] for c in range(blocks)]
        return cls.from_factors(a, b, tensors["weight_groups"], entry.get("padding_idx"))

    def config(self) -> Config:
        return self._config

    def info(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "sizes": [int(a.shape[0]) for a in self.weight_a], "rel_error": self.rel_error,
                **super().info()}

    def macs(self) -> dict[str, int]:
        return {"lookup": max(self.ranks) * self.embedding_dim,
                "logits": sum(k * (self.embedding_dim + a.shape[0]) for k, a in zip(self.ranks, self.weight_a))}


@dataclass(frozen=True)
class GroupReduceConfig(WeightedConfig):
    """The SVD's budget (reduction, rank or energy of the plain SVD), the counts' weighting, and the blocks."""

    blocks: int = DEFAULT_BLOCKS
    rounds: int = DEFAULT_ROUNDS

    def extra_bytes(self, rows: int, dim: int, storage: Config | None = None) -> int:
        """The row -> block map, and what the blocks' factors kept in ``storage`` may take beyond the planned
        ``rows`` x k and k x ``dim`` factors (:func:`blocks_overhead`)."""
        if storage is None:
            return rows
        return rows + blocks_overhead(storage, rows, dim, self.blocks, self.rank)

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> GroupReduceConfig:
        """As the SVD's, but the budget rank is not rounded to a ``multiple``: the block ranks are the solver's
        anyway, and a grouped storage pads each block's left factor (counted by ``extra_bytes``)."""
        options.pop("multiple", None)
        return super().for_budget(rows, dim, budget, **options)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.blocks <= MAX_BLOCKS:
            raise InputError(f"--blocks must be between 1 and {MAX_BLOCKS}, got {self.blocks}")
        if self.rounds < 0:
            raise InputError(f"--rounds must be 0 or more, got {self.rounds}")


def blocks_overhead(storage: Config, rows: int, dim: int, blocks: int, rank: int | None) -> int:
    """At most how many bytes the blocks' factors kept in ``storage`` take beyond the planned ``rows`` x ``rank``
    and ``rank`` x ``dim`` factors, for any block ranks the solver picks within ``rank * (rows + dim)`` parameters.

    With b(x) = ``storage.stored_bytes(1, x)`` (a row of x values), r its bytes per value over whole periods of
    8 groups (of 1 value without groups) and c the most b(x) - r x reaches in a period (a per-row scale, the
    padding of a last group): the left factors take at most r P_A + rows c and the right ones K b(dim), where
    P_A + K dim is within the parameters and K, the sum of the block ranks, is at most ``blocks * dim``; so at most
    r rank (rows + dim) + K (b(dim) - r dim) + rows c in all. Without a rank, what that adds to r per parameter.
    """
    period = 8 * int(getattr(storage, "group_size", 1) or 1)

    def row(x: int) -> int:
        return storage.stored_bytes(1, x)

    per_value = (row(2 * period) - row(period)) / period
    per_row = max(row(x) - per_value * x for x in range(1, period + 1))
    ranks_max = blocks * dim if rank is None else min(blocks * dim, rank * (rows + dim) // dim)
    beyond = ranks_max * (row(dim) - per_value * dim) + rows * per_row
    if rank is None:
        return math.ceil(beyond)
    planned = storage.stored_bytes(rows, rank) + storage.stored_bytes(rank, dim)
    return max(0, math.ceil(per_value * rank * (rows + dim) + beyond - planned))

def _encode(W: torch.Tensor, config: GroupReduceConfig, context: Context) -> GroupedFactorizedEmbedding:
    V, d = W.shape
    weights = row_weights(config, context, V, "groupreduce")
    k = config.choose_rank(W)
    grouped = group_reduce(W.detach().cpu(), weights, budget=k * (V + d), blocks=config.blocks, rounds=config.rounds)
    module = GroupedFactorizedEmbedding.from_factors(grouped.a, grouped.b, grouped.groups, context.padding_idx)
    module.rel_error = grouped.rel_error
    module._config = GroupReduceConfig(rank=k, smoothing=config.smoothing, power=config.power, blocks=config.blocks,
                                       rounds=config.rounds)
    module._info = {"budget_rank": k, "weighted_rel_error": grouped.weighted_rel_error, "rounds": grouped.history}
    return module


def _fit_stored(W: torch.Tensor, table: Table, storage: Method, config: Config) -> None:
    """LPLR block by block: each block's left factor stored, its right factor solved against it, then stored (a
    low-bit storage pads a block whose rank is not a multiple of its group)."""
    groups = table.weight_groups.long()
    for c, (a, b) in enumerate(zip(table.weight_a, table.weight_b)):
        refit_factors(W[(groups == c).nonzero().flatten()], a, b, storage, config)


METHOD = register(Method(
    name="groupreduce",
    kind=STRUCTURE,
    config=GroupReduceConfig,
    description="GroupReduce: frequency blocks, each with its own rank, in the plain SVD's bytes",
    encode=_encode,
    table=GroupedFactorizedEmbedding,
    fit_stored=_fit_stored,
    needs=("counts",),
    budget_options=("rank",),
))
