"""Hugging Face encoders' ONNX graph: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``,
``sentence_embedding`` (the mean over the attended tokens, the all-MiniLM / sentence-transformers pooling).

The model is loaded with ``hf.load`` (dense, factorized, GroupReduce, or a table kept in a storage such as low-bit
groups) and traced through the shared pipeline (``onnx.write_export``); each table goes through its own module's
forward, so a factorized table is a Gather from W_a and a MatMul by W_b, a low-bit table one GatherBlockQuantized.
Parity: the texts (or a built-in set) in one padded batch and one at a time, on the CPU. The float32 graph must
reproduce torch's sentence embeddings within ``tolerance`` (1e-4); a quantized graph (``int8``, ``int4``:
weight-only) is refused when its mean cosine to torch's sentence embeddings falls below ``MIN_COSINE``. With
``tune`` steps (int4 only) the layers' 4-bit codes are chosen in torch and their scales, the biases and the norms
distilled toward the model before it is traced (:mod:`.tune`); the quantized graph is still checked against the
model as given.
"""

from __future__ import annotations

import json
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

from .. import core, hf, runtime
from ..checkpoint import check_finite_tensors, check_output
from ..errors import InputError
from .onnx import Check, check_decodable, check_options, check_tables, default_onnx_output, write_export
from .tune import tune_int4
from .weights import DEFAULT_BLOCK_SIZE, DEFAULT_SCHEME

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("last_hidden_state", "sentence_embedding")
QUANTIZE_CHOICES = ("int8", "int4")
# a quantized graph's mean cosine to torch's sentence embeddings: int8 the target; int4 (no target there)
# must still keep the sentence meaning
MIN_COSINE = {"int8": 0.99, "int4": 0.95}
PARITY_TEXT_LIMIT = 32  # texts read from --data for the parity check
CALIBRATION_TEXTS = 128  # int4: texts after the parity ones in --data (else random tokens) for GPTQ
CALIBRATION_TOKENS = 24  # words in a random-token calibration text
CALIBRATION_BATCH = 16  # calibration texts a padded onnxruntime call
LATENCY_BATCHES = (1, 64)

PARITY_TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank factorization shrinks the token-embedding table of a text model.",
    "one long string of cliches .",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "Zero-shot, multilingual: naïve café façade; emojis 🙂 and numbers 3.14159.",
]


class EncoderExport(nn.Module):
    """(input_ids, attention_mask) -> (last_hidden_state, mean-pooled sentence_embedding)."""

    INPUTS: ClassVar[tuple[str, ...]] = INPUTS
    OUTPUTS: ClassVar[tuple[str, ...]] = OUTPUTS
    DYNAMIC_AXES: ClassVar[dict[str, dict[int, str]]] = {
        "input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
        "last_hidden_state": {0: "batch", 1: "seq"}, "sentence_embedding": {0: "batch"}}

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = hf.DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        self.encoder = hf.encoder_of(model)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        enc = hf.tokenize(self.tokenizer, ["embcompress export", "a longer second example sentence"], self.max_length)
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, hf.mean_pool(hidden, attention_mask)


@dataclass
class OnnxExport:
    """What ``export_encoder`` wrote and how well onnxruntime agrees with torch (the written graph's figures; the
    float32 graph's too when quantized)."""

    input: str
    output: str
    bytes: int
    opset: int
    quantize: str | None
    max_abs_diff_hidden: float
    max_abs_diff_embedding: float
    min_cosine: float
    parity_texts: int
    latency_ms: float | None  # one sentence (batch 1)
    seconds: float
    mean_cosine: float = 1.0
    fp32_bytes: int = 0
    fp32_max_abs_diff_embedding: float = 0.0
    latency_batch_ms: dict[int, float] = field(default_factory=dict)  # by batch size
    tables: dict[str, str] = field(default_factory=dict)  # each table's method and storage, as in the graph
    notes: list[str] = field(default_factory=list)
    tune_steps: int = 0  # int4: distillation steps of the layers' scales, biases and norms before the export

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def table_formats(model: nn.Module) -> dict[str, str]:
    """Each registry table of the model: its structure and, when kept in one, its storage and options."""
    out = {}
    for name, table in core.tables_of(model).items():
        storage = getattr(table, "storage", None)
        text = table.method or type(table).__name__
        if storage is not None:
            options = ", ".join(f"{k}={v}" for k, v in table.config().to_dict().items())
            text += f" in {storage.name}" + (f" ({options})" if options else "")
        out[name] = text
    return out


