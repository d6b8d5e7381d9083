"""The classifiers' ONNX graph (DAN, LSTM): ``input_ids -> logits``, checked against PyTorch.

``export_classifier`` loads any classifier ``load_classifier`` reads (dense, factorized, fine-tuned, a quantized file,
which loads as a float model, or a registry table such as int8 rows or low-bit groups, which stays as stored), wraps
it in an export-only module and hands it to the shared pipeline (``onnx.write_export``).

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
- Any other table (GroupReduce blocks, a table kept in a storage) is looked up by its own module's forward, so its
  ONNX lowering is its method's.

The parity check always runs: onnxruntime against PyTorch on the same batches (texts from ``data`` when given,
else sentences of real vocabulary tokens; several batch sizes and lengths). The float32 graph must agree to
``FP32_TOLERANCE`` in every logit or nothing is written; for a quantized graph the fraction of identical predictions
and the largest logit difference are reported.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import runtime
from ..checkpoint import check_finite_tensors, check_output
from ..classifier import Classifier, load_classifier
from ..data import PAD_ID, UNK_ID, collate, read_texts, tokenize
from ..errors import InputError, OutputError
from ..methods.base import Table
from ..models import DAN, LSTMClassifier
from ..modules import FACTORIZED, FactorizedEmbedding, GroupedFactorizedEmbedding
from .onnx import (
    FP32_TOLERANCE,
    MAX_ONNX_BYTES,
    Check,
    ParityError,
    TensorSpec,
    check_decodable,
    check_options,
    check_tables,
    default_onnx_output,
    providers,
    write_export,
)
from .weights import DEFAULT_BLOCK_SIZE

MAX_PARITY_TEXTS = 512
MAX_PARITY_TOKENS = 512
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
LATENCY_BATCHES = (1, 64)


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
    max_abs_diff: float | None = None  # the written graph when quantized (int8 / int4 / fp16), else None
    agreement: float | None = None  # fraction of examples whose argmax is the same as PyTorch's


@dataclass
class ExportReport:
    """What ``export_classifier`` wrote and how well it matches the PyTorch model."""

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
    latency_ms: dict[int, float] = field(default_factory=dict)  # by batch size, when asked for

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


class _ClassifierGraph(nn.Module):
    """The interface of every classifier graph: ``input_ids`` -> ``logits``."""

    INPUTS: ClassVar[tuple[str, ...]] = (INPUT_NAME,)
    OUTPUTS: ClassVar[tuple[str, ...]] = (OUTPUT_NAME,)
    DYNAMIC_AXES: ClassVar[dict[str, dict[int, str]]] = {INPUT_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch"}}

    def example(self) -> tuple[torch.Tensor]:
        return (torch.full((2, 5), 2, dtype=torch.long),)


class DANExport(_ClassifierGraph):
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


class LSTMExport(_ClassifierGraph):
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




# --- the family and the export ----------------------------------------------------------------------------------


class ClassifierFamily:
    """The classifier graph for :func:`onnx.write_export`: parity on (ids, lengths) batches, logits compared."""

    differs_in = "a logit"
    score_name = "agreement"

    def __init__(self, clf: Classifier, texts: list[str] | None, *, fold: bool = True) -> None:
        self.clf = clf
        self.batches, self.source = parity_batches(clf, texts)
        self.graph, self.description = export_module(clf.model, fold=fold)

    def metadata(self) -> tuple[str, dict[str, str]]:
        """Everything needed to feed the graph text: vocabulary, labels, pad id, tokenizer and interface."""
        doc = (f"{INPUT_NAME}: int64 [batch, seq], right-padded with the pad id; {OUTPUT_NAME}: float32 "
               f"[batch, classes]. Graph: {self.description}.")
        return doc, {
            "embcompress.labels": json.dumps(self.clf.labels.labels),
            "embcompress.vocab": json.dumps(self.clf.vocab.tokens),
            "embcompress.pad_id": str(_pad_id(self.clf.model)),
            "embcompress.tokenizer": "embcompress.data.tokenize: lower-case, Penn Treebank style; unknown tokens -> 1",
        }

    def check(self, session: Any, reference: bool = False) -> Check:
        """max |logit difference| and the fraction of identical argmax, onnxruntime against PyTorch (the graph is
        the reference: a classifier is not tuned for its export)."""
        worst, same, total = 0.0, 0, 0
        with torch.no_grad():
            for ids, lengths in self.batches:
                ref = self.clf.model(ids, lengths).float()
                got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: ids.numpy()})[0]).float()
                if got.shape != ref.shape:
                    raise ParityError(f"onnxruntime returned logits of shape {tuple(got.shape)}, PyTorch "
                                      f"{tuple(ref.shape)}")
                diff = (got - ref).abs().max().item()
                worst = max(worst, diff if math.isfinite(diff) else math.inf)
                same += int((got.argmax(1) == ref.argmax(1)).sum())
                total += ids.shape[0]
        return Check(worst, same / total)

    def min_score(self, quantize: str) -> float | None:
        return None  # a quantized classifier's agreement is reported, not gated

    def latency_feeds(self, sizes: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
        seqs = [ids[i, : int(n)] for ids, lengths in self.batches for i, n in enumerate(lengths)]
        return {size: {INPUT_NAME: collate([(seqs[i % len(seqs)], 0) for i in range(size)]).ids.numpy()}
                for size in sizes}


def export_classifier(
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
    latency: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    decode_at_load: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a classifier to ONNX (``input_ids`` -> ``logits``), check it against PyTorch, and write it atomically.

    ``quantize``: None (float32), ``"int8"`` / ``"int4"`` (weight-only, see ``weights.py``) or ``"fp16"``.
    ``data``: JSON Lines texts for the parity check (default: sentences of vocabulary tokens). ``device``: where
    onnxruntime runs the check (``auto``: CUDA where present). ``threads``: onnxruntime's intra-op threads for the
    check (default: its own choice). ``fold_projection=False`` keeps W_b as its own MatMul (for comparison).
    ``latency``: also time the written graph at batch 1 and 64.
    Raises ParityError, writing nothing, when a float32 logit differs from PyTorch's by more than 1e-4.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    check_options(quantize, opset, threads)
    src = Path(model_path)
    out = Path(output) if output is not None else default_onnx_output(src, quantize)
    runtime.import_onnxruntime()  # a missing extra is reported before any work
    providers(device)
    check_output(out, [src] + ([Path(data)] if data is not None else []), force=force)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as model.onnx")
    say("loading the classifier")
    clf = load_classifier(src)
    check_finite_tensors(clf.model.state_dict().items(), action="export it")
    check_tables(clf.model)
    if decode_at_load:
        check_decodable(clf.model)
    clf.model.eval()
    for param in clf.model.parameters():  # float32 weights; a stored table's buffers (fp16 scales ...) stay as stored
        param.data = param.data.float()
    texts = read_texts(data, limit=MAX_PARITY_TEXTS) if data is not None else None
    weight_bytes = sum(t.numel() * t.element_size() for t in clf.model.state_dict().values())
    if weight_bytes > MAX_ONNX_BYTES:
        raise InputError(f"{src}: {weight_bytes / 1e9:.1f} GB of weights is beyond what one ONNX file holds (2 GB, "
                         "the protobuf limit)")
    family = ClassifierFamily(clf, texts, fold=fold_projection)
    emb = clf.model.embedding
    rank = emb.rank if isinstance(emb, FACTORIZED) else None
    written = write_export(family, out, quantize=quantize, opset=opset, device=device, threads=threads,
                           latency=LATENCY_BATCHES if latency else (), block_size=block_size,
                           decode_at_load=decode_at_load, progress=say)
    model_bytes = src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    q = written.quantized
    parity = Parity(source=f"{family.source} from {data}" if data is not None else family.source,
                    examples=sum(int(ids.shape[0]) for ids, _ in family.batches),
                    batches=[list(ids.shape) for ids, _ in family.batches], providers=written.providers,
                    fp32_max_abs_diff=written.fp32.max_abs_diff, fp32_tolerance=FP32_TOLERANCE,
                    fp32_agreement=written.fp32.score, max_abs_diff=q.max_abs_diff if q else None,
                    agreement=q.score if q else None)
    return ExportReport(
        input=str(src), output=str(out), arch=clf.model.config["arch"], factorized=rank is not None, rank=rank,
        quantize=quantize, opset=opset, inputs=written.inputs, outputs=written.outputs, graph=family.description,
        file_bytes=written.file_bytes, fp32_file_bytes=written.fp32_file_bytes if quantize else written.file_bytes,
        model_bytes=model_bytes, parity=parity, seconds=time.perf_counter() - started, notes=written.notes,
        latency_ms=written.latency_ms,
    )
