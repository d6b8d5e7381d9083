"""ONNX export of a classifier, with a parity check against PyTorch and optional int8 / fp16 weights.

``export_onnx`` loads any classifier ``load_classifier`` reads (dense, factorized, fine-tuned, or a quantized file,
which loads as a float model), wraps it in an export-only module and writes it with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``; the dynamo exporter needs ``onnxscript``, which embcompress does not
require).

Graph interface, the same for every architecture:

- input ``input_ids``: int64 [batch, seq], token ids right-padded with the pad id (0, ``<pad>``, as ``collate``
  pads); the ids are what ``Vocab.encode(tokenize(text))`` gives (the vocabulary, labels and pad id ride along in
  the file's metadata). A sequence's length is its number of non-pad tokens (at least 1), which is what
  ``collate`` passes as ``lengths``, so one input serves the DAN and the LSTM alike.
- output ``logits``: float32 [batch, classes] (``keep_io_types`` keeps it float32 in an fp16 file too).

Both axes of ``input_ids`` are dynamic.

Export-only wrappers do what the PyTorch modules cannot export, or do it more cheaply, with the same result:

- DAN: the masked mean is one batched MatMul of the 0/1 mask with the gathered rows. For a factorized table the
  mean is taken over the k-dim rows of W_a *before* the projection by W_b (the mean is linear, so
  mean(W_a[ids]) W_b = mean(W_a[ids] W_b)): the projection runs once per example, not once per token. As nothing
  but linear maps sits between W_b and the first linear layer (weight W_1, h x d), W_b is folded into it:
  W_1' = W_1 W_b^T is h x k, which is smaller than W_b and W_1 together and saves the d-dim intermediate.
- LSTM: packed sequences do not export, so each layer and direction runs as a plain ONNX LSTM over the padded
  batch, and the final state is read at position length-1 (for a forward direction the outputs before a sequence's
  end never see its padding, so this equals the packed final state). A backward direction runs over each sequence
  reversed within its length (pad positions stay put), so bidirectional and stacked LSTMs export exactly too. For a
  factorized table W_b is folded into the first layer's input weights (4h x d times d x k -> 4h x k), so the LSTM
  reads the k-dim rows of W_a directly.

The parity check always runs: onnxruntime against PyTorch on the same batches (texts from ``data`` when given,
else sentences of real vocabulary tokens; several batch sizes and lengths). The float32 graph must agree to
``FP32_TOLERANCE`` in every logit or nothing is written; for int8 / fp16 the fraction of identical predictions and
the largest logit difference are reported.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from ._version import __version__
from .checkpoint import atomic_path, check_finite_tensors, check_output, temporary_folder
from .classifier import Classifier, load_classifier
from .data import PAD_ID, UNK_ID, _decoded_lines, _open_binary, collate, tokenize
from .errors import DataError, DependencyError, EmbcompressError, InputError, OutputError
from .models import DAN, LSTMClassifier
from .methods.base import Table
from .modules import FACTORIZED, FactorizedEmbedding, GroupedFactorizedEmbedding

QUANTIZE_CHOICES = ("int8", "fp16")
OPSET_RANGE = (13, 20)  # 13: ReduceSum with axes as an input; 20: the TorchScript exporter's newest
FP32_TOLERANCE = 1e-4
MAX_ONNX_BYTES = 2_000_000_000  # protobuf's limit for one file (external data is not used)
MAX_PARITY_TEXTS = 512
MAX_PARITY_TOKENS = 512
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"


class ParityError(EmbcompressError):
    """The float32 ONNX graph does not reproduce the PyTorch model's logits (nothing was written)."""

    exit_code = 1


