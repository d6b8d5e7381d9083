"""Fixed-point and float16 quantization of a checkpoint's weights, the baseline the paper compares against.

Modelled on torchao's ``quantize_(model, config, filter_fn)``, but on state dicts and files rather than modules:
``quantize_state(tensors, bits, filter_fn=...)`` quantizes in memory, ``dequantize_state`` undoes it, and
``quantize(path, bits)`` writes a quantized checkpoint of the same kind as its input.

* ``bits=16``: float32/float64 tensors become float16 (any shape); float16, bfloat16 and integer tensors pass
  through.
* ``bits=8``: symmetric int8 of each 2-D floating tensor, one float32 scale per row: per row of an embedding table
  and of the factors ``<name>_a`` / ``<name>_b`` of a factorized table (so low rank + int8 works), per output
  channel (row of an [out, in] weight) of the other matrices. For a row r, scale_r = max_j |w_rj| / 127 and
  q_rj = round(w_rj / scale_r), so |w_rj - q_rj scale_r| <= scale_r / 2. The int8 tensor keeps its name and
  shape; its scales are the 1-D float32 tensor ``<name>_scale``. Biases, norms and other 1-D tensors, integer
  tensors, and matrices whose int8 form would not be smaller (a single column) pass through.

The file's record (safetensors metadata key ``embcompress``, format 2; :mod:`embcompress.record`) holds one entry per
quantized tensor under ``tensors``, the bits under ``quantized`` and the operation in ``history``::

    {"format_version": 2, "tool": "embcompress 0.1.0", "tables": {...a factorized file's tables, kept...},
     "quantized": {"bits": 8, "scale_dtype": "F32", "bytes_before": ..., "bytes_after": ...},
     "tensors": {"embeddings.word_embeddings.weight": {"storage": "int8", "dtype": "F32", "shape": [30522, 384],
                 "stored": "I8", "scheme": "int8_symmetric_per_row", "axis": 0,
                 "scale": "embeddings.word_embeddings.weight_scale", "role": "table", "max_abs_error": 0.0021,
                 "rel_error": 0.0043}, ...},
     "history": [..., {"op": "quantize", "tool": "embcompress 0.1.0", "options": {"bits": 8, "tables": null}}]}

``storage`` is the registry's storage (``int8``: one float32 scale per row, ``fp16``); ``scheme`` is
``int8_symmetric_per_row`` (tables and factors), ``int8_symmetric_per_channel`` (other matrices: a row of an
[out, in] weight is an output channel) or ``fp16`` (``scale`` null). Files written by 0.1.0.dev0 hold the same
per-tensor entries under their own key ``embcompress.quant`` (``QUANT_META_KEY``); :func:`quant_meta` reads either
form, and readers (``load_classifier``, ``hf.load``, ``load_factorized``) call :func:`dequantized_state_dict` and
get the original dtypes back.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import record
from ._version import __version__
from .checkpoint import (
    META_KEY,
    Checkpoint,
    check_output,
    default_output,
    dtype_name,
    load_checkpoint,
    save_checkpoint,
    torch_dtype,
)
from .errors import CheckpointError, InputError, TableError
from .methods.int8 import INT8_MAX, dequantize_int8, quantize_int8  # one int8 scheme everywhere
from .tables import find_embeddings, group_name

QUANT_META_KEY = "embcompress.quant"
QUANT_FORMAT_VERSION = 1
BITS: tuple[int, ...] = (8, 16)
TAGS = {8: "int8", 16: "fp16"}
SCALE_SUFFIX = "_scale"
SCHEME_ROW = "int8_symmetric_per_row"
SCHEME_CHANNEL = "int8_symmetric_per_channel"
SCHEME_FP16 = "fp16"
SCHEMES = (SCHEME_ROW, SCHEME_CHANNEL, SCHEME_FP16)
_FP16_MAX = torch.finfo(torch.float16).max
_BLOCK_ELEMS = 1 << 22  # rows are quantized in blocks of about this many elements

FilterFn = Callable[[str, torch.Tensor], bool]


# --- one tensor --------------------------------------------------------------------------------------------------


@dataclass
class _Err:
    """Running error sums: max |w - w'|, sum (w - w')^2 and sum w^2."""

    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_norm: float = 0.0

    def add(self, w: torch.Tensor, deq: torch.Tensor) -> None:
        diff = w.double() - deq.double()
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.sq_err += float((diff * diff).sum())
        self.sq_norm += float((w.double() ** 2).sum())

    def merge(self, other: _Err) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sq_err += other.sq_err
        self.sq_norm += other.sq_norm

    @property
    def rel(self) -> float:
        return math.sqrt(self.sq_err / self.sq_norm) if self.sq_norm > 0 else 0.0


def _error(w: torch.Tensor, deq: torch.Tensor) -> _Err:
    err = _Err()
    rows = w.shape[0] if w.dim() else 1
    flat_w, flat_d = w.reshape(rows, -1), deq.reshape(rows, -1)
    step = max(1, _BLOCK_ELEMS // max(1, flat_w.shape[1]))
    for i in range(0, rows, step):
        err.add(flat_w[i : i + step], flat_d[i : i + step])
    return err


def quantization_error(w: torch.Tensor, bits: int) -> float:
    """||w - dequant(quant(w))||_F / ||w||_F for int8 per row (``bits=8``) or float16 (``bits=16``)."""
    if bits == 8:
        q, s = quantize_int8(w)
        return _error(w, dequantize_int8(q, s)).rel
    if bits == 16:
        return _error(w, w.to(torch.float16)).rel
    raise InputError(f"bits must be 8 or 16, got {bits}")


# --- which tensors ---------------------------------------------------------------------------------------------


def eligible(name: str, tensor: torch.Tensor, bits: int) -> tuple[bool, str]:
    """Whether ``bits`` quantizes this tensor by default, and why not."""
    if not tensor.is_floating_point():
        return False, f"{name} is {dtype_name(tensor.dtype)}, not floating point"
    if bits == 16:
        if tensor.dtype in (torch.float16, torch.bfloat16):
            return False, f"{name} is already 16-bit ({dtype_name(tensor.dtype)})"
        return True, ""
    if tensor.dim() != 2:
        return False, f"{name} is {tensor.dim()}-D; int8 quantizes 2-D tensors (tables, factors, linear weights)"
    rows, cols = tensor.shape
    if rows * cols == 0:
        return False, f"{name} is empty"
    if rows * cols + 4 * rows >= rows * cols * tensor.element_size():
        return False, (f"{name} ({rows} x {cols} {dtype_name(tensor.dtype)}) would not be smaller as int8 with a "
                       "scale per row")
    return True, ""


def _check_values(name: str, tensor: torch.Tensor, bits: int) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise CheckpointError(
            f"tensor {name!r} holds {int((~finite).sum())} NaN or Inf value(s); refusing to quantize it"
        )
    if bits == 16 and tensor.numel():
        amax = float(tensor.abs().max())
        if amax > _FP16_MAX:
            raise CheckpointError(
                f"tensor {name!r} holds values up to {amax:.4g}, beyond float16's range ({_FP16_MAX:.0f}); use --bits 8"
            )


# --- a state dict --------------------------------------------------------------------------------------------------


@dataclass
class TensorResult:
    """What happened to one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # before
    stored: str  # after: I8 or F16
    scheme: str
    role: str  # "table", "factor", "linear" (other matrices) or "other"
    scale: str | None  # the scale tensor's name (int8)
    bytes_before: int
    bytes_after: int  # scales included
    max_abs_error: float
    rel_error: float


