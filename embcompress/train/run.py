"""Train, fine-tune and evaluate classifiers from JSON Lines files: what ``embcompress train``, ``finetune`` and
``evaluate`` call.

Training writes one ``.safetensors`` file holding the model and its vocabulary, labels and history. After each
epoch the resume state (weights, optimizer, schedule, RNG, best so far) is saved beside the output as
``<output>.resume.pt`` (atomically, read back with ``weights_only=True``); ``resume=True`` continues from it
without redoing finished epochs, and it is removed once the output is written. In a ``torchrun`` job only rank 0
writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..checkpoint import check_finite_tensors, check_output
from ..classifier import Classifier, load_classifier, num_parameters, save_classifier
from ..data import JSONL_SUFFIXES, EncodedDataset, LabelSet, Vocab, encode_texts, load_vectors, read_jsonl, read_texts
from ..errors import InputError, Interrupted
from ..methods.base import Table, registered
from ..models import build_model, init_embedding
from ..modules import compress_embeddings, factorized_shapes
from ..recover.resume import load_resume as _load_resume
from ..recover.resume import resume_path
from ..recover.resume import save_resume as _save_resume
from ..recover.resume import saved_epoch as _saved_epoch
from .loop import (
    Distillation,
    EpochRecord,
    EvalResult,
    TrainConfig,
    evaluate,
    fit,
    is_main_process,
    predict_logits,
    resolve_device,
)

# Fine-tuning a factorized model starts from trained weights: a gentler peak rate and fewer epochs than training.
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 3, "lr": 2e-3}


@dataclass
class TrainReport:
    """The outcome of ``train_classifier`` / ``finetune_classifier``."""

    output: str
    history: list[dict[str, Any]]
    best_epoch: int | None
    dev_before: float | None
    dev_after: float | None
    parameters: int
    factorized: bool
    device: str
    seconds: float
    resumed_from_epoch: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    table: str = "dense"  # how the embedding table is kept: dense, factorized, or its method (pq, lowbit, ...)


@dataclass
class EvalReport:
    """``evaluate`` on a data file, with label names."""

    model: str
    data: str
    labels: list[Any]
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "labels": self.labels, **self.result.to_dict()}


def _fit_and_save(
    clf: Classifier,
    train_path: Path,
    dev_path: Path | None,
    config: TrainConfig,
    output: Path,
    *,
    inputs: list[Path],
    force: bool,
    resume: bool,
    phase: str,
    options: dict[str, Any],
    on_step: Callable[[int, int, int, float], None] | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    train_ds: EncodedDataset | None = None,
    distillation: Distillation | None = None,
    swap: Callable[[], dict[str, nn.Module]] | None = None,
) -> TrainReport:
    train_ds = train_ds if train_ds is not None else clf.encode(read_jsonl(train_path), config.max_len)
    dev_ds = clf.encode(read_jsonl(dev_path), config.max_len) if dev_path is not None else None
    state = _load_resume(resume_path(output)) if resume else None
    done = int(state.get("epoch", 0)) if state else 0
    dev_before = None
    if dev_ds is not None and not state:
        device = resolve_device(config.device)
        dev_before = evaluate(clf.model.to(device), dev_ds, device, config.eval_batch_size).accuracy
    elif state:
        dev_before = state.get("dev_before")

    swapped = swap() if swap is not None else {}  # after dev_before: that scores the model as given
    saving = [resume]  # whether the resume state on disk belongs to this run

    def epoch_done(record: EpochRecord) -> None:
        if record.state is not None and is_main_process():
            saving[0] = True
            _save_resume({**record.state, "dev_before": dev_before}, resume_path(output))
        if on_epoch:
            on_epoch(record)

    try:
        result = fit(clf.model, train_ds, dev_ds, config, on_step=on_step, on_epoch=epoch_done, state=state,
                     start_dev_accuracy=dev_before if phase == "finetune" else None, distillation=distillation)
        # tables whose codes were trained back to their stored form; the model as given, where it won on dev
        core.settle_codes_(clf.model, keep=swapped if result.best_epoch == 0 else None)
        clf.history = clf.history + [{"phase": phase, **r.to_dict()} for r in result.history]
        if is_main_process():
            save_classifier(clf, output, inputs=inputs, force=force, op=phase, options=options)
            resume_path(output).unlink(missing_ok=True)
    except KeyboardInterrupt:
        kept = _saved_epoch(resume_path(output)) if saving[0] and is_main_process() else 0
        if kept:
            raise Interrupted(f"interrupted after epoch {kept}; resume with --resume") from None
        raise Interrupted("interrupted; nothing written") from None
    return TrainReport(str(output), [r.to_dict() for r in result.history], result.best_epoch, dev_before,
                       result.best_dev_accuracy, num_parameters(clf.model), clf.is_factorized, result.device,
                       result.seconds, done, options, _table_kind(clf))


def _table_kind(clf: Classifier) -> str:
    """How the classifier keeps its embedding table, for the report."""
    names = sorted({getattr(t, "spec_name", None) or t.method for t in core.tables_of(clf.model).values()})
    return "+".join(names) if names else "factorized" if clf.is_factorized else "dense"


def train_classifier(
    train_path: str | os.PathLike[str],
    dev_path: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    arch: str = "dan",
    embed_dim: int | None = None,
    hidden_dim: int = 150,
    dropout: float = 0.4,
    min_count: int = 1,
    init_vectors: str | os.PathLike[str] | None = None,
    initial_rank: int | None = None,
    config: TrainConfig | None = None,
    force: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainReport:
    """Train a DAN or LSTM classifier from scratch and write the best-on-dev model to ``output``.

    ``embed_dim`` defaults to the vectors' dimension with ``init_vectors`` (GloVe text format), else 300.
    ``initial_rank`` trains a factorized table from the start (the paper's offline baseline): the rank-k SVD of
    the initial vectors, or random rank-k factors without them.
    """
    config = config or TrainConfig()
    config.validate()
    train_path, out = Path(train_path), Path(output)
    dev = Path(dev_path) if dev_path is not None else None
    inputs = [train_path] + ([dev] if dev else []) + ([Path(init_vectors)] if init_vectors else [])
    check_output(out, inputs, force=force or resume)
    examples = read_jsonl(train_path)
    vocab = Vocab.build([ex.text for ex in examples], min_count=min_count)
    labels = LabelSet.from_examples(examples)
    vectors, found = (load_vectors(init_vectors, vocab, dim=embed_dim, seed=config.seed) if init_vectors
                      else (None, 0))
    dim = vectors.shape[1] if vectors is not None else (embed_dim or 300)
    model_cfg: dict[str, Any] = {"arch": arch, "vocab_size": len(vocab), "embed_dim": dim,
                                 "num_classes": len(labels), "dropout": dropout}
    if arch == "lstm":
        model_cfg["hidden_dim"] = hidden_dim
    torch.manual_seed(config.seed)
    model = build_model(model_cfg)
    if vectors is not None:
        init_embedding(model, vectors)
    if initial_rank is not None:
        if vectors is not None:
            compress_embeddings(model, rank=initial_rank, tables=["embedding"])
        else:
            factorized_shapes(model, {"embedding": initial_rank})
    options = {"train": str(train_path), "dev": str(dev) if dev else None, "init_vectors": str(init_vectors)
               if init_vectors else None, "vectors_found": found, "min_count": min_count, "initial_rank": initial_rank, **config.to_dict()}
    clf = Classifier(model, vocab, labels, train=options)
    return _fit_and_save(clf, train_path, dev, config, out, inputs=inputs, force=force or resume, resume=resume,
                         phase="train", options=options, on_step=on_step, on_epoch=on_epoch)


def finetune_classifier(
    model_path: str | os.PathLike[str],
    train_path: str | os.PathLike[str],
    dev_path: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    force: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    teacher: str | os.PathLike[str] | None = None,
    temperature: float = 2.0,
    label_weight: float | None = None,
    reassign_codes: bool = False,
) -> TrainReport:
    """Continue training a (factorized or any) classifier; factorized tables keep their shapes, so the model stays
    small. Reports dev accuracy before and after. With a dev set the starting model competes as epoch 0: when no
    epoch beats it on dev, it is what gets written.

    With ``teacher`` (a classifier with the same labels, typically the uncompressed original) the model learns the
    teacher's predictions on the training texts, softened at ``temperature``, mixed with the labels at
    ``label_weight``: 0.5 by default for labelled JSON Lines, 0 for plain texts (``.txt``, one a line), which then
    need no labels. The teacher reads the texts with its own vocabulary, so a trimmed model can learn from its
    original.

    ``reassign_codes`` also trains the codes of a table that stores them (pq): a float copy of the table (the
    teacher's table where it has the model's vocabulary, else the decoded one) is trained, each row read through
    its nearest codes, the codebooks re-fitted to the rows they hold as it goes (rows weighted by their counts in
    the training texts); the file keeps its bytes."""
    config = config or TrainConfig(**FINETUNE_DEFAULTS)
    config.validate()
    src, train_path, out = Path(model_path), Path(train_path), Path(output)
    dev = Path(dev_path) if dev_path is not None else None
    inputs = [src, train_path] + ([dev] if dev else []) + ([Path(teacher)] if teacher is not None else [])
    check_output(out, inputs, force=force or resume)
    weight = _label_weight(train_path, label_weight) if teacher is not None else None
    clf = load_classifier(src)
    check_finite_tensors(clf.model.state_dict().items(), action="fine-tune it")
    train_ds = distillation = None
    if teacher is not None:
        Distillation.check(temperature, weight)
        teach = load_classifier(teacher)
        check_finite_tensors(teach.model.state_dict().items(), action="learn from it")
        if teach.labels != clf.labels:
            raise InputError(f"{teacher}: the teacher's labels {teach.labels.labels} differ from the model's "
                             f"{clf.labels.labels}; a teacher must predict the same classes")
        if weight > 0:
            examples = read_jsonl(train_path)
            train_ds, texts = clf.encode(examples, config.max_len), [ex.text for ex in examples]
        else:
            texts = read_texts(train_path)
            train_ds = EncodedDataset(encode_texts(texts, clf.vocab, max_len=config.max_len), [0] * len(texts),
                                      clf.labels)
        device = resolve_device(config.device)
        seen = EncodedDataset(encode_texts(texts, teach.vocab, max_len=config.max_len), [0] * len(texts))
        logits = predict_logits(teach.model.to(device), seen, device, config.eval_batch_size)
        distillation = Distillation(logits, temperature, weight)
    swap = None
    if reassign_codes:
        if train_ds is None:
            train_ds = clf.encode(read_jsonl(train_path), config.max_len)
        swap = _code_training(clf, teach if teacher is not None else None, train_ds)
    options = {"model": str(src), "train": str(train_path), "dev": str(dev) if dev else None, **config.to_dict()}
    if teacher is not None:
        options.update(teacher=str(teacher), temperature=temperature, label_weight=weight)
    if reassign_codes:
        options["reassign_codes"] = True
    clf.train = {**clf.train, "finetune": options}
    return _fit_and_save(clf, train_path, dev, config, out, inputs=inputs, force=force or resume, resume=resume,
                         phase="finetune", options=options, on_step=on_step, on_epoch=on_epoch, train_ds=train_ds,
                         distillation=distillation, swap=swap)


def _code_training(clf: Classifier, teacher: Classifier | None,
                   train_ds: EncodedDataset) -> Callable[[], dict[str, nn.Module]]:
    """What swaps the model's tables that store codes for their code-training modules (``core.train_codes_``),
    starting from the teacher's table where the teacher has the model's vocabulary, with each row's count in the
    training texts, and returns the tables it swapped out; refused now when no table stores codes."""
    tables = core.tables_of(clf.model)
    if not any(t.trains_codes for t in tables.values()):
        kinds = ", ".join(sorted({t.method for t in tables.values()})) or "none: its table is dense"
        coded = ", ".join(m.name for m in registered() if getattr(m.table, "trains_codes", False))
        raise InputError(f"--reassign-codes trains the codes of a table that stores codes ({coded}); this model's "
                         f"compressed tables: {kinds}")
    starts = {}
    if teacher is not None and teacher.vocab == clf.vocab:
        theirs = dict(teacher.model.named_modules())
        for name in tables:
            mod = theirs.get(name)
            if isinstance(mod, nn.Embedding):
                starts[name] = mod.weight.detach()
            elif isinstance(mod, Table):
                starts[name] = mod.dense_weight().detach()
    ids = torch.cat(train_ds.sequences) if len(train_ds) else torch.zeros(0, dtype=torch.long)
    counts = {name: torch.bincount(ids, minlength=t.num_embeddings)[: t.num_embeddings].float()
              for name, t in tables.items()}

    def swap() -> dict[str, nn.Module]:
        return {name: tables[name] for name in core.train_codes_(clf.model, starts, counts)}

    return swap


def _label_weight(train_path: Path, weight: float | None) -> float:
    """The labels' share in distillation: 0.5 by default for JSON Lines, 0 (and only 0) for plain texts."""
    if train_path.suffix in JSONL_SUFFIXES:
        return 0.5 if weight is None else weight
    if weight:
        raise InputError(f"{train_path}: plain texts carry no labels; give JSON Lines with labels for a label weight "
                         f"of {weight}, or leave it out")
    return 0.0


def evaluate_classifier(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch_size: int = 512,
) -> EvalReport:
    """Accuracy, macro-F1, per-class metrics and examples per second of a classifier on a JSON Lines file."""
    clf = load_classifier(model_path)
    check_finite_tensors(clf.model.state_dict().items(), action="score it")
    ds = clf.encode(read_jsonl(data_path))
    dev = resolve_device(device)
    result = evaluate(clf.model.to(dev), ds, dev, batch_size)
    return EvalReport(str(model_path), str(data_path), clf.labels.labels, result)