@dataclass
class TensorSpec:
    """One graph input or output: name, element type and shape (symbolic axes by name)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class Parity:
    """onnxruntime against PyTorch on the same batches."""

    source: str  # where the texts came from
    examples: int
    batches: list[list[int]]  # [batch, seq] of every batch run
    providers: list[str]
    fp32_max_abs_diff: float  # the float32 graph, always checked
    fp32_tolerance: float
    fp32_agreement: float
    max_abs_diff: float | None = None  # the written graph when quantized (int8 / fp16), else None
    agreement: float | None = None  # fraction of examples whose argmax is the same as PyTorch's


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how well it matches the PyTorch model."""

    input: str
    output: str
    arch: str
    factorized: bool
    rank: int | None
    quantize: str | None
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    graph: str  # which graph optimisation was applied
    file_bytes: int
    fp32_file_bytes: int  # the float32 graph (equal to file_bytes when not quantized)
    model_bytes: int  # the input checkpoint on disk
    parity: Parity
    checker: str = "passed"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- export-only modules ---------------------------------------------------------------------------------------


def _pad_id(model: nn.Module) -> int:
    """The id that marks padding: the model's padding index, else ``<pad>`` (0), which ``collate`` pads with."""
    return PAD_ID if model.padding_idx is None else int(model.padding_idx)


def _head_layers(model: DAN) -> list[nn.Module]:
    """The DAN's MLP and classifier with the dropouts left out (they are the identity in eval mode)."""
    return [m for m in [*model.mlp, model.classifier] if not isinstance(m, nn.Dropout)]


def _fold_linear(linear: nn.Linear, proj: torch.Tensor) -> nn.Linear:
    """``linear(x @ proj)`` as one linear layer: weight W proj^T (out x k), computed in float64."""
    folded = nn.Linear(proj.shape[0], linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        folded.weight.copy_((linear.weight.double() @ proj.double().t()).to(linear.weight.dtype))
        if linear.bias is not None:
            folded.bias.copy_(linear.bias)
    return folded


def _grouped_copy(emb: nn.Module) -> nn.Module | None:
    """A frozen copy of a table whose own lookup is exported as it is (GroupReduce, any registry table other than
    plain factors), else None."""
    if not isinstance(emb, Table) or isinstance(emb, FactorizedEmbedding):
        return None
    return copy.deepcopy(emb).requires_grad_(False)


class DANExport(nn.Module):
    """A DAN as ``input_ids -> logits`` with the masked mean taken before any projection.

    Dense table: Gather (V x d) -> masked mean (one MatMul with the mask) -> MLP. Factorized: Gather W_a (V x k)
    -> masked mean in k dims -> W_b, or (``fold=True``) W_b folded into the first linear layer.
    """

    def __init__(self, model: DAN, *, fold: bool = True) -> None:
        super().__init__()
        self.pad_id = _pad_id(model)
        emb = model.embedding
        layers = _head_layers(model)
        self.register_buffer("project", None)
        self.lookup = _grouped_copy(emb)
        if isinstance(emb, FactorizedEmbedding):
            self.register_buffer("rows", emb.weight_a.detach().clone())
            proj = emb.weight_b.detach()
            if fold:
                first = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
                layers[first] = _fold_linear(layers[first], proj)
            else:
                self.register_buffer("project", proj.clone())
        else:
            self.register_buffer("rows", None if self.lookup is not None else emb.weight.detach().clone())
        self.head = nn.Sequential(*layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.lookup is not None:
            vectors = self.lookup(input_ids)  # B x T x d, block by block
        else:
            vectors = F.embedding(input_ids, self.rows)  # B x T x k (or d)
        mask = (input_ids != self.pad_id).to(vectors.dtype)
        total = torch.matmul(mask.unsqueeze(1), vectors).squeeze(1)  # B x k: the sum over the real tokens
        mean = total / mask.sum(1, keepdim=True).clamp(min=1.0)
        if self.project is not None:
            mean = torch.matmul(mean, self.project)  # once per example: B x k times k x d
        return self.head(mean)


def _take_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t], :]`` for x B x T x C and index B x T (GatherElements in ONNX)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LSTMExport(nn.Module):
    """An LSTMClassifier as ``input_ids -> logits`` without packed sequences (see the module docstring)."""

    def __init__(self, model: LSTMClassifier, *, fold: bool = True) -> None:
        super().__init__()
        lstm = model.lstm
        self.pad_id = _pad_id(model)
        self.bidirectional = lstm.bidirectional
        self.num_layers = lstm.num_layers
        emb = model.embedding
        proj = None
        self.register_buffer("project", None)
        self.lookup = _grouped_copy(emb)
        if isinstance(emb, FactorizedEmbedding):
            self.register_buffer("rows", emb.weight_a.detach().clone())
            if fold:
                proj = emb.weight_b.detach()
            else:
                self.register_buffer("project", emb.weight_b.detach().clone())
        else:
            self.register_buffer("rows", None if self.lookup is not None else emb.weight.detach().clone())
        directions = ["", "_reverse"] if lstm.bidirectional else [""]
        self.cells = nn.ModuleList()
        for layer in range(lstm.num_layers):
            pair = nn.ModuleList()
            for sfx in directions:
                w_ih = getattr(lstm, f"weight_ih_l{layer}{sfx}").detach()
                if layer == 0 and proj is not None:
                    w_ih = (w_ih.double() @ proj.double().t()).to(w_ih.dtype)  # 4h x d times d x k
                cell = nn.LSTM(w_ih.shape[1], lstm.hidden_size, batch_first=True, bias=lstm.bias)
                with torch.no_grad():
                    cell.weight_ih_l0.copy_(w_ih)
                    cell.weight_hh_l0.copy_(getattr(lstm, f"weight_hh_l{layer}{sfx}"))
                    if lstm.bias:
                        cell.bias_ih_l0.copy_(getattr(lstm, f"bias_ih_l{layer}{sfx}"))
                        cell.bias_hh_l0.copy_(getattr(lstm, f"bias_hh_l{layer}{sfx}"))
                pair.append(cell)
            self.cells.append(pair)
        self.classifier = model.classifier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lengths = (input_ids != self.pad_id).sum(1).clamp(min=1)
        x = self.lookup(input_ids) if self.lookup is not None else F.embedding(input_ids, self.rows)
        if self.project is not None:
            x = torch.matmul(x, self.project)
        last = (lengths - 1).view(-1, 1)  # B x 1
        reverse = None
        if self.bidirectional:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # 1 x T
            # within its length a sequence is read back to front; pad positions map to themselves
            reverse = torch.where(positions < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - positions,
                                  positions)
        forward_out = backward_rev = x
        for pair in self.cells:
            forward_out = pair[0](x)[0]
            if reverse is not None:
                backward_rev = pair[1](_take_time(x, reverse))[0]
                x = torch.cat([forward_out, _take_time(backward_rev, reverse)], dim=-1)
            else:
                x = forward_out
        h = _take_time(forward_out, last)[:, 0]
        if reverse is not None:  # the backward direction ends its reversed run at length-1 too
            h = torch.cat([h, _take_time(backward_rev, last)[:, 0]], dim=-1)
        return self.classifier(h)


