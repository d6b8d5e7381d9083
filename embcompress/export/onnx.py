"""The ONNX pipeline every model family shares: write the float32 graph, check it, quantize, check again, time it.

A family (``classifier.py``, ``transformers.py``) gives an export-only ``nn.Module`` (its ``INPUTS``, ``OUTPUTS``,
``DYNAMIC_AXES`` and ``example()`` fix the graph's interface) and a :class:`Family` object that checks an
onnxruntime session against the torch model and names the metadata. Tables are exported through their own
modules' forward (a ``StoredTable`` of int8 is a Gather of int8 rows, a Gather of scales and a Mul; a ``lowbit``
table one ``com.microsoft::GatherBlockQuantized``), so the file holds the table as it is stored.

Steps, in a scratch folder beside the output, nothing written at the output until the last one:

1. trace the wrapper with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``; the dynamo
   exporter needs ``onnxscript``, which embcompress does not require) into a float32 graph, add the metadata and
   run ``onnx.checker``;
2. parity of the float32 graph in onnxruntime: its largest difference to torch must stay within ``FP32_TOLERANCE``
   (or the family's tolerance), or nothing is written;
3. ``quantize``: ``int8`` / ``int4`` weight-only (``weights.py``: activations stay float), ``fp16`` weights and
   arithmetic (onnxruntime's float16 converter, inputs and outputs keep their types); the quantized graph is
   checked too, and refused only below the family's threshold (``Family.min_score``);
4. latency (median of repeated onnxruntime calls) at the family's batch sizes, when asked for;
5. the file is copied to the output atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import runtime
from .._version import __version__
from ..checkpoint import atomic_path, temporary_folder
from ..errors import DependencyError, EmbcompressError, InputError
from ..methods.base import StoredTable, Table, get
from ..methods.lowbit import ONNX_BITS, LowBitConfig
from .weights import BITS, DEFAULT_BLOCK_SIZE, quantize_weights

QUANTIZE_CHOICES = ("int8", "int4", "fp16")
OPSET_RANGE = (13, 20)  # 13: ReduceSum with axes as an input; 20: the TorchScript exporter's newest
FP32_TOLERANCE = 1e-4
MAX_ONNX_BYTES = 2_000_000_000  # protobuf's limit for one file (external data is not used)
LATENCY_REPEATS = 100  # timed onnxruntime calls at batch 1; the latency is their median
LATENCY_SECONDS = 2.0  # larger batches are timed for about this long (at least MIN_LATENCY_REPEATS calls)
MIN_LATENCY_REPEATS = 5


class ParityError(EmbcompressError):
    """An ONNX graph does not reproduce the torch model (nothing was written)."""

    exit_code = 1


@dataclass
class TensorSpec:
    """One graph input or output: name, element type and shape (symbolic axes by name)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class Check:
    """One onnxruntime session against torch: the largest difference in the family's main output and its score
    (fraction of identical predictions for classifiers, mean cosine for encoders), plus the family's figures."""

    max_abs_diff: float
    score: float
    figures: dict[str, float] = field(default_factory=dict)


