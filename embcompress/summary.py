"""What ``embcompress inspect`` reports: the tensors by group, the embedding tables found, and what factorizing
each would cost at a few reductions (rank, bytes saved, spectral energy kept), with the cost model of
``embcompress.cost`` (bytes and multiply-adds of the dense, int8/fp16, factorized and factorized + quantized
layouts, and the break-even ranks).

Beside low rank, each table is stored for real (on a sample of its rows when it is large) as int8 per row and in
4- and 2-bit groups of 32 (``embcompress.methods.lowbit``), and each storage's measured error is set against low
rank's at the same bytes: a table with a nearly flat spectrum loses far more to low rank than to low-bit storage,
and the report says so, with the command that stores it better, before the user runs anything.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_finite, load_checkpoint
from .cost import compare_layouts, quantized_cost
from .errors import TableError
from .methods.lowbit import LowBitConfig, dequantize_lowbit, quantize_lowbit
from .quant import quant_meta, quantization_error
from .rank import achieved_reduction, rank_for_reduction
from .svd import spectrum
from .tables import find_embeddings, group_name

DEFAULT_REDUCTIONS = (0.5, 0.7, 0.9)
LOWBIT_GROUP = 32  # the group size of the low-bit storages compared (quantize --bits 2/4's default)
SAMPLE_ROWS = 4096  # storage errors are measured on at most this many rows, evenly spread over the table
WARN_RATIO = 2.0  # warn when low rank's error is above this multiple of 4-bit groups' error at the same bytes


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
class StorageOption:
    """The whole table kept in one storage, at that storage's bytes, beside low rank at the same bytes."""

    storage: str  # "int8" (per row, float32 scales) or "lowbit4" / "lowbit2" (groups of LOWBIT_GROUP, asym)
    bits: int
    group_size: int | None
    bytes: int
    fraction: float  # of the table's float32 bytes (what `compress --budget` takes)
    rel_error: float  # measured ||W - W_hat||_F / ||W||_F over rows_measured rows
    rows_measured: int
    svd_rank: int  # the largest k whose two factors, at the table's width, fit in ``bytes`` (0: none fits)
    svd_energy_kept: float
    svd_rel_error: float  # sqrt(1 - energy kept at svd_rank), Eckart-Young


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
    storage: list[StorageOption] = field(default_factory=list)
    warning: str | None = None  # low rank far worse than low-bit storage at equal bytes, and what to run instead


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
            summary.storage = storage_options(W, spec.energy_kept)
            summary.warning = low_rank_warning(str(path), table.name, summary.storage)
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


def _rows_sample(W: torch.Tensor, rows: int) -> torch.Tensor:
    """At most ``rows`` rows of W, evenly spread (all of them for a smaller table), as float32."""
    if W.shape[0] > rows:
        W = W[torch.linspace(0, W.shape[0] - 1, rows).round().long()]
    return W.to(torch.float32)


def _relative(w: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(w))
    return float(torch.linalg.vector_norm(w - approx)) / norm if norm > 0 else 0.0


def storage_options(W: torch.Tensor, energy_kept: Callable[[int], float],
                    sample_rows: int = SAMPLE_ROWS) -> list[StorageOption]:
    """int8 per row and 4- and 2-bit groups of W, each measured on at most ``sample_rows`` rows, beside low rank at
    its bytes.

    ``energy_kept(k)`` is the table's spectrum's; the factors are counted at W's own width. When LOWBIT_GROUP does
    not divide the dimension, the low-bit bytes are those of rows padded to whole groups, as lowbit stores them."""
    V, d = W.shape
    width = W.element_size()
    sample = _rows_sample(W, sample_rows)
    options = []

    def add(storage: str, bits: int, group: int | None, nbytes: int, error: float) -> None:
        k = min(V, d, nbytes // (width * (V + d)))
        kept = energy_kept(k) if k >= 1 else 0.0
        options.append(StorageOption(storage, bits, group, nbytes, nbytes / (4 * V * d), error, sample.shape[0], k,
                                     kept, math.sqrt(max(0.0, 1.0 - kept))))

    if width > 1:
        add("int8", 8, None, quantized_cost(V, d, 8).bytes, quantization_error(sample, 8))
    for bits in (4, 2):
        config = LowBitConfig(bits=bits, group_size=LOWBIT_GROUP)
        approx = dequantize_lowbit(quantize_lowbit(sample, config), config, tuple(sample.shape))
        add(f"lowbit{bits}", bits, LOWBIT_GROUP, config.stored_bytes(V, d), _relative(sample, approx))
    return options


def low_rank_warning(path: str, table: str, options: list[StorageOption]) -> str | None:
    """One line when, at the bytes of 4-bit groups, low rank's error is above WARN_RATIO times theirs: the figures,
    the better choice and the command that makes it; None otherwise."""
    four = next((o for o in options if o.storage == "lowbit4"), None)
    if four is None or four.svd_rel_error <= WARN_RATIO * four.rel_error:
        return None
    budget = math.ceil(four.fraction * 10_000) / 10_000  # rounded up: the budget must hold the 4-bit table
    model = shlex.quote(path)
    return (f"{table}: low rank would wreck this table (its spectrum is nearly flat): at the bytes of 4-bit groups "
            f"({100 * four.fraction:.1f} % of float32), SVD at k = {four.svd_rank} has rel. error "
            f"{four.svd_rel_error:.3f} against {four.rel_error:.3f} for 4-bit groups of {four.group_size}; store it "
            f"low-bit instead: embcompress quantize {model} --bits 4 (or embcompress compress {model} --method "
            f"lowbit --budget {budget:g})")