def export_module(model: nn.Module, *, fold: bool = True) -> tuple[nn.Module, str]:
    """The export-only wrapper of a classifier and a sentence naming the graph optimisation applied."""
    model = getattr(model, "module", model).eval()
    factorized = isinstance(model.embedding, FactorizedEmbedding)
    grouped = isinstance(model.embedding, GroupedFactorizedEmbedding)
    other = isinstance(model.embedding, Table) and not (factorized or grouped)
    if isinstance(model, DAN):
        wrapper = DANExport(model, fold=fold)
        if grouped:
            what = (f"GroupReduce lookup ({len(model.embedding.ranks)} blocks: a gather and a k_c x d product per "
                    "block, masked), then the masked mean as one MatMul with the pad mask")
        elif other:
            what = (f"the table's own lookup ({type(model.embedding).__name__}), then the masked mean as one MatMul "
                    "with the pad mask")
        elif not factorized:
            what = "masked mean of the d-dim rows as one MatMul with the pad mask (no factorization to exploit)"
        elif fold:
            first = next(m for m in wrapper.head if isinstance(m, nn.Linear))
            h, (k, d) = first.out_features, model.embedding.weight_b.shape
            what = (f"masked mean of the k-dim rows of W_a before the projection (once per example, not per "
                    f"token); W_b ({k} x {d}) folded into the first linear layer ({h} x {d} -> {h} x {k})")
        else:
            what = "masked mean of the k-dim rows of W_a, then the k x d projection by W_b once per example"
    elif isinstance(model, LSTMClassifier):
        wrapper = LSTMExport(model, fold=fold)
        layers = model.lstm.num_layers
        kind = ("bidirectional, " if model.lstm.bidirectional else "") + f"{layers} layer{'s' if layers > 1 else ''}"
        what = (f"LSTM ({kind}) over the padded batch, final state gathered at length-1"
                + ("" if not model.lstm.bidirectional else ", backward direction over each sequence reversed "
                   "within its length"))
        if grouped:
            what += f"; GroupReduce lookup ({len(model.embedding.ranks)} blocks) per token"
        elif factorized:
            what += ("; W_b folded into the LSTM's input weights (4h x k)" if fold
                     else "; W_b applied per token")
    else:
        raise InputError(f"cannot export a {type(model).__name__}: only the DAN and LSTM classifiers are known")
    return wrapper.eval(), what


