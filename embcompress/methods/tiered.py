"""``tiered`` structure: frequency-aware bits, frequent tokens kept in more bits than rare ones (needs token counts).

As GroupReduce gives frequent rows more rank, this gives them more bits: the rows are ranked by how often their token
occurs in the user's texts, the top ``frequent`` fraction is stored in ``high_bits`` low-bit groups and the rest in
``low_bits`` (both with the ``lowbit`` storage's packed layout, so each tier exports to onnxruntime's
GatherBlockQuantized). ``weight_tiers`` (uint8) names each row's tier; a row's place inside its tier follows token id
order. A budget sets the fraction of frequent rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .base import STRUCTURE, BudgetError, Config, Context, Method, Table, register
from .lowbit import LowBitConfig, dequantize_lowbit, gather_lowbit, quantize_lowbit

TIER_MAP_BYTES = 1  # one uint8 a row


@dataclass(frozen=True)
class TieredConfig(Config):
    """Which fraction of rows (the most frequent) gets ``high_bits``; the rest ``low_bits``; groups of ``group_size``."""

    frequent: float = 0.1
    high_bits: int = 4
    low_bits: int = 2
    group_size: int = 32
    refine: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.frequent <= 1.0:
            raise InputError(f"frequent must be a fraction of the rows in [0, 1], got {self.frequent}")
        if self.high_bits <= self.low_bits:
            raise InputError(f"high_bits ({self.high_bits}) must be above low_bits ({self.low_bits})")
        self.tier(self.high_bits)
        self.tier(self.low_bits)

    def tier(self, bits: int) -> LowBitConfig:
        return LowBitConfig(bits=bits, group_size=self.group_size, refine=self.refine)

    def rows(self, rows: int) -> tuple[int, int]:
        high = int(round(self.frequent * rows))
        return high, rows - high

    def stored_bytes(self, rows: int, dim: int) -> int:
        high, low = self.rows(rows)
        return (self.tier(self.high_bits).stored_bytes(high, dim) + self.tier(self.low_bits).stored_bytes(low, dim)
                + TIER_MAP_BYTES * rows)

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> TieredConfig:
        """The largest fraction of frequent rows that fits."""
        base = cls(**{**options, "frequent": 0.0})
        per_high = base.tier(base.high_bits).stored_bytes(1, dim)
        per_low = base.tier(base.low_bits).stored_bytes(1, dim)
        room = budget - rows * (per_low + TIER_MAP_BYTES)
        if room < 0:
            raise BudgetError(f"tiered needs at least {rows * (per_low + TIER_MAP_BYTES)} bytes for a {rows} x {dim} "
                              f"table ({base.low_bits}-bit rows), over the budget of {budget}")
        high = min(rows, room // max(1, per_high - per_low))
        return cls(**{**options, "frequent": high / rows})


class TieredTable(Table):
    """Rows in tiers of low-bit groups, decoded per looked-up row (one gather per tier, masked)."""

    method = "tiered"

    def __init__(self, config: TieredConfig, stored: Mapping[str, torch.Tensor], tiers: torch.Tensor, dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self._config = config
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(tiers.numel()), dim, padding_idx
        self.register_buffer("weight_tiers", tiers.to(torch.uint8).clone())
        self._names = sorted(stored)
        for name, t in stored.items():
            self.register_buffer(name, t.detach().clone())
        self._sizes = [int((self.weight_tiers == c).sum()) for c in (0, 1)]
        place = torch.empty(self.num_embeddings, dtype=torch.long)
        for c in (0, 1):
            mine = (self.weight_tiers == c).nonzero().flatten()
            place[mine] = torch.arange(mine.numel())
        self.register_buffer("rows", place, persistent=False)

    def _tier(self, c: int) -> dict[str, torch.Tensor]:
        prefix = f"tier{c}"
        return {k[len(prefix):]: getattr(self, k) for k in self._names if k.startswith(prefix)}

    def _bits(self, c: int) -> int:
        return self._config.high_bits if c == 0 else self._config.low_bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tiers, rows = self.weight_tiers[ids], self.rows[ids]
        out = None
        for c in (0, 1):
            if not self._sizes[c]:
                continue
            stored = self._tier(c)
            mine = tiers == c
            part = gather_lowbit(stored, torch.where(mine, rows, torch.zeros_like(rows)),
                                 self._config.tier(self._bits(c)), self.embedding_dim)
            part = part * mine.unsqueeze(-1).to(part.dtype)
            out = part if out is None else out + part
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.weight_tiers.device))

    def recoverable(self) -> list[torch.nn.Parameter]:
        return []

    def config(self) -> Config:
        return self._config

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight_tiers": self.weight_tiers, **{k: getattr(self, k) for k in self._names}}

    def storable(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        high = int((self.weight_tiers == 0).sum())
        return {"frequent_rows": high, **super().info()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> TieredTable:
        config = TieredConfig.from_dict(entry.get("config"))
        stored = {k: v for k, v in tensors.items() if k.startswith("tier")}
        return cls(config, stored, tensors["weight_tiers"], int(entry["shape"][1]), entry.get("padding_idx"))


def _encode(W: torch.Tensor, config: TieredConfig, context: Context) -> TieredTable:
    V, d = W.shape
    if context.counts is None:
        raise InputError("--method tiered needs token counts (--counts FILE or --corpus TEXTS)")
    if context.counts.numel() != V:
        raise InputError(f"{context.counts.numel()} token counts for a table of {V} rows")
    high, _ = config.rows(V)
    order = torch.argsort(-context.counts.to(torch.float64), stable=True)
    tiers = torch.ones(V, dtype=torch.uint8)
    tiers[order[:high]] = 0
    stored = {}
    for c in (0, 1):
        rows = (tiers == c).nonzero().flatten()
        bits = config.high_bits if c == 0 else config.low_bits
        part = quantize_lowbit(W.detach().float().cpu()[rows], config.tier(bits))
        stored.update({f"tier{c}{suffix}": t for suffix, t in part.items()})
    return TieredTable(config, stored, tiers, d, context.padding_idx)


def dequantize_rows(table: TieredTable) -> torch.Tensor:
    """The whole table decoded tier by tier (for tests and dense tools)."""
    out = torch.empty(table.num_embeddings, table.embedding_dim)
    for c in (0, 1):
        rows = (table.weight_tiers == c).nonzero().flatten()
        bits = table._bits(c)
        out[rows] = dequantize_lowbit(table._tier(c), table._config.tier(bits), (rows.numel(), table.embedding_dim))
    return out


METHOD = register(Method(
    name="tiered",
    kind=STRUCTURE,
    config=TieredConfig,
    description="frequency-aware low-bit groups: frequent tokens in more bits (e.g. 4), the rest in fewer (2)",
    encode=_encode,
    table=TieredTable,
    needs=("counts",),
    budget_options=("frequent",),
))
