"""``tiered`` structure: frequency-aware allocation, frequent tokens stored finer than rare ones (needs token counts).

As GroupReduce gives frequent rows more rank, this gives them more bits or finer codebooks: the rows are ranked by
how often their token occurs in the user's texts, the top ``frequent`` fraction is kept by ``method`` with the
``high`` options and the rest with the ``low`` options: ``lowbit`` tiers (4-bit and 2-bit groups by default, each
exported to onnxruntime's GatherBlockQuantized) or ``pq`` tiers (e.g. 2-dim subvectors for frequent rows, 8-dim for
the rest). ``weight_tiers`` (uint8) names each row's tier; a row's place inside its tier follows token id order. A
budget sets the fraction of frequent rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from . import base
from .base import STORAGE, STRUCTURE, BudgetError, Config, Context, Method, StoredTable, Table, register

TIER_MAP_BYTES = 1  # one uint8 a row
TIER_METHODS = ("lowbit", "pq")
DEFAULTS = {"lowbit": ({"bits": 4}, {"bits": 2}), "pq": ({"subvector": 2}, {"subvector": 8})}


@dataclass(frozen=True)
class TieredConfig(Config):
    """The top ``frequent`` fraction of rows kept by ``method`` with the ``high`` options, the rest with ``low``
    (empty options take the method's defaults for that tier: 4 and 2 bits, or 2- and 8-dim subvectors)."""

    frequent: float = 0.1
    method: str = "lowbit"
    high: dict[str, Any] = field(default_factory=dict)
    low: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.frequent <= 1.0:
            raise InputError(f"frequent must be a fraction of the rows in [0, 1], got {self.frequent}")
        if self.method not in TIER_METHODS:
            raise InputError(f"tiered method must be one of {', '.join(TIER_METHODS)}, got {self.method!r}")
        if not isinstance(self.high, dict) or not isinstance(self.low, dict):
            raise InputError("tiered high and low are options of the tier method, name=value")
        self.tier(0)
        self.tier(1)

    def tier(self, c: int) -> Config:
        """The options of tier ``c`` (0: frequent rows, 1: the rest)."""
        high, low = DEFAULTS[self.method]
        options = {**high, **self.high} if c == 0 else {**low, **self.low}
        return base.get(self.method).config.from_dict(options)

    def rows(self, rows: int) -> tuple[int, int]:
        high = int(round(self.frequent * rows))
        return high, rows - high

    def stored_bytes(self, rows: int, dim: int) -> int:
        total = TIER_MAP_BYTES * rows
        for c, n in enumerate(self.rows(rows)):
            total += self.tier(c).stored_bytes(n, dim) if n else 2 * dim  # an empty tier's one fp16 row
        return total

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> TieredConfig:
        """The largest fraction of frequent rows that fits. Without a ``method``, low-bit tiers where they fit, else
        product-quantization tiers (3-dim subvectors for frequent rows where 3 divides d, else 2 or 1; for the
        rest the first of 8, 6, 4, 12, 16 that divides d, else the divisor of d nearest 8)."""
        if "method" in options:
            return cls._sized(rows, dim, budget, **options)
        high = next(s for s in (3, 2, 1) if dim % s == 0)
        divisors = [s for s in range(high + 1, dim + 1) if dim % s == 0] or [high]
        low = next((s for s in (8, 6, 4, 12, 16) if s in divisors), min(divisors, key=lambda s: (abs(s - 8), s)))
        tries = ({**options, "method": "lowbit"},
                 {"high": {"subvector": high}, "low": {"subvector": low}, **options, "method": "pq"})
        needs, reasons = {}, []
        for attempt in tries:
            try:
                least = cls._least(rows, dim, **attempt)
            except BudgetError as e:
                reasons.append(str(e))
                continue
            if least <= budget:
                return cls._sized(rows, dim, budget, **attempt)
            needs[attempt["method"]] = least
        if not needs:
            raise BudgetError("; ".join(reasons))
        each = ", ".join(f"{method} tiers {least}" for method, least in needs.items())
        raise BudgetError(f"tiered needs at least {min(needs.values())} bytes for a {rows} x {dim} table (every row "
                          f"in the low tier: {each}), over the budget of {budget}")

    @classmethod
    def _least(cls, rows: int, dim: int, **options: Any) -> int:
        """The stored bytes with every row in the low tier; refused with the tier method's reason when its tiers
        cannot hold the table at all (a subvector that does not divide d, more centroids than rows)."""
        options.pop("frequent", None)
        try:
            return cls(**options, frequent=0.0).stored_bytes(rows, dim)
        except InputError as e:
            raise BudgetError(f"tiered {options.get('method', cls.method)} tiers cannot hold a {rows} x {dim} table: "
                              f"{e}") from None

    @classmethod
    def _sized(cls, rows: int, dim: int, budget: int, **options: Any) -> TieredConfig:
        """The largest fraction of frequent rows that fits (the stored bytes grow with it; a tier too small for
        its method, such as fewer rows than a codebook's centroids, is skipped)."""
        options.pop("frequent", None)

        def bytes_at(n: int) -> int | None:
            try:
                return cls(**options, frequent=n / rows).stored_bytes(rows, dim)
            except InputError:
                return None

        least = cls._least(rows, dim, **options)
        if least > budget:
            raise BudgetError(f"tiered needs at least {least} bytes for a {rows} x {dim} table (every row in the "
                              f"low tier), over the budget of {budget}")
        lo, hi = 1, rows - 1  # the smallest frequent tier its method accepts
        while lo < hi and bytes_at(lo) is None:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if bytes_at(mid) is None else (lo, mid)
        best = 0
        top = rows
        while top > lo and bytes_at(top) is None:
            top -= max(1, (top - lo) // 2) if bytes_at((top + lo) // 2) is None else 1
        a, b = lo, top
        while a <= b:
            mid = (a + b) // 2
            got = bytes_at(mid)
            if got is not None and got <= budget:
                best, a = mid, mid + 1
            else:
                b = mid - 1
        return cls(**options, frequent=best / rows)


def _empty(dim: int) -> Table:
    """An empty tier's stand-in (one fp16 row of zeros), so the file form stays regular whatever the method."""
    fp16 = base.get("fp16")
    return StoredTable(fp16, fp16.config(), {"": torch.zeros(1, dim, dtype=torch.float16)}, 1, dim)


def _tier_table(method: Method, config: Config, rows: torch.Tensor, context: Context) -> Table:
    """One tier's table from its rows of the dense table."""
    if method.kind == STORAGE:
        return StoredTable(method, config, method.quantize(rows, config), rows.shape[0], rows.shape[1])
    return method.encode(rows, config, context)


class TieredTable(Table):
    """Rows in two tiers, each a table of the tier method; a lookup gathers from each tier, masked."""

    method = "tiered"

    def __init__(self, config: TieredConfig, tiers: torch.Tensor, parts: list[Table], dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self._config = config
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(tiers.numel()), dim, padding_idx
        self.register_buffer("weight_tiers", tiers.to(torch.uint8).clone())
        self.parts = nn.ModuleList(parts)
        self._sizes = [int((self.weight_tiers == c).sum()) for c in (0, 1)]
        place = torch.zeros(self.num_embeddings, dtype=torch.int32)  # int32: half the bytes of the map in ONNX
        for c in (0, 1):
            mine = (self.weight_tiers == c).nonzero().flatten()
            place[mine] = torch.arange(mine.numel(), dtype=torch.int32)
        self.register_buffer("rows", place, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tiers, rows = self.weight_tiers[ids], self.rows[ids]
        out = None
        for c, part in enumerate(self.parts):
            if not self._sizes[c]:
                continue
            mine = tiers == c
            got = part(torch.where(mine, rows, torch.zeros_like(rows)))
            got = got * mine.unsqueeze(-1).to(got.dtype)
            out = got if out is None else out + got
        if self.padding_idx is not None:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.weight_tiers.device))

    def recoverable(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.recoverable()]

    def config(self) -> Config:
        return self._config

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight_tiers": self.weight_tiers}
        for c, part in enumerate(self.parts):
            out.update({f"parts.{c}.{k}": v for k, v in part.tensors().items()})
        return out

    def storable(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        return {"frequent_rows": self._sizes[0], **super().info()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> TieredTable:
        config = TieredConfig.from_dict(entry.get("config"))
        method = base.get(config.method)
        dim = int(entry["shape"][1])
        tiers = tensors["weight_tiers"]
        parts: list[Table] = []
        for c in (0, 1):
            mine = {k[len(f"parts.{c}."):]: v for k, v in tensors.items() if k.startswith(f"parts.{c}.")}
            n = int((tiers == c).sum())
            if n == 0:
                parts.append(_empty(dim))
            elif method.kind == STORAGE:
                stored = {k.removeprefix("weight"): v for k, v in mine.items()}
                parts.append(StoredTable(method, config.tier(c), stored, n, dim))
            else:
                part = method.table.from_tensors(mine, {"config": config.tier(c).to_dict(), "shape": [n, dim]})
                part._config = config.tier(c)
                parts.append(part)
        return cls(config, tiers, parts, dim, entry.get("padding_idx"))


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
    method = base.get(config.method)
    dense = W.detach().float().cpu()
    parts = []
    for c in (0, 1):
        rows = (tiers == c).nonzero().flatten()
        if rows.numel() == 0:
            parts.append(_empty(d))
            continue
        tier_context = Context(counts=context.counts[rows], device=context.device, seed=context.seed)
        parts.append(_tier_table(method, config.tier(c), dense[rows], tier_context))
    return TieredTable(config, tiers, parts, d, context.padding_idx)


METHOD = register(Method(
    name="tiered",
    kind=STRUCTURE,
    config=TieredConfig,
    description="frequency-aware: frequent tokens stored finer (lowbit 4-bit vs 2-bit, or pq 2- vs 8-dim "
                "subvectors)",
    encode=_encode,
    table=TieredTable,
    needs=("counts",),
    budget_options=("frequent",),
    takes_storage=False,
))