class Family(Protocol):
    """What a model family gives the pipeline."""

    graph: nn.Module  # the export-only wrapper: INPUTS, OUTPUTS, DYNAMIC_AXES, example()
    description: str  # the graph, in words
    differs_in: str  # "a logit", "the sentence embeddings": where the float32 difference is measured
    score_name: str  # "agreement", "mean cosine"

    def metadata(self) -> tuple[str, dict[str, str]]:
        """The model's doc string and ``metadata_props``."""

    def check(self, session: Any, reference: bool = False) -> Check:
        """onnxruntime against torch on the family's parity inputs; ``reference``: against the model as given
        rather than ``graph`` (they differ where the graph was tuned for its quantized export)."""

    def min_score(self, quantize: str) -> float | None:
        """The score a quantized graph must reach (None: reported only)."""

    def latency_feeds(self, sizes: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
        """Inputs of each batch size for the latency."""


@dataclass
class Written:
    """What :func:`write_export` wrote and measured."""

    output: Path
    file_bytes: int
    fp32_file_bytes: int
    providers: list[str]
    fp32: Check
    quantized: Check | None
    latency_ms: dict[int, float]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    notes: list[str]


# --- options and onnxruntime ----------------------------------------------------------------------------------


def check_options(quantize: str | None, opset: int, threads: int | None,
                  choices: tuple[str, ...] = QUANTIZE_CHOICES, family: str = "") -> None:
    """InputError for a quantization, opset or thread count out of range (before any work)."""
    if quantize is not None and quantize not in choices:
        where = f" for {family}" if family else ""
        raise InputError(f"--quantize must be one of {', '.join(choices)}{where}, got {quantize!r}")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise InputError(f"--opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]}, got {opset}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")


def check_tables(model: nn.Module) -> None:
    """InputError, before anything is written, for a table whose storage has no ONNX lowering (a 3-bit lowbit
    table: onnxruntime has no kernel for it)."""
    for name, module in model.named_modules():
        if not isinstance(module, StoredTable):
            continue
        config = module.storage_config
        if not get(module.storage.name).onnx:
            raise InputError(f"table {name}: the {module.storage.name} storage has no ONNX lowering")
        if isinstance(config, LowBitConfig) and config.bits not in ONNX_BITS:
            raise InputError(f"table {name}: a {config.bits}-bit lowbit table has no onnxruntime kernel "
                             f"(GatherBlockQuantized reads {', '.join(map(str, ONNX_BITS))} bits); store it at 2 or "
                             "4 bits to export it")


def ort_module(name: str) -> ModuleType:
    """A submodule of onnxruntime (quantization, transformers.float16), imported after ``runtime`` set it up."""
    runtime.import_onnxruntime()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise DependencyError(f"{name} cannot be imported ({e}); reinstall onnxruntime") from None


def providers(device: str) -> list[Any]:
    """``execution_providers(device)`` for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, with TF32 off on CUDA so that
    the float32 parity is float32's; InputError for an unknown device or ``cuda`` without a CUDA provider."""
    base, _, index = device.partition(":")
    if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    names = runtime.execution_providers(base)
    if base == "cuda" and "CUDAExecutionProvider" not in names:
        raise InputError(f"device {device!r} asked for, but onnxruntime has no CUDA execution provider (install "
                         "the [onnxruntime-gpu] extra, or use --device cpu or auto)")
    options = {"use_tf32": "0", **({"device_id": index} if index else {})}
    return [(n, options) if n == "CUDAExecutionProvider" else n for n in names]


def make_session(path: str | os.PathLike[str], *, device: str = "auto", threads: int | None = None) -> Any:
    """An onnxruntime InferenceSession for a file (CUDA first where present and asked for)."""
    ort = runtime.import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers(device))


def measure_latency(session: Any, batches: dict[int, dict[str, np.ndarray]], *, repeats: int = LATENCY_REPEATS,
                    threads: int | None = None) -> dict[int, float]:
    """Median milliseconds of one onnxruntime call per batch size, after warm-up. ``session`` is a session or an
    ONNX file (opened on the CPU with ``threads``). Batches beyond the first are timed for about
    ``LATENCY_SECONDS`` (``repeats`` calls at most, ``MIN_LATENCY_REPEATS`` at least)."""
    if isinstance(session, (str, os.PathLike)):
        session = make_session(session, device="cpu", threads=threads)
    out = {}
    for i, (size, feeds) in enumerate(batches.items()):
        t0 = time.perf_counter()
        session.run(None, feeds)
        first = time.perf_counter() - t0
        n = repeats if i == 0 else max(MIN_LATENCY_REPEATS, min(repeats, int(LATENCY_SECONDS / max(first, 1e-6))))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[size] = 1000 * statistics.median(times)
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and the converters' warnings, prints and logging (the CLI output stays clean)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


# --- the graph ------------------------------------------------------------------------------------------------


def tensor_spec(value: Any) -> TensorSpec:
    """A graph input or output as a :class:`TensorSpec`."""
    import onnx

    t = value.type.tensor_type
    dims: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
    return TensorSpec(value.name, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)


