"""What ``embcompress inspect`` reports: the tensors by group, the embedding tables found, and what factorizing
each would cost at a few reductions (rank, bytes saved, spectral energy kept), with the cost model of
``embcompress.cost`` (bytes and multiply-adds of the dense, int8/fp16, factorized and factorized + quantized
layouts, and the break-even ranks)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import check_finite, load_checkpoint
from .cost import compare_layouts
from .errors import TableError
from .quant import quant_meta, quantization_error
from .rank import achieved_reduction, rank_for_reduction
from .svd import spectrum
from .tables import find_embeddings, group_name

DEFAULT_REDUCTIONS = (0.5, 0.7, 0.9)


@dataclass
class GroupSummary:
    """Tensors sharing a name prefix (layer numbers folded into ``*``)."""

    name: str
    tensors: int
    params: int
    bytes: int
    dtypes: list[str]
    share: float


@dataclass
class Projection:
    """Factorizing one table at one reduction R."""

    reduction: float
    rank: int
    bytes_saved: int
    energy_kept: float
    rel_error: float


@dataclass
class TableSummary:
    name: str
    shape: tuple[int, int]
    dtype: str
    params: int
    bytes: int
    share: float
    reason: str
    tied: dict[str, str]
    projections: list[Projection] = field(default_factory=list)
    cost: dict[str, Any] | None = None  # embcompress.cost.CostReport.to_dict(): layouts and break-even ranks


@dataclass
class InspectReport:
    path: str
    kind: str
    tensors: int
    params: int
    bytes: int
    file_bytes: int
    groups: list[GroupSummary]
    tables: list[TableSummary]
    factorized: dict[str, Any]
    note: str | None = None
    quantized: dict[str, Any] = field(default_factory=dict)  # the embcompress.quant record of a quantized file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    reductions: tuple[float, ...] = DEFAULT_REDUCTIONS,
    tables: list[str] | None = None,
) -> InspectReport:
    """Summarise a checkpoint and project the cost of factorizing each embedding table at ``reductions``."""
    with load_checkpoint(Path(path)) as ckpt:
        total_bytes = ckpt.total_bytes or 1
        groups: dict[str, GroupSummary] = {}
        for info in ckpt.infos.values():
            g = groups.setdefault(group_name(info.name), GroupSummary(group_name(info.name), 0, 0, 0, [], 0.0))
            g.tensors += 1
            g.params += info.numel
            g.bytes += info.nbytes
            if info.dtype not in g.dtypes:
                g.dtypes.append(info.dtype)
        for g in groups.values():
            g.share = g.bytes / total_bytes
        note = None
        try:
            found = find_embeddings(ckpt, tables)
        except TableError as e:
            if tables:
                raise
            found, note = [], str(e)
        summaries = []
        for table in found:
            info = ckpt.infos[table.name]
            W = ckpt.tensor(table.name)
            check_finite(table.name, W)
            spec = spectrum(W)
            V, d = table.shape
            summary = TableSummary(
                name=table.name,
                shape=table.shape,
                dtype=table.dtype,
                params=info.numel,
                bytes=info.nbytes,
                share=info.nbytes / total_bytes,
                reason=table.reason,
                tied=dict(table.tie_reasons),
            )
            for r in reductions:
                k = rank_for_reduction(V, d, r)
                if k < 1:
                    continue
                kept = spec.energy_kept(k)
                saved = round(info.nbytes * achieved_reduction(V, d, k))
                summary.projections.append(Projection(r, k, saved, kept, max(0.0, 1.0 - kept) ** 0.5))
            # --- cost model (embcompress.cost): measured int8/fp16 errors, Eckart-Young errors from the spectrum
            bits = W.element_size() * 8
            errors = {b: e for b in (8, 16) if b < bits and math.isfinite(e := quantization_error(W, b))}
            summary.cost = compare_layouts(V, d, bits=bits, reductions=reductions, energy_kept=spec.energy_kept,
                                           quant_errors=errors).to_dict()
            summaries.append(summary)
            del W
        meta = ckpt.embcompress_meta or {}
        quantized = quant_meta(ckpt) or {}
        if quantized and not summaries and not tables:
            note = (f"quantized file ({quantized.get('bits')}-bit): its tables are stored quantized; inspect the "
                    "float model for the cost model")
        return InspectReport(
            path=str(path),
            kind=ckpt.kind,
            tensors=len(ckpt.infos),
            params=ckpt.total_params,
            bytes=ckpt.total_bytes,
            file_bytes=ckpt.file_bytes,
            groups=sorted(groups.values(), key=lambda g: -g.bytes),
            tables=summaries,
            factorized=meta.get("tables") or {},
            note=note,
            quantized=quantized,
        )
