"""Classifier training: ``fit`` (train, pick the best epoch on dev, resume) and ``evaluate`` (accuracy, F1, speed).

``fit`` trains a classifier that forwards as ``model(ids, lengths) -> logits`` with cross-entropy, or, given a
``Distillation`` (a teacher's logits for every training example), toward the teacher's softened predictions mixed
with the labels (Hinton et al., 2015), which needs no labels at all when the label weight is 0: it is the
classification objective of the one recovery loop, ``embcompress.recover.loop.run``, which steps the learning-rate
schedule once per iteration, evaluates dev accuracy after every epoch and keeps the best epoch's weights. It is used
for the first training and for the paper's "online" re-training of a factorized model alike.

Reproducibility, resume and distribution are the loop's (see ``embcompress.recover.loop``): the sampler is seeded by
``(seed, epoch)`` and, under torchrun, each rank trains on its ``DistributedSampler`` shard, gradients averaged over
the ranks. The config, records and distributed helpers are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..data import EncodedDataset, collate, iter_batches
from ..device import is_distributed, resolve_device
from ..errors import InputError
from ..methods.base import CodeTraining
from ..recover.loop import (
    AMP_MODES,
    OPTIMIZERS,
    STATE_VERSION,
    EpochRecord,
    FitResult,
    TrainConfig,
    cleanup_distributed,
    init_distributed_from_env,
    is_main_process,
    make_optimizer,
    run,
    seed_everything,
)

__all__ = [
    "AMP_MODES", "OPTIMIZERS", "STATE_VERSION", "ClassMetrics", "Distillation", "EpochRecord", "EvalResult",
    "FitResult", "TrainConfig", "cleanup_distributed", "evaluate", "fit", "init_distributed_from_env",
    "is_distributed", "is_main_process", "make_optimizer", "predict_logits", "resolve_device", "seed_everything",
]  # fmt: skip


@dataclass
class ClassMetrics:
    """Precision, recall, F1 and support (true count) of one class."""

    label: int | str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalResult:
    """What ``evaluate`` measured. ``confusion[i][j]`` counts examples of class i predicted as class j."""

    accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion: list[list[int]]
    num_examples: int
    seconds: float
    examples_per_second: float
    predictions: list[int] = field(repr=False)

    def to_dict(self, predictions: bool = False) -> dict:
        """A JSON-serialisable dict (predictions left out unless asked for)."""
        out = dataclasses.asdict(self)
        if not predictions:
            del out["predictions"]
        return out


@dataclass(frozen=True)
class Distillation:
    """What ``fit`` trains toward instead of the labels alone: ``logits`` (N x C, a teacher's outputs for the N
    training examples in order, from ``predict_logits``) softened at ``temperature``, mixed with the labels'
    cross-entropy at ``label_weight`` (0: the labels are never read, so they may be placeholders)."""

    logits: torch.Tensor
    temperature: float = 2.0
    label_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check(self.temperature, self.label_weight)

    @staticmethod
    def check(temperature: float, label_weight: float) -> None:
        """Raise ``InputError`` for settings that cannot work (callers check before reading any data)."""
        if not temperature > 0:
            raise InputError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= label_weight <= 1.0:
            raise InputError(f"label weight must be in [0, 1], got {label_weight}")

    def loss(self, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(1 - w) T^2 KL(teacher || student) at temperature T, plus w times the labels' cross-entropy; ``rows``
        are the batch's example indices into ``self.logits``."""
        t = self.temperature
        target = F.softmax(self.logits.to(logits.device)[rows].float() / t, dim=-1)
        soft = F.kl_div(F.log_softmax(logits / t, dim=-1), target, reduction="batchmean") * t * t
        if self.label_weight == 0:
            return soft
        return (1 - self.label_weight) * soft + self.label_weight * F.cross_entropy(logits, labels)

    def signature(self) -> dict:
        """What a resumed run must share with the run that made its state."""
        return {"temperature": self.temperature, "label_weight": self.label_weight}