@dataclass
class GroupResult:
    """Quantized tensors sharing a name prefix (layer numbers folded into ``*``), as ``inspect`` groups them."""

    name: str
    tensors: int
    bytes_before: int
    bytes_after: int
    max_abs_error: float
    rel_error: float  # ||W - W'||_F / ||W||_F over the group's tensors together


@dataclass
class QuantizedState:
    """The result of :func:`quantize_state`: the tensors to write, the metadata record, and per-tensor figures."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    results: list[TensorResult]
    groups: list[GroupResult]
    passed_through: list[str]


def _group_name(name: str) -> str:

    return group_name(name)


def quantize_state(
    tensors: Mapping[str, torch.Tensor],
    bits: int = 8,
    *,
    filter_fn: FilterFn | None = None,
    roles: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizedState:
    """Quantize a state dict in memory (torchao's ``quantize_`` on tensors): every tensor that ``bits`` applies to
    (see :func:`eligible`) and that ``filter_fn(name, tensor)`` accepts (all when None).

    ``roles`` labels tensors ``"table"`` or ``"factor"`` (quantized per row, recorded as such); other matrices are
    quantized per output channel. Raises CheckpointError for NaN/Inf (or a float16 overflow) in a tensor to
    quantize, InputError for bad ``bits`` or a scale name already taken, TableError when nothing is quantized.
    """
    if bits not in BITS:
        raise InputError(f"--bits must be 8 (int8) or 16 (float16), got {bits}")
    roles = roles or {}
    chosen = [n for n, t in tensors.items() if eligible(n, t, bits)[0] and (filter_fn is None or filter_fn(n, t))]
    if not chosen:
        what = "2-D floating tensor" if bits == 8 else "float32 or float64 tensor"
        raise TableError(f"nothing to quantize: no {what} was selected")
    for name in chosen:
        _check_values(name, tensors[name], bits)
        if bits == 8 and f"{name}{SCALE_SUFFIX}" in tensors:
            raise InputError(f"cannot store the scales of {name!r}: a tensor {name + SCALE_SUFFIX!r} already exists")
    chosen_set = set(chosen)
    out: dict[str, torch.Tensor] = {}
    results: list[TensorResult] = []
    errors: dict[str, _Err] = {}
    entries: dict[str, Any] = {}
    for name, t in tensors.items():
        if name not in chosen_set:
            out[name] = t
            continue
        if progress:
            progress(f"quantizing {name} ({' x '.join(map(str, t.shape))})")
        role = roles.get(name) or ("linear" if t.dim() == 2 else "other")
        w = t.detach().cpu()
        if bits == 8:
            q, scale = quantize_int8(w)
            deq = dequantize_int8(q, scale)
            scale_name = f"{name}{SCALE_SUFFIX}"
            out[name], out[scale_name] = q, scale
            scheme = SCHEME_ROW if role in ("table", "factor") else SCHEME_CHANNEL
            after = q.numel() + scale.numel() * scale.element_size()
        else:
            out[name] = deq = w.to(torch.float16)
            scale_name, scheme, after = None, SCHEME_FP16, deq.numel() * 2
        err = errors[name] = _error(w, deq)
        del deq
        r = TensorResult(name, tuple(t.shape), dtype_name(t.dtype), dtype_name(out[name].dtype), scheme, role,
                         scale_name, t.numel() * t.element_size(), after, err.max_abs, err.rel)
        results.append(r)
        entries[name] = {"storage": "fp16" if scheme == SCHEME_FP16 else "int8", "dtype": r.dtype,
                         "shape": list(r.shape), "stored": r.stored, "scheme": scheme,
                         "axis": 0 if scale_name else None, "scale": scale_name, "role": role,
                         "max_abs_error": r.max_abs_error, "rel_error": r.rel_error}
    groups: dict[str, tuple[GroupResult, _Err]] = {}
    for r in results:
        g, gerr = groups.setdefault(_group_name(r.name), (GroupResult(_group_name(r.name), 0, 0, 0, 0.0, 0.0), _Err()))
        g.tensors += 1
        g.bytes_before += r.bytes_before
        g.bytes_after += r.bytes_after
        gerr.merge(errors[r.name])
    for g, gerr in groups.values():
        g.max_abs_error, g.rel_error = gerr.max_abs, gerr.rel
    meta = {
        "format_version": QUANT_FORMAT_VERSION,
        "tool": f"embcompress {__version__}",
        "bits": bits,
        "scale_dtype": "F32" if bits == 8 else None,
        "tensors": entries,
    }
    passed = [n for n in tensors if n not in chosen_set]
    return QuantizedState(out, meta, results, sorted((g for g, _ in groups.values()), key=lambda g: -g.bytes_before),
                          passed)


def parse_quant_meta(raw: str | Mapping[str, Any] | None, where: str = "checkpoint") -> dict[str, Any] | None:
    """The ``embcompress.quant`` record as a dict (None when absent); CheckpointError when it is damaged."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: the '{QUANT_META_KEY}' metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise CheckpointError(f"{where}: the '{QUANT_META_KEY}' metadata has no 'tensors' record")
    return meta


def dequantize_state(
    tensors: Mapping[str, torch.Tensor], meta: str | Mapping[str, Any] | None, *, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Undo :func:`quantize_state`: each recorded tensor back in its original dtype, the scale tensors dropped.
    ``meta`` is the record (dict or JSON); with None the tensors come back unchanged."""
    record = parse_quant_meta(meta, where)
    if record is None:
        return dict(tensors)
    entries = record["tensors"]
    scales = {e.get("scale") for e in entries.values() if isinstance(e, dict) and e.get("scale")}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in scales:
            continue
        entry = entries.get(name)
        if entry is None:
            out[name] = t
            continue
        scheme = entry.get("scheme") if isinstance(entry, dict) else None
        dtype = torch_dtype(str(entry.get("dtype"))) if isinstance(entry, dict) else None
        if scheme not in SCHEMES or dtype is None:
            raise CheckpointError(f"{where}: tensor {name!r} has an unknown quantization record ({entry!r:.80})")
        if scheme == SCHEME_FP16:
            out[name] = t.to(dtype)
            continue
        scale_name = entry.get("scale")
        if scale_name not in tensors:
            raise CheckpointError(f"{where}: the scales of {name!r} ({scale_name!r}) are missing")
        if t.dtype != torch.int8:
            raise CheckpointError(f"{where}: tensor {name!r} is recorded as int8 but stored as {dtype_name(t.dtype)}")
        out[name] = dequantize_int8(t, tensors[scale_name], dtype)
    missing = [n for n in entries if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: quantized tensor {missing[0]!r} is recorded but not stored")
    return out


def quant_meta(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The quantization record of a checkpoint written by ``quantize`` (None when it is not quantized), in one form
    whichever way it was written: ``{"bits", "scale_dtype", "tensors", "file", "tool", "format_version"}`` from the
    ``embcompress`` record (format 2) or from 0.1.0.dev0's ``embcompress.quant`` key."""
    where = str(ckpt.path)
    legacy = parse_quant_meta(ckpt.metadata.get(QUANT_META_KEY), where)
    if legacy is not None:
        return legacy
    rec = ckpt.embcompress_meta or {}
    if not rec.get("tensors") and not rec.get("quantized"):
        return None
    quantized = rec.get("quantized")
    if not isinstance(quantized, dict) or not isinstance(rec.get("tensors"), dict):
        raise CheckpointError(f"{where}: the '{META_KEY}' record of a quantized file lacks its 'quantized' or "
                              "'tensors' part")
    return {"format_version": rec.get("format_version"), "tool": rec.get("tool"), "bits": quantized.get("bits"),
            "scale_dtype": quantized.get("scale_dtype"), "tensors": rec["tensors"],
            "file": {k: quantized.get(k) for k in ("bytes_before", "bytes_after")}}


def dequantized_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, dequantized when it is quantized (the state dict of any other checkpoint)."""
    return dequantize_state(ckpt.state_dict(), quant_meta(ckpt), where=str(ckpt.path))


# --- a checkpoint ----------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """The whole run: per-tensor and per-group figures and the file-level totals."""

    input: str
    output: str
    kind: str
    bits: int
    tensors: list[TensorResult]
    groups: list[GroupResult]
    passed_through: int
    bytes_before: int
    bytes_after: int
    file_bytes_before: int
    file_bytes_after: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tables(self) -> list[TensorResult]:
        """The embedding tables and factors among the quantized tensors."""
        return [t for t in self.tensors if t.role in ("table", "factor")]

    @property
    def file_ratio(self) -> float:
        return self.file_bytes_after / self.file_bytes_before if self.file_bytes_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["file_ratio"] = self.file_ratio
        d["tables"] = [asdict(t) for t in self.tables]
        return d


def _roles(ckpt: Checkpoint) -> dict[str, str]:
    roles: dict[str, str] = {}
    for entry in ((ckpt.embcompress_meta or {}).get("tables") or {}).values():
        for name in entry.get("factors") or []:
            roles[name] = "factor"
    try:
        found = find_embeddings(ckpt)
    except TableError:
        found = []
    for table in found:
        for name in [table.name, *table.tied]:
            roles.setdefault(name, "table")
    return roles


def _match(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name == f"{pattern}.weight"


def _select(ckpt: Checkpoint, tensors: Mapping[str, torch.Tensor], patterns: list[str], bits: int) -> set[str]:
    """The tensors named by ``--tables`` (names or globs; a factorized table's name selects its factors): those of
    each pattern's matches that ``bits`` can quantize, at least one per pattern."""
    factors = {name: entry.get("factors") or [] for name, entry in ((ckpt.embcompress_meta or {}).get("tables")
                                                                     or {}).items()}
    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in tensors if _match(n, pattern)]
        hits += [f for table, fs in factors.items() if _match(table, pattern) for f in fs if f in tensors]
        if not hits:
            raise TableError(f"--tables {pattern!r}: no tensor of that name (see 'embcompress inspect')")
        usable = [name for name in hits if eligible(name, tensors[name], bits)[0]]
        if not usable:  # a glob may also match biases and the like; it must match something quantizable
            raise TableError(f"--tables {pattern!r}: {eligible(hits[0], tensors[hits[0]], bits)[1]}")
        selected.update(usable)
    return selected


def quantize(
    path: str | os.PathLike[str],
    bits: int = 8,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    *,
    tables: list[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize a checkpoint's weights to int8 (``bits=8``) or float16 (``bits=16``) and write the result.

    ``output`` defaults to ``model.int8.safetensors`` / ``model.fp16.safetensors`` (or ``<folder>-int8``) beside
    the input; ``force`` replaces an existing output. ``tables`` (names or globs) quantizes only those tensors,
    each of which must be quantizable; ``filter_fn(name, tensor)`` narrows the default choice further. Refuses an
    already quantized checkpoint, NaN/Inf in a tensor to quantize, and any bad output, writing nothing.
    """
    start = time.perf_counter()
    if bits not in BITS:
        raise InputError(f"--bits must be 8 (int8) or 16 (float16), got {bits}")
    src = Path(path)
    with load_checkpoint(src) as ckpt:
        previous = quant_meta(ckpt)
        if previous is not None:
            raise InputError(
                f"{src}: already quantized ({TAGS.get(previous.get('bits'), previous.get('bits'))}, "
                f"{len(previous['tensors'])} tensors); quantize the float model instead"
            )
        out = Path(output) if output is not None else default_output(src, TAGS[bits])
        check_output(out, [src], force=force)
        if progress:
            progress("finding the embedding tables")
        roles = _roles(ckpt)
        tensors = ckpt.state_dict()
        selected = _select(ckpt, tensors, tables, bits) if tables else None

        def accept(name: str, t: torch.Tensor) -> bool:
            return (selected is None or name in selected) and (filter_fn is None or filter_fn(name, t))

        state = quantize_state(tensors, bits, filter_fn=accept, roles=roles, progress=progress)
        bytes_after = sum(t.numel() * t.element_size() for t in state.tensors.values())
        prior = ckpt.embcompress_meta or {}  # a factorized file's tables and history are kept
        rec = record.file_record(
            prior, prior.get("tables") or {}, op="quantize", options={"bits": bits, "tables": tables},
            tensors=state.meta["tensors"],
            quantized={"bits": bits, "scale_dtype": state.meta["scale_dtype"], "bytes_before": ckpt.total_bytes,
                       "bytes_after": bytes_after},
            **({"file": prior["file"]} if "file" in prior else {}))
        metadata = {META_KEY: json.dumps(rec)}
        if progress:
            progress(f"writing {out}")
        save_checkpoint(state.tensors, out, like=ckpt, metadata=metadata)
        file_after = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*.safetensors")))
        return QuantizeResult(
            input=str(src),
            output=str(out),
            kind=ckpt.kind,
            bits=bits,
            tensors=state.results,
            groups=state.groups,
            passed_through=len(state.passed_through),
            bytes_before=ckpt.total_bytes,
            bytes_after=bytes_after,
            file_bytes_before=ckpt.file_bytes,
            file_bytes_after=file_after,
            seconds=time.perf_counter() - start,
        )