# --- reading the parity texts -----------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike[str], limit: int = MAX_PARITY_TEXTS) -> list[str]:
    """Up to ``limit`` texts from JSON Lines (``{"text": ...}`` a line; a label or other keys are ignored)."""
    path = Path(path)
    texts: list[str] = []
    with _open_binary(path, "a JSON Lines file") as handle:
        for lineno, line in _decoded_lines(handle, path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text'")
            texts.append(obj["text"])
            if len(texts) >= limit:
                break
    if not texts:
        raise DataError(f"{path}: holds no texts (an empty file or only blank lines)")
    return texts


def parity_batches(
    clf: Classifier, texts: list[str] | None = None, *, seed: int = 0
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """(ids, lengths) batches for the parity check and a description of where they came from.

    With ``texts``: they are tokenized and encoded, and cut into batches of 1, 4, 16, 64, 1, 4, ... examples (each
    padded to its longest text). Without: sentences of real vocabulary tokens (the specials left out) in batches
    of 1 x 1, 1 x 12, 3 x 7, 8 x 20, 32 x 64 and 64 x 33 tokens, lengths drawn per sentence so padding varies.
    """
    if texts:
        seqs = [torch.tensor(clf.vocab.encode(tokenize(t))[:MAX_PARITY_TOKENS] or [UNK_ID]) for t in texts]
        batches, start, sizes = [], 0, (1, 4, 16, 64)
        while start < len(seqs):
            size = sizes[len(batches) % len(sizes)]
            chunk = seqs[start : start + size]
            b = collate([(s, 0) for s in chunk])
            batches.append((b.ids, b.lengths))
            start += size
        return batches, f"{len(seqs)} texts"
    g = torch.Generator().manual_seed(seed)
    V = len(clf.vocab)
    low = 2 if V > 2 else 1
    batches = []
    for bsz, seq in ((1, 1), (1, 12), (3, 7), (8, 20), (32, 64), (64, 33)):
        lengths = torch.randint(1, seq + 1, (bsz,), generator=g)
        lengths[0] = seq  # the longest sets the padded width
        chunk = [torch.randint(low, V, (int(n),), generator=g) for n in lengths]
        b = collate([(s, 0) for s in chunk])
        batches.append((b.ids, b.lengths))
    return batches, "sentences of random vocabulary tokens"


# --- onnxruntime helpers ----------------------------------------------------------------------------------------


def _ort_module(name: str) -> ModuleType:
    """A submodule of onnxruntime (quantization, transformers.float16), imported after ``runtime`` set it up."""
    runtime.import_onnxruntime()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise DependencyError(f"{name} cannot be imported ({e}); reinstall onnxruntime") from None


def _providers(device: str) -> list[Any]:
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
    return ort.InferenceSession(str(path), options, providers=_providers(device))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and the converters' warnings, prints and logging (the CLI output stays clean)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


# --- the export -------------------------------------------------------------------------------------------------


def _spec(value: Any) -> TensorSpec:
    import onnx

    t = value.type.tensor_type
    dims: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
    return TensorSpec(value.name, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)


def write_fp32_graph(wrapper: nn.Module, path: Path, opset: int) -> None:
    """Trace the wrapper and write a float32 ONNX graph with dynamic batch and sequence axes."""
    example = torch.full((2, 5), 2, dtype=torch.long)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def quantize_int8(src: Path, dst: Path, work: Path) -> None:
    """onnxruntime dynamic quantization, int8 weights (the embedding Gather, MatMul/Gemm and LSTM included).

    ``quant_pre_process`` (symbolic shape inference and graph optimisation) runs first: onnxruntime recommends it,
    and graphs from the dynamo exporter fail without it; the TorchScript exporter's graphs quantize either way.
    """
    shape_inference = _ort_module("onnxruntime.quantization.shape_inference")
    quantization = _ort_module("onnxruntime.quantization")
    pre = work / "pre.onnx"
    with _quiet():
        shape_inference.quant_pre_process(str(src), str(pre))
        quantization.quantize_dynamic(str(pre), str(dst), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["Gather", "MatMul", "Gemm", "LSTM"])


def convert_fp16(src: Path, dst: Path) -> None:
    """float16 weights and arithmetic; inputs and outputs keep their types (int64 ids in, float32 logits out)."""
    import onnx

    float16 = _ort_module("onnxruntime.transformers.float16")
    with _quiet():
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _add_metadata(model: Any, clf: Classifier, graph: str) -> None:
    """Everything needed to feed the graph text: vocabulary, labels, pad id, tokenizer and interface."""
    import onnx

    model.producer_name = "embcompress"
    model.producer_version = __version__
    model.doc_string = (f"{INPUT_NAME}: int64 [batch, seq], right-padded with the pad id; {OUTPUT_NAME}: float32 "
                        f"[batch, classes]. Graph: {graph}.")
    props = {
        "embcompress.labels": json.dumps(clf.labels.labels),
        "embcompress.vocab": json.dumps(clf.vocab.tokens),
        "embcompress.pad_id": str(_pad_id(clf.model)),
        "embcompress.tokenizer": "embcompress.data.tokenize: lower-case, Penn Treebank style; unknown tokens -> 1",
    }
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def _finish(path: Path, clf: Classifier, graph: str, what: str) -> None:
    """Add the metadata, run ``onnx.checker.check_model`` and save in place."""
    import onnx

    model = onnx.load(str(path))
    _add_metadata(model, clf, graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ParityError(f"the {what} graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    onnx.save(model, str(path))


def _compare(session: Any, clf: Classifier, batches: list[tuple[torch.Tensor, torch.Tensor]],
             ) -> tuple[float, float]:
    """(max |logit difference|, fraction of identical argmax) of an onnxruntime session against PyTorch."""
    worst, same, total = 0.0, 0, 0
    with torch.no_grad():
        for ids, lengths in batches:
            ref = clf.model(ids, lengths).float()
            got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: ids.numpy()})[0]).float()
            if got.shape != ref.shape:
                raise ParityError(f"onnxruntime returned logits of shape {tuple(got.shape)}, PyTorch "
                                  f"{tuple(ref.shape)}")
            diff = (got - ref).abs().max().item()
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
            same += int((got.argmax(1) == ref.argmax(1)).sum())
            total += ids.shape[0]
    return worst, same / total


def default_onnx_output(path: Path, quantize: str | None) -> Path:
    """``model.onnx`` beside ``model.safetensors`` (``model.int8.onnx``, ``model.fp16.onnx`` when quantized)."""
    stem = path.name if path.is_dir() else path.name.removesuffix(path.suffix)
    return path.parent / f"{stem}{'.' + quantize if quantize else ''}.onnx"


def export_onnx(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    quantize: str | None = None,
    opset: int = 17,
    data: str | os.PathLike[str] | None = None,
    device: str = "auto",
    force: bool = False,
    threads: int | None = None,
    fold_projection: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a classifier to ONNX (``input_ids`` -> ``logits``), check it against PyTorch, and write it atomically.

    ``quantize``: None (float32), ``"int8"`` (onnxruntime dynamic quantization, int8 weights) or ``"fp16"``.
    ``data``: JSON Lines texts for the parity check (default: sentences of vocabulary tokens). ``device``: where
    onnxruntime runs the check (``auto``: CUDA where present). ``threads``: onnxruntime's intra-op threads for the
    check (default: its own choice). ``fold_projection=False`` keeps W_b as its own MatMul (for comparison).
    Raises ParityError, writing nothing, when a float32 logit differs from PyTorch's by more than 1e-4.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InputError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise InputError(f"--opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]}, got {opset}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    src = Path(model_path)
    out = Path(output) if output is not None else default_onnx_output(src, quantize)
    runtime.import_onnxruntime()  # a missing extra is reported before any work
    _providers(device)
    import onnx

    inputs = [src] + ([Path(data)] if data is not None else [])
    check_output(out, inputs, force=force)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as model.onnx")
    say("loading the classifier")
    clf = load_classifier(src)
    check_finite_tensors(clf.model.state_dict().items(), action="export it")
    clf.model.eval().float()
    texts = read_texts(data) if data is not None else None
    batches, source = parity_batches(clf, texts)
    weight_bytes = sum(t.numel() * t.element_size() for t in clf.model.state_dict().values())
    if weight_bytes > MAX_ONNX_BYTES:
        raise InputError(f"{src}: {weight_bytes / 1e9:.1f} GB of weights is beyond what one ONNX file holds (2 GB, "
                         "the protobuf limit)")
    wrapper, graph = export_module(clf.model, fold=fold_projection)
    emb = clf.model.embedding
    rank = emb.rank if isinstance(emb, FACTORIZED) else None
    notes: list[str] = []

    with temporary_folder(out) as work:
        fp32 = work / "fp32.onnx"
        say("exporting the float32 graph")
        write_fp32_graph(wrapper, fp32, opset)
        _finish(fp32, clf, graph, "float32")
        say("checking float32 parity with PyTorch")
        session = make_session(fp32, device=device, threads=threads)
        providers = list(session.get_providers())
        fp32_diff, fp32_agree = _compare(session, clf, batches)
        del session
        if not fp32_diff <= FP32_TOLERANCE:
            raise ParityError(f"the ONNX graph differs from PyTorch by {fp32_diff:.3g} in a logit (tolerance "
                              f"{FP32_TOLERANCE:g}); nothing written")
        final = fp32
        diff = agree = None
        if quantize == "int8":
            say("quantizing to int8 (onnxruntime dynamic quantization)")
            final = work / "int8.onnx"
            quantize_int8(fp32, final, work)
            notes.append("int8: onnxruntime quantize_dynamic; int8 per-tensor weights for MatMul/Gemm/LSTM, an 8-bit "
                         "(uint8) table for the embedding Gather; activations quantized at run time")
        elif quantize == "fp16":
            say("converting to float16")
            final = work / "fp16.onnx"
            convert_fp16(fp32, final)
            notes.append("fp16: float16 weights and arithmetic, int64 input and float32 logits kept")
            if providers == ["CPUExecutionProvider"]:
                notes.append("fp16 on the CPU: onnxruntime casts ops lacking a float16 kernel back to float32")
        if quantize:
            _finish(final, clf, graph, quantize)
            say(f"checking {quantize} agreement with PyTorch")
            session = make_session(final, device=device, threads=threads)
            diff, agree = _compare(session, clf, batches)
            del session
        fp32_bytes = fp32.stat().st_size
        model = onnx.load(str(final), load_external_data=False)
        with atomic_path(out) as tmp:
            with open(final, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
    size = out.stat().st_size
    model_bytes = src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    parity = Parity(source=f"{source} from {data}" if data is not None else source,
                    examples=sum(int(ids.shape[0]) for ids, _ in batches),
                    batches=[list(ids.shape) for ids, _ in batches], providers=providers,
                    fp32_max_abs_diff=fp32_diff, fp32_tolerance=FP32_TOLERANCE, fp32_agreement=fp32_agree,
                    max_abs_diff=diff, agreement=agree)
    return ExportReport(
        input=str(src), output=str(out), arch=clf.model.config["arch"], factorized=rank is not None, rank=rank,
        quantize=quantize, opset=opset, inputs=[_spec(v) for v in model.graph.input],
        outputs=[_spec(v) for v in model.graph.output], graph=graph, file_bytes=size,
        fp32_file_bytes=fp32_bytes if quantize else size, model_bytes=model_bytes, parity=parity,
        seconds=time.perf_counter() - started, notes=notes,
    )
