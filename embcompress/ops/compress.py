"""``compress``: any registered method (or structure+storage) on a checkpoint's tables, sized by a byte budget.

Load the checkpoint's tensors, encode each chosen table with :mod:`embcompress.core`, write the same kind of
checkpoint (a file, or a model folder with its config and tokenizer) with the versioned record in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import core
from .._version import __version__
from ..checkpoint import (
    META_KEY,
    check_finite,
    check_output,
    default_output,
    load_checkpoint,
    save_checkpoint,
    temporary_folder,
)
from ..errors import InputError
from ..methods.base import BudgetError, Table
from ..quant import TAGS as QUANTIZE_TAGS
from ..quant import quant_meta
from ..record import history
from ..tables import find_embeddings
from ..trim import trim as trim_checkpoint
from ..weighting import load_counts

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str | float | None, float32_bytes: int) -> int | None:
    """``0.05`` (a fraction of the tables' float32 bytes, in (0, 1)) or ``2MB``/``500kB``/``123456`` (bytes) -> bytes.

    Refused: a fraction outside (0, 1), a size at or above the tables' float32 bytes, anything else."""
    if text is None:
        return None
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"--budget is a fraction of the tables' float32 bytes (0.05) or a size (2MB), got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "").lower() or None
    if unit is None and value < 1:
        if not 0 < value < 1:
            raise InputError(f"--budget as a fraction must be in (0, 1), got {text}")
        return int(math.floor(value * float32_bytes))
    if unit is None and "." in m.group(1):
        raise InputError(f"--budget as a fraction must be in (0, 1), got {text}")
    size = int(value * _UNITS[unit])
    if size >= float32_bytes:
        raise InputError(f"--budget {text} is at or above the tables' float32 bytes ({float32_bytes}); nothing to "
                         "save")
    if size <= 0:
        raise InputError(f"--budget must be positive, got {text}")
    return size


@dataclass
class CompressResult:
    """What ``compress`` did."""

    input: str
    output: str
    kind: str
    method: str
    budget_bytes: int | None
    tables: list[dict[str, Any]]
    file_bytes_before: int
    file_bytes_after: int
    seconds: float
    chosen: dict[str, Any] = field(default_factory=dict)
    trimmed: dict[str, Any] | None = None  # with trim: rows and float32 bytes before trimming

    @property
    def table_bytes_before(self) -> int:
        if self.trimmed is not None:
            return int(self.trimmed["float32_bytes"])
        return sum(t["float32_bytes"] for t in self.tables)

    @property
    def table_bytes_after(self) -> int:
        return sum(t["bytes"] for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "table_bytes_before": self.table_bytes_before,
                "table_bytes_after": self.table_bytes_after,
                "table_fraction": self.table_bytes_after / max(1, self.table_bytes_before)}


SIZING_OPTIONS = ("reduction", "rank", "energy", "bits")  # always in a tag when given, default or not
_TAG_FORMS = {"reduction": "r{:.4g}", "energy": "e{:.4g}", "rank": "k{}", "bits": "{}b", "group_size": "g{}"}


def option_tag(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
    """The options of a default output name: the sizing ones given, then every other one that differs from its
    default, in name order: ``-r90``, ``-4b-g64-scheme_sym-refine``, ``-blocks4-power0.5``. Two runs whose options
    differ get different tags."""
    defaults = defaults or {}
    keys = [k for k in SIZING_OPTIONS if options.get(k) is not None]
    keys += sorted(k for k, v in options.items()
                   if k not in SIZING_OPTIONS and v is not None and (k not in defaults or defaults[k] != v))
    parts = []
    for key in keys:
        value = options[key]
        if key in ("reduction", "energy"):
            value = 100 * value
        if key in _TAG_FORMS:
            part = _TAG_FORMS[key].format(value)
        elif isinstance(value, bool):
            part = key if value else f"no_{key}"
        else:
            part = f"{key}{value:.4g}" if isinstance(value, float) else f"{key}{value}" if isinstance(
                value, int) else f"{key}_{value}"
        parts.append(re.sub(r"[^A-Za-z0-9._]+", "_", part))
    return "".join(f"-{p}" for p in parts)


def output_tag(method: str, budget: int | None, float32_bytes: int, options: Mapping[str, Any]) -> str:
    """The default output's tag: the method, its budget and its options (``pq-b0.05``, ``lowbit-4b-g64``,
    ``svd-k64``), so that no two methods or settings share a name. A storage alone that ``quantize`` also names
    (``int8``, ``fp16``: every weight there, only the tables here) gets ``-tables``."""
    defaults: dict[str, Any] = {}
    for part in core.parse_method(method):
        if part is not None:
            defaults.update({f.name: f.default for f in dataclasses.fields(part.config)
                             if f.default is not dataclasses.MISSING})
    sizing = "" if budget is None else f"-b{budget / float32_bytes:.4g}"
    tag = f"{method.replace('+', '-')}{sizing}{option_tag(options, defaults)}"
    return f"{tag}-tables" if tag in QUANTIZE_TAGS.values() else tag


def compress_trimmed(
    path: str | os.PathLike[str],
    method: str,
    trim_corpus: str | os.PathLike[str],
    *,
    budget: str | float | None = None,
    tables: list[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> CompressResult:
    """Trim the vocabulary to the rows ``trim_corpus`` uses, then compress what is left with ``method``, in one
    output. ``budget`` stays a share of the *original* tables' float32 bytes, so the rows trimming frees are spent on
    the rows kept (more bits, finer codebooks). Methods that count tokens count them in ``corpus`` or, without it,
    in ``trim_corpus``."""
    src = Path(path)
    with load_checkpoint(src) as ckpt:
        found = find_embeddings(ckpt, tables)
    float32 = sum(4 * t.rows * t.cols for t in found)
    budget_bytes = parse_budget(budget, float32)
    tag = "trim-" + output_tag(method, budget_bytes, float32, {**(kwargs.get("options") or {}),
                                                                **(kwargs.get("storage_options") or {})})
    out = Path(output) if output is not None else default_output(src, tag)
    check_output(out, [src, Path(trim_corpus)], force=force)
    with temporary_folder(out) as tmp:
        trimmed_path = tmp / src.name
        trimmed = trim_checkpoint(src, trim_corpus, trimmed_path, progress=progress)
        with load_checkpoint(trimmed_path) as ckpt:
            kept = sum(4 * t.rows * t.cols for t in find_embeddings(ckpt, tables))
        if budget_bytes is not None and budget_bytes >= kept:
            raise InputError(f"trimmed to {trimmed.rows_after} rows the tables take {kept} bytes, within the budget "
                             f"of {budget_bytes}: `embcompress trim` alone is enough")
        result = compress(trimmed_path, method, budget=None if budget_bytes is None else str(budget_bytes),
                          tables=tables, corpus=corpus if corpus is not None else trim_corpus, output=out,
                          force=force, progress=progress, **kwargs)
    result.input = str(src)
    result.trimmed = {"rows_before": trimmed.rows_before, "rows_after": trimmed.rows_after, "float32_bytes": float32,
                      "corpus": str(trim_corpus)}
    return result


def compress(
    path: str | os.PathLike[str],
    method: str,
    *,
    budget: str | float | None = None,
    options: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    tables: list[str] | None = None,
    counts: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    encoded: Mapping[str, Table] | None = None,
) -> CompressResult:
    """Compress the checkpoint's tables with ``method`` and write the result; every check runs before writing.
    ``encoded``: tables already encoded with ``method`` at this budget, by tensor name (``--method auto`` passes
    those it measured), written instead of encoding again."""
    if method == "auto":
        raise InputError("--method auto measures every method on your texts first: give --data TEXTS "
                         "(embcompress.ops.plan.compress_auto)")
    start = time.perf_counter()
    src = Path(path)
    options, storage_options = dict(options or {}), dict(storage_options or {})
    structure, storage = core.parse_method(method)
    with load_checkpoint(src) as ckpt:
        quantized = quant_meta(ckpt)
        if quantized is not None:
            raise InputError(f"{src}: the checkpoint is quantized ({quantized.get('bits')}-bit); compress the float "
                             "model")
        previous = ckpt.embcompress_meta or {}
        if any(core.is_v2_entry(e) or e.get("factors") for e in (previous.get("tables") or {}).values()):
            raise InputError(f"{src}: its tables are already compressed; compress the original model")
        found = find_embeddings(ckpt, tables)
        float32 = sum(4 * t.rows * t.cols for t in found)
        budget_bytes = parse_budget(budget, float32)
        needs = {n for m in (structure, storage) if m for n in m.needs}
        row_counts = None
        counted: dict[str, Any] | None = None
        if "counts" in needs or counts is not None or corpus is not None:
            got = load_counts(src, tables, counts, corpus)
            if got is None:
                raise InputError(f"--method {method} needs token counts (--counts FILE or --corpus TEXTS)")
            row_counts = torch.from_numpy(got.counts).to(torch.float64)
            counted = got.to_dict()
        specs = {}
        for t in found:
            share = None if budget_bytes is None else int(budget_bytes * (4 * t.rows * t.cols) / float32)
            try:
                specs[t.name] = (core.make_spec(method, options, storage_options) if share is None else
                                 core.spec_for_budget(method, t.rows, t.cols, share, options, storage_options))
            except BudgetError as e:
                raise InputError(f"{t.name}: {e}") from None
        tag = output_tag(method, budget_bytes, float32, {**options, **storage_options})
        out = Path(output) if output is not None else default_output(src, tag)
        check_output(out, [src], force=force)
        tensors = {name: ckpt.tensor(name) for name in ckpt.names}
        results = []
        entries: dict[str, dict[str, Any]] = {}
        for t in found:
            check_finite(t.name, tensors[t.name], action="compress it")
            if progress:
                progress(f"{specs[t.name].name}: {t.name} ({t.rows} x {t.cols})")
            t0 = time.perf_counter()
            tensors, new = core.compress_state(tensors, specs[t.name], [t.name],
                                               counts={t.name: row_counts} if row_counts is not None else None,
                                               tied={t.name: list(t.tied)}, device=device, encoded=encoded)
            entry = new[t.name]
            if counted is not None:
                entry["counts"] = counted  # where the token counts came from
            entry["history"] = [{"op": "compress", "method": method, "tool": f"embcompress {__version__}",
                                 "budget_bytes": None if budget_bytes is None else
                                 int(budget_bytes * (4 * t.rows * t.cols) / float32)}]
            entries[t.name] = entry
            results.append({"name": t.name, "shape": [t.rows, t.cols], "method": specs[t.name].name,
                            "config": entry["config"], "storage_config": entry["storage_config"],
                            "float32_bytes": 4 * t.rows * t.cols, "bytes": entry["bytes"],
                            "fraction": entry["bytes"] / (4 * t.rows * t.cols), "info": entry["info"],
                            "tied": sorted(t.tied), "seconds": time.perf_counter() - t0})
        record = record_for(previous, entries)
        if progress:
            progress(f"writing {out}")
        save_checkpoint(tensors, out, like=ckpt, metadata={META_KEY: json.dumps(record)})
        file_after = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*.safetensors")))
        return CompressResult(str(src), str(out), ckpt.kind, method, budget_bytes, results, ckpt.file_bytes,
                              file_after, time.perf_counter() - start)


def record_for(previous: Mapping[str, Any], entries: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The file's record: the previous one with these tables' entries (format 2) and the tool's version."""
    tables = dict(previous.get("tables") or {})
    tables.update(entries)
    return {**{k: v for k, v in previous.items() if k not in ("tables", "tool", "format_version")},
            "format_version": core.RECORD_VERSION, "tool": f"embcompress {__version__}", "tables": tables,
            "history": history(previous, "compress", {"tables": sorted(entries)})}