class _Indexed(Dataset):
    """A dataset whose items carry their own index as the label, so a batch knows its rows of the soft targets."""

    def __init__(self, ds: EncodedDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.ds.sequences[index], index


def predict_logits(
    model: nn.Module, ds: EncodedDataset, device: torch.device | str, batch_size: int = 512, *,
    max_len: int | None = None,
) -> torch.Tensor:
    """The model's logits for every example of ``ds``, in order, in eval mode, on the CPU (float32)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = [model(b.to(device).ids, b.lengths).float().cpu() for b in iter_batches(ds, batch_size,
                                                                                         max_len=max_len)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    ds: EncodedDataset,
    device: torch.device | str | None = None,
    batch_size: int = 512,
    *,
    max_len: int | None = None,
) -> EvalResult:
    """Predict every example of ``ds`` in order and score the predictions against its labels.

    Macro-F1 averages the F1 of the classes that occur among the labels or the predictions (as scikit-learn
    does). ``examples_per_second`` is measured over the whole pass: batching, transfer and forward. The model's
    train/eval mode is restored afterwards.
    """
    if len(ds) == 0:
        raise InputError("cannot evaluate on an empty dataset")
    model = getattr(model, "module", model) if isinstance(model, DistributedDataParallel) else model
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in iter_batches(ds, batch_size, max_len=max_len):
                batch = batch.to(device, non_blocking=True)
                chunks.append(model(batch.ids, batch.lengths).argmax(dim=1))
            predictions = torch.cat(chunks).cpu()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    labels = torch.tensor(ds.labels, dtype=torch.long)
    names = list(ds.label_set.labels) if ds.label_set is not None else []
    num_classes = max(len(names), int(labels.max()) + 1, int(predictions.max()) + 1)
    names += list(range(len(names), num_classes))
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, -1)
    true_pos = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    present = (support > 0) | (predicted > 0)
    per_class = [
        ClassMetrics(names[i], float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
        for i in range(num_classes)
    ]
    return EvalResult(
        accuracy=float(true_pos.sum() / len(ds)),
        macro_f1=float(f1[present].mean()),
        per_class=per_class,
        confusion=confusion.tolist(),
        num_examples=len(ds),
        seconds=seconds,
        examples_per_second=len(ds) / seconds if seconds > 0 else math.inf,
        predictions=predictions.tolist(),
    )




def fit(
    model: nn.Module,
    train_ds: EncodedDataset,
    dev_ds: EncodedDataset | None,
    config: TrainConfig,
    *,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    state: dict | None = None,
    start_dev_accuracy: float | None = None,
    distillation: Distillation | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs, keep the best-on-dev weights, and return them with a resume state.

    ``on_step(epoch, step, steps_per_epoch, loss)`` runs after every optimizer step (1-based epoch and step, the
    batch's mean loss); ``on_epoch(record)`` after every epoch, with ``record.state`` the resume state to save.
    ``state`` (from ``FitResult.state`` or ``record.state``) continues that run: finished epochs are not redone and
    the result equals an uninterrupted run's; ``config`` must match it except for ``epochs``, ``device``, ``amp``
    and ``eval_batch_size``. Without ``dev_ds`` the last epoch counts as the best. The best weights are loaded
    into ``model`` before returning (ties keep the earlier epoch). ``start_dev_accuracy`` (the dev accuracy of the
    weights as given) makes the starting point a candidate, epoch 0: fine-tuning then never returns weights that
    are worse on dev than the ones it started from. A compressed table trains only what its method allows
    (``recover.loop.recoverable_parameters``), and one kept in a storage stays in it. ``distillation`` trains
    toward a teacher's logits for ``train_ds`` (see ``Distillation``) instead of the labels alone. A table swapped
    for its ``CodeTraining`` module adds its penalty to the loss and takes a ``step()`` after every optimizer step.
    """
    config.validate()
    if len(train_ds) == 0:
        raise InputError("the training set is empty")
    if distillation is not None and distillation.logits.shape[0] != len(train_ds):
        raise InputError(f"{distillation.logits.shape[0]} teacher predictions for {len(train_ds)} training examples")
    labels = torch.tensor(train_ds.labels, dtype=torch.long)
    device = resolve_device(config.device)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    source = train_ds if distillation is None else _Indexed(train_ds)
    sampler = DistributedSampler(source, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    loader = DataLoader(
        source,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=partial(collate, max_len=config.max_len),
        pin_memory=device.type == "cuda",
    )

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for batch in loader:
            yield batch.to(device, non_blocking=True), len(batch)

    codes = [m for m in model.modules() if isinstance(m, CodeTraining)]

    def loss(batch) -> torch.Tensor:
        logits = model(batch.ids, batch.lengths).float()
        if distillation is None:
            out = F.cross_entropy(logits, batch.labels)
        else:
            out = distillation.loss(logits, batch.labels, labels.to(logits.device)[batch.labels])
        return out + sum(m.penalty_weight * m.penalty for m in codes)

    def stepped(epoch: int, step: int, steps: int, value: float) -> None:
        for m in codes:
            m.step()
        if on_step:
            on_step(epoch, step, steps, value)

    def score() -> tuple[float, float]:
        result = evaluate(model, dev_ds, device, config.eval_batch_size, max_len=config.max_len)
        return result.accuracy, result.macro_f1

    trained_codes = sorted(n for n, m in model.named_modules() if isinstance(m, CodeTraining)) or None
    signature = {"train_size": len(train_ds), "codes_trained": trained_codes,
                 **(distillation.signature() if distillation else {})}
    return run(model, loss, batches, len(loader), config, score=score if dev_ds is not None else None,
               signature=signature, on_step=stepped if codes else on_step, on_epoch=on_epoch, state=state,
               start_score=start_dev_accuracy)