class _AllRows(torch.autograd.Function):
    """``arange(rows)`` that torch's exporter leaves in the graph as ``Range(0, Abs(rows), 1)``: its constant folding
    has no rule for ``Abs``, so a table decoded from these ids stays its stored tensors in the file, and onnxruntime's
    own constant folding decodes it once, when a session loads the graph."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        return torch.arange(int(rows))

    @staticmethod
    def symbolic(g: Any, rows: Any) -> Any:
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int64))
        one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int64))
        return g.op("Range", zero, g.op("Abs", rows), one)


class DecodedAtLoad(nn.Module):
    """Export-only stand-in for a compressed table (``export --decode-at-load``): the table's own lowering run on
    every row id, a subgraph of constants that onnxruntime folds into a float32 table when it loads the file, then
    one ``Gather`` a call. The file keeps the stored bytes; lookups cost a float32 ``Gather``; the session holds
    the table in float32."""

    def __init__(self, table: Table) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.padding_idx = table.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _AllRows.apply(torch.tensor(self.table.num_embeddings, dtype=torch.int64))
        return nn.functional.embedding(ids, self.table(rows))


def folds_at_load(table: Table) -> bool:
    """Whether onnxruntime can decode ``table`` when it loads a graph: no part of it is kept in a storage whose
    lowering is a contrib op (``lowbit``'s GatherBlockQuantized runs at every call and is never folded)."""
    return all(m.storage.folds_at_load for m in table.modules() if isinstance(m, StoredTable))


@contextlib.contextmanager
def decoded_at_load(model: nn.Module) -> Iterator[tuple[int, int]]:
    """Inside the block, every compressed table of ``model`` that :func:`folds_at_load` is read through
    :class:`DecodedAtLoad` (the modules are put back after); yields (tables decoded, tables kept as stored). A tied
    output layer keeps reading its table directly."""
    inside: set[int] = {id(m) for m in model.modules()} if isinstance(model, Table) else set()
    swaps: list[tuple[nn.Module, str, Table]] = []
    wrappers: dict[int, DecodedAtLoad] = {}
    kept: set[int] = set()
    for parent in model.modules():
        if id(parent) in inside:
            continue
        for name, child in parent.named_children():
            if isinstance(child, Table):
                inside.update(id(m) for m in child.modules())
                if folds_at_load(child):
                    swaps.append((parent, name, child))
                else:
                    kept.add(id(child))
    for parent, name, child in swaps:
        setattr(parent, name, wrappers.setdefault(id(child), DecodedAtLoad(child)))
    try:
        yield len(wrappers), len(kept)
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def check_decodable(model: nn.Module) -> None:
    """InputError (before any work) for ``--decode-at-load`` on a model with no table onnxruntime could decode
    (the tables :func:`decoded_at_load` would find)."""
    with decoded_at_load(model) as (decoded, kept):
        pass
    if not decoded + kept:
        raise InputError("--decode-at-load: the model has no compressed table to decode (its tables are float32 "
                         "already)")
    if not decoded:
        raise InputError("--decode-at-load: every table of the model is kept in lowbit, whose GatherBlockQuantized "
                         "onnxruntime runs at every call and never folds; export without it")


def write_fp32_graph(wrapper: nn.Module, path: Path, opset: int) -> None:
    """Trace the wrapper and write a float32 ONNX graph with its dynamic axes."""
    with quiet(), torch.no_grad():
        torch.onnx.export(
            wrapper, wrapper.example(), str(path), input_names=list(wrapper.INPUTS),
            output_names=list(wrapper.OUTPUTS), dynamic_axes=wrapper.DYNAMIC_AXES, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )


def convert_fp16(src: Path, dst: Path) -> None:
    """float16 weights and arithmetic; inputs and outputs keep their types."""
    import onnx

    float16 = ort_module("onnxruntime.transformers.float16")
    with quiet():
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def finish(path: Path, doc: str, props: dict[str, str], what: str) -> None:
    """Add the producer, doc string and metadata, run ``onnx.checker.check_model`` and save in place."""
    import onnx

    model = onnx.load(str(path))
    model.producer_name = "embcompress"
    model.producer_version = __version__
    model.doc_string = doc
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ParityError(f"the {what} graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    onnx.save(model, str(path))


def default_onnx_output(path: Path, quantize: str | None) -> Path:
    """``model.onnx`` beside ``model.safetensors`` or a model folder (``model.int8.onnx`` ... when quantized)."""
    stem = path.name if path.is_dir() else path.name.removesuffix(path.suffix)
    return path.parent / f"{stem}{'.' + quantize if quantize else ''}.onnx"


def _quantize(src: Path, work: Path, quantize: str, block_size: int,
              calibration: list[dict[str, np.ndarray]] | None = None,
              calibration_mask: str | None = None,
              fixed: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> tuple[Path, list[str]]:
    dst = work / f"{quantize}.onnx"
    if quantize in BITS:
        with quiet():
            done = quantize_weights(src, dst, quantize, block_size=block_size, calibration=calibration,
                                    calibration_mask=calibration_mask, fixed=fixed)
        return dst, [f"{quantize} weight-only (activations stay float32): " + (", ".join(done) or "no float weight")]
    convert_fp16(src, dst)
    return dst, ["fp16: float16 weights and arithmetic, the inputs' and outputs' types kept"]


def write_export(family: Family, out: Path, *, quantize: str | None, opset: int, device: str = "auto",
                 threads: int | None = None, latency: tuple[int, ...] = (), tolerance: float | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, decode_at_load: bool = False,
                 fixed: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 progress: Callable[[str], None] | None = None) -> Written:
    """Steps 1-5 of the module docstring for one family's graph; ParityError (nothing written) on a failed check.
    ``decode_at_load``: each compressed table that onnxruntime can fold is written as :class:`DecodedAtLoad`.
    ``fixed``: 4-bit stored tensors chosen beforehand (``export.tune``); the quantized graph is then checked
    against the family's reference model."""
    say = progress or (lambda _msg: None)
    import onnx

    tol = FP32_TOLERANCE if tolerance is None else tolerance
    doc, props = family.metadata()
    notes: list[str] = []
    decoding = decoded_at_load(family.graph) if decode_at_load else contextlib.nullcontext((0, 0))
    with temporary_folder(out) as work:
        fp32 = work / "fp32.onnx"
        say("exporting the float32 graph")
        with decoding as (decoded, kept):
            write_fp32_graph(family.graph, fp32, opset)
        finish(fp32, doc, props, "float32")
        say("checking float32 parity with torch")
        session = make_session(fp32, device=device, threads=threads)
        used = list(session.get_providers())
        fp32_check = family.check(session)
        if not fp32_check.max_abs_diff <= tol:
            raise ParityError(f"the ONNX graph differs from PyTorch by {fp32_check.max_abs_diff:.3g} in "
                              f"{family.differs_in} (tolerance {tol:g}); nothing written")
        final, check = fp32, None
        if quantize:
            say(f"quantizing ({quantize})")
            feeds = getattr(family, "calibration_feeds", None)  # optional: a family's inputs for GPTQ (int4)
            calibration = feeds() if feeds is not None and quantize == "int4" else None
            final, notes = _quantize(fp32, work, quantize, block_size, calibration,
                                     getattr(family, "calibration_mask", None), fixed)
            if quantize == "fp16" and used == ["CPUExecutionProvider"]:
                notes.append("fp16 on the CPU: onnxruntime casts ops lacking a float16 kernel back to float32")
            finish(final, doc, props, quantize)
            say(f"checking the {quantize} graph against torch")
            session = make_session(final, device=device, threads=threads)
            check = family.check(session, reference=True)
            need = family.min_score(quantize)
            if need is not None and not check.score >= need:
                raise ParityError(f"the {quantize} graph's {family.score_name} to PyTorch is {check.score:.4f}, "
                                  f"below {need:g}; nothing written")
        times = {}
        if latency:
            say("timing onnxruntime")
            times = measure_latency(session, family.latency_feeds(latency))
        del session
        fp32_bytes = fp32.stat().st_size
        model = onnx.load(str(final), load_external_data=False)
        with atomic_path(out) as tmp:
            with open(final, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
    if decode_at_load:
        notes.append(f"decoded at load: {decoded} table(s) written as their stored tensors and a subgraph onnxruntime "
                     "folds into float32 when it loads the file (then one Gather a call; the session holds them in "
                     "float32)" + (f"; {kept} kept as stored (GatherBlockQuantized, which onnxruntime runs at every "
                                   "call)" if kept else ""))
    return Written(out, out.stat().st_size, fp32_bytes, used, fp32_check, check, times,
                   [tensor_spec(v) for v in model.graph.input], [tensor_spec(v) for v in model.graph.output], notes)