def random_texts(tokenizer: Any, count: int, words: int, seed: int = 0) -> list[str]:
    """``count`` texts of ``words`` vocabulary entries drawn at random (alphabetic ones, special tokens excluded):
    data-free calibration inputs."""
    special = set(tokenizer.all_special_tokens)
    vocab = sorted(t for t in tokenizer.get_vocab() if t not in special and t.strip("#▁Ġ").isalpha())
    if not vocab:
        raise InputError("the tokenizer has no alphabetic vocabulary words to make random calibration texts of; "
                         "give --data with more texts than the 32 parity ones")
    gen = np.random.default_rng(seed)
    return [tokenizer.convert_tokens_to_string([vocab[i] for i in gen.integers(0, len(vocab), words)])
            for _ in range(count)]


class EncoderFamily:
    """The encoder graph for :func:`onnx.write_export`: parity on texts, sentence embeddings compared."""

    differs_in = "the sentence embeddings"
    score_name = "mean cosine"

    def __init__(self, model: nn.Module, tokenizer: Any, texts: list[str], source: Path,
                 max_length: int = hf.DEFAULT_MAX_LENGTH, calibration: list[str] | None = None,
                 calibration_count: int = CALIBRATION_TEXTS, reference: nn.Module | None = None) -> None:
        self.graph = EncoderExport(model, tokenizer, max_length).eval()
        self.reference = EncoderExport(reference, tokenizer, max_length).eval() if reference is not None else None
        self.model, self.tokenizer, self.texts, self.source, self.max_length = model, tokenizer, texts, source, max_length
        self.calibration, self.calibration_count = calibration, calibration_count
        self.description = "encoder, then the mean of the attended token states"

    def metadata(self) -> tuple[str, dict[str, str]]:
        tables = {k: {"shape": list(v["shape"]), "rank": v["rank"]} for k, v in hf.factorized_tables(self.model).items()}
        doc = ("input_ids, attention_mask: int64 [batch, seq]; last_hidden_state: float32 [batch, seq, d]; "
               "sentence_embedding: float32 [batch, d], the mean over the attended tokens.")
        return doc, {"embcompress.source": self.source.name, "embcompress.inputs": ",".join(INPUTS),
                     "embcompress.outputs": ",".join(OUTPUTS), "embcompress.pooling": "mean",
                     "embcompress.tables": json.dumps(tables),
                     "embcompress.table_formats": json.dumps(table_formats(self.model))}

    def _feeds(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return hf.tokenize(self.tokenizer, texts, self.max_length)

    def check(self, session: Any, reference: bool = False) -> Check:
        """Largest differences in the token states and sentence embeddings; mean and worst cosine; against the
        model as given with ``reference`` (the graph is a tuned copy of it when the export tuned one)."""
        graph = self.reference if reference and self.reference is not None else self.graph
        d_hidden = d_emb = 0.0
        cosines = []
        for chunk in [self.texts] + [[t] for t in self.texts]:
            enc = self._feeds(chunk)
            with torch.no_grad():
                hidden, emb = graph(enc["input_ids"], enc["attention_mask"])
            o_hidden, o_emb = session.run(list(OUTPUTS), {k: enc[k].numpy() for k in INPUTS})
            mask = enc["attention_mask"].bool()
            d_hidden = max(d_hidden, float((torch.from_numpy(o_hidden) - hidden)[mask].abs().max()))
            d_emb = max(d_emb, float((torch.from_numpy(o_emb) - emb).abs().max()))
            cosines.append(F.cosine_similarity(torch.from_numpy(o_emb).double(), emb.double()))
        cos = torch.cat(cosines)
        return Check(d_emb, float(cos.mean()), {"max_abs_diff_hidden": d_hidden, "min_cosine": float(cos.min())})

    def min_score(self, quantize: str) -> float | None:
        return MIN_COSINE.get(quantize)

    calibration_mask = "attention_mask"  # GPTQ's statistics leave the padding of the batches out

    def calibration_texts(self) -> list[str]:
        """The texts given, else ``calibration_count`` strings of random vocabulary words (seeded, made once),
        never the parity texts."""
        if not self.calibration:
            self.calibration = random_texts(self.tokenizer, self.calibration_count, CALIBRATION_TOKENS)
        return self.calibration

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """The calibration texts in padded batches of ``CALIBRATION_BATCH``, sorted by length so that little is
        padded."""
        ordered = sorted(self.calibration_texts(), key=len)
        return [self._feeds(ordered[i : i + CALIBRATION_BATCH]) for i in range(0, len(ordered), CALIBRATION_BATCH)]

    def calibration_feeds(self) -> list[dict[str, np.ndarray]]:
        """:meth:`calibration_batches` as onnxruntime feeds."""
        return [{k: v.numpy() for k, v in batch.items()} for batch in self.calibration_batches()]

    def latency_feeds(self, sizes: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
        out = {}
        for size in sizes:
            texts = [self.texts[2 % len(self.texts)]] if size == 1 else [
                self.texts[i % len(self.texts)] for i in range(size)]
            out[size] = {k: v.numpy() for k, v in self._feeds(texts).items()}
        return out


def export_encoder(
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    opset: int = 17,
    quantize: str | None = None,
    texts: list[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    max_length: int = hf.DEFAULT_MAX_LENGTH,
    device: str = "auto",
    force: bool = False,
    threads: int | None = None,
    tolerance: float | None = None,
    latency: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    calibration: int = CALIBRATION_TEXTS,
    decode_at_load: bool = False,
    tune: int = 0,
    progress: Callable[[str], None] | None = None,
) -> OnnxExport:
    """Export a Hugging Face encoder to ONNX, check it against torch in onnxruntime, time it, write it atomically.

    ``quantize``: None (float32), ``"int8"`` or ``"int4"`` (weight-only: MatMulNBits / int8 per channel, the tables
    keeping their storage or, when float, int8 rows / 4-bit groups). Parity texts: ``texts``, else up to
    ``PARITY_TEXT_LIMIT`` of ``data`` (.txt a line, or JSON Lines), else a built-in set. ``int4`` chooses its codes
    by GPTQ on calibration texts: up to ``calibration`` (default ``CALIBRATION_TEXTS``) of ``data`` after the parity
    ones, else as many random vocabulary texts (never the parity texts, so the check stays a held-out one); with
    ``tune`` > 0 its layers' scales, biases and norms are then distilled for that many steps on those texts
    (:mod:`.tune`). ``tolerance``: the float32
    graph's largest sentence-embedding difference (default 1e-4). ``latency``: the median time of one call at
    batch 1 and 64. Raises ParityError, writing nothing, when a check fails.
    """
    start = time.perf_counter()
    src = Path(folder)
    check_options(quantize, opset, threads, QUANTIZE_CHOICES, family="a Hugging Face model")
    if calibration < 1:
        raise InputError(f"--calibration must be at least 1 text, got {calibration}")
    if tune < 0 or (tune and quantize != "int4"):
        raise InputError(f"--tune {tune}: the steps that tune the int4 layers' scales; it needs --quantize int4 "
                         "and 0 or more steps")
    if device not in ("auto", "cpu"):
        raise InputError(f"--device {device}: the ONNX export of a Hugging Face model is checked on the CPU (auto or "
                         "cpu)")
    calibration_texts = None
    if texts is None and data is not None:
        read = hf.read_texts(data, limit=PARITY_TEXT_LIMIT + (calibration if quantize == "int4" else 0))
        texts, calibration_texts = read[:PARITY_TEXT_LIMIT], read[PARITY_TEXT_LIMIT:] or None
    out = Path(output) if output is not None else default_onnx_output(src, quantize)
    check_output(out, [src] + ([Path(data)] if data is not None else []), force=force)
    runtime.import_onnxruntime()
    model = hf.load(src, task="base")
    check_finite_tensors(model.named_parameters(), action="export it")
    check_tables(model)
    if decode_at_load:
        check_decodable(model)
    tokenizer = hf.load_tokenizer(src)
    family = EncoderFamily(model, tokenizer, list(texts or PARITY_TEXTS), src, max_length, calibration_texts,
                           calibration)
    fixed = None
    if tune:
        say = progress or (lambda _msg: None)
        say("choosing the int4 layers' codes")
        tuned, fixed = tune_int4(model, tokenizer, family.calibration_texts(), family.calibration_batches(),
                                 steps=tune, block_size=block_size, scheme=DEFAULT_SCHEME, max_length=max_length,
                                 on_step=lambda step, total: say(f"tuning the int4 layers: step {step}/{total}"))
        family = EncoderFamily(tuned, tokenizer, family.texts, src, max_length, family.calibration_texts(),
                               reference=model)
    written = write_export(family, out, quantize=quantize, opset=opset, device="cpu", threads=threads,
                           latency=LATENCY_BATCHES if latency else (), tolerance=tolerance, block_size=block_size,
                           decode_at_load=decode_at_load, fixed=fixed, progress=progress)
    notes = written.notes + ([f"int4 layers tuned: {len(fixed)} of them with codes chosen in torch, then their "
                              f"scales and the other float parameters distilled for {tune} steps on "
                              f"{len(family.calibration_texts())} calibration texts"] if fixed is not None else [])
    check = written.quantized or written.fp32
    return OnnxExport(
        str(src), str(out), written.file_bytes, opset, quantize, check.figures["max_abs_diff_hidden"],
        check.max_abs_diff, check.figures["min_cosine"], len(family.texts), written.latency_ms.get(1),
        time.perf_counter() - start, mean_cosine=check.score, fp32_bytes=written.fp32_file_bytes,
        fp32_max_abs_diff_embedding=written.fp32.max_abs_diff, latency_batch_ms=written.latency_ms,
        tables=table_formats(model), notes=notes, tune_steps=tune,
    )
