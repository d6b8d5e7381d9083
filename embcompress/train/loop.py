"""The training loop: ``fit`` (train, pick the best epoch on dev, resume) and ``evaluate`` (accuracy, F1, speed).

``fit`` trains a classifier that forwards as ``model(ids, lengths) -> logits`` with cross-entropy, steps the
learning-rate schedule once per iteration, evaluates dev accuracy after every epoch and keeps the best epoch's
weights. It is used for the first training and for the paper's "online" re-training of a factorized model alike.

Reproducibility. ``fit`` seeds Python, NumPy and torch from ``config.seed`` on a fresh start, shuffles with a
sampler seeded by ``(seed, epoch)`` and reseeds torch (dropout) at the start of every epoch from
``(seed, epoch, rank)``. An epoch's random draws therefore depend only on the seed and its number, so a run resumed
from the ``state`` of an earlier one (weights, optimizer, scheduler, grad scaler, RNG states, best so far and
history, all copied to the CPU and loadable with ``torch.load(weights_only=True)``) ends with the same weights as
an uninterrupted run, bit for bit on the CPU.

Distributed. When ``torch.distributed`` is initialised (``init_distributed_from_env`` does it from torchrun's
variables), the model is wrapped in ``DistributedDataParallel`` and each rank trains on its ``DistributedSampler``
shard; every rank evaluates the (small) dev set with the same weights and rank 0's accuracy is broadcast, so all
ranks pick the same best epoch. Callbacks run on every rank: guard side effects with ``is_main_process()``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..data import EncodedDataset, collate, iter_batches
from ..device import is_distributed, resolve_device
from ..errors import InputError
from .schedules import SCHEDULES, make_schedule

OPTIMIZERS = ("sgd", "adam", "adagrad")
AMP_MODES = ("auto", "bf16", "fp16", "off")
STATE_VERSION = 1

# TrainConfig fields a resumed run must share with the run that made the state (epochs may grow; device may change)
_RESUME_KEYS = (
    "batch_size", "lr", "optimizer", "momentum", "schedule", "lr_lb", "lr_ub", "step_size", "decay",
    "weight_decay", "max_grad_norm", "seed", "max_len",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Hyperparameters of ``fit``; JSON-serialisable through ``to_dict``/``from_dict``.

    Defaults train DAN and LSTM on SST-2 well with Adam (about 79-80 % dev accuracy after 4 epochs with 50-d
    GloVe on the CPU): Adam at 5e-3 as CALR's upper bound, a light L2 ``weight_decay`` of 1e-5 (it was worth
    several points of dev accuracy over none), batches of 64, and 4 epochs, one CALR annealing cycle with the
    default decay (the peak halves each epoch and resets after the 4th).

    ``lr`` is the optimizer's rate and, for ``calr``/``clr``, the default upper bound; unset schedule parameters
    take the defaults of ``schedules.make_schedule`` (lb = ub/10, step_size = half an epoch, decay = ln 1/2).
    ``amp`` is mixed precision on CUDA only: ``auto`` = bf16 where the GPU supports it, else fp16 with a
    GradScaler; on the CPU every mode trains in fp32. ``device``: ``auto`` (CUDA when available), ``cpu``,
    ``cuda`` or ``cuda:N``. ``max_len`` caps the tokens per example.
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    schedule: str = "calr"
    lr_lb: float | None = None
    lr_ub: float | None = None
    step_size: int | None = None
    decay: float | None = None
    weight_decay: float = 1e-5
    max_grad_norm: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    eval_batch_size: int = 512
    max_len: int | None = None

    def validate(self) -> None:
        """Raise ``InputError`` for a value that cannot work (schedule bounds are checked by the schedule)."""
        if self.epochs < 0:
            raise InputError(f"epochs must be 0 or more, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise InputError(f"batch sizes must be at least 1, got {self.batch_size} and {self.eval_batch_size}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r} (known: {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.amp not in AMP_MODES:
            raise InputError(f"unknown amp mode {self.amp!r} (known: {', '.join(AMP_MODES)})")
        if self.weight_decay < 0 or self.momentum < 0:
            raise InputError("weight_decay and momentum must be 0 or more")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.max_len is not None and self.max_len < 1:
            raise InputError(f"max_len must be at least 1, got {self.max_len}")

    def to_dict(self) -> dict:
        """All fields as a plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys raise ``InputError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown training options: {', '.join(unknown)}")
        return cls(**data)


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


@dataclass
class EpochRecord:
    """One finished epoch (1-based). ``lr`` is the rate of its last step, ``lr_max`` its highest.

    ``state`` is set only on the record handed to ``on_epoch``: the resume state as of this epoch.
    """

    epoch: int
    train_loss: float
    dev_accuracy: float | None
    dev_macro_f1: float | None
    lr: float
    lr_max: float
    seconds: float
    examples_per_second: float
    is_best: bool
    state: dict | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The record without ``state``, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state"}


@dataclass
class FitResult:
    """The outcome of ``fit``. ``best_state`` (CPU copies) is also loaded into the model; ``state`` resumes."""

    best_epoch: int | None
    best_dev_accuracy: float | None
    best_state: dict[str, torch.Tensor] = field(repr=False)
    history: list[EpochRecord]
    state: dict = field(repr=False)
    device: str
    amp: str
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def is_main_process() -> bool:
    """True outside distributed runs, and on rank 0 inside one."""
    return not is_distributed() or dist.get_rank() == 0


def init_distributed_from_env() -> bool:
    """Initialise ``torch.distributed`` from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; return whether it is on.

    Returns False (and does nothing) when those variables are absent. Uses NCCL (and pins this process to GPU
    LOCAL_RANK) when CUDA is available, else Gloo. A group that is already initialised is left as it is.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise InputError("RANK/WORLD_SIZE are set but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method="env://", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", init_method="env://")
    return True


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def _resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``; None means fp32 (always so off CUDA)."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise InputError("amp 'bf16' asked for, but this GPU does not support bfloat16 (use fp16 or off)")
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_optimizer(
    name: str, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``), ``adam`` or ``adagrad`` over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


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


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (safe to keep while training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _rng_state() -> dict:
    """Python, NumPy, torch and CUDA RNG states in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(obj: Any) -> Any:
    """``random.getstate()`` holds tuples; a state that went through JSON-like storage holds lists."""
    if isinstance(obj, list):
        return tuple(_python_state(v) for v in obj)
    return obj


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _check_resume(state: dict, signature: dict) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise InputError("the resume state is not a state returned by fit() (or comes from another version)")
    old = state.get("signature", {})
    diffs = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in signature.items() if old.get(k) != v]
    if diffs:
        raise InputError("cannot resume: the run differs from the one that made the state (" + "; ".join(diffs) + ")")


def _make_state(
    epochs_done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    best: dict,
    history: list[EpochRecord],
    signature: dict,
) -> dict:
    """The resume state: CPU copies of everything an epoch boundary needs (see the module docstring)."""
    return {
        "version": STATE_VERSION,
        "epoch": epochs_done,
        "model": _to_cpu(model.state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": _to_cpu(scheduler.state_dict()),
        "scaler": _to_cpu(scaler.state_dict()),
        "rng": _rng_state(),
        "best": best,
        "history": [r.to_dict() for r in history],
        "signature": dict(signature),
    }


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
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs, keep the best-on-dev weights, and return them with a resume state.

    ``on_step(epoch, step, steps_per_epoch, loss)`` runs after every optimizer step (1-based epoch and step, the
    batch's mean loss); ``on_epoch(record)`` after every epoch, with ``record.state`` the resume state to save.
    ``state`` (from ``FitResult.state`` or ``record.state``) continues that run: finished epochs are not redone and
    the result equals an uninterrupted run's; ``config`` must match it except for ``epochs``, ``device``, ``amp``
    and ``eval_batch_size``. Without ``dev_ds`` the last epoch counts as the best. The best weights are loaded
    into ``model`` before returning (ties keep the earlier epoch). ``start_dev_accuracy`` (the dev accuracy of the
    weights as given) makes the starting point a candidate, epoch 0: fine-tuning then never returns weights that
    are worse on dev than the ones it started from.
    """
    config.validate()
    if len(train_ds) == 0:
        raise InputError("the training set is empty")
    started = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = _resolve_amp(config.amp, device)
    distributed = is_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    model.to(device)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    loader = DataLoader(
        train_ds,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=partial(collate, max_len=config.max_len),
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay, config.momentum)
    scheduler = make_schedule(
        config.schedule,
        optimizer,
        steps_per_epoch=steps_per_epoch,
        lr_lb=config.lr_lb,
        lr_ub=config.lr_ub,
        step_size=config.step_size,
        decay=config.decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    signature = {k: getattr(config, k) for k in _RESUME_KEYS}
    signature.update(train_size=len(train_ds), steps_per_epoch=steps_per_epoch)

    if state is None:
        seed_everything(config.seed)
        start_epoch, history = 0, []
        best: dict = {"epoch": None, "dev_accuracy": None, "weights": None}
        if start_dev_accuracy is not None and dev_ds is not None:
            best = {"epoch": 0, "dev_accuracy": start_dev_accuracy, "weights": _to_cpu(model.state_dict())}
    else:
        _check_resume(state, signature)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"] and scaler.is_enabled():  # a disabled scaler (CPU, bf16) saves and needs nothing
                scaler.load_state_dict(state["scaler"])
            rng = dict(state["rng"], python=_python_state(state["rng"]["python"]))
            _set_rng_state(rng)
            start_epoch = int(state["epoch"])
            history = [EpochRecord(**record) for record in state["history"]]
            best = dict(state["best"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"the resume state is damaged ({type(e).__name__}: {first}); delete it to start over"
                             ) from None

    train_model: nn.Module = model
    if distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (
        partial(torch.autocast, device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext
    )

    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        torch.manual_seed(_derived_seed(config.seed, epoch, rank))
        sampler.set_epoch(epoch)
        train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        lr_last = lr_max = 0.0
        for step, batch in enumerate(loader, start=1):
            batch = batch.to(device, non_blocking=True)
            lr_last = float(optimizer.param_groups[0]["lr"])
            lr_max = max(lr_max, lr_last)
            with autocast():
                logits = train_model(batch.ids, batch.lengths)
            loss = F.cross_entropy(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double() * len(batch)
            seen += len(batch)
            if on_step is not None:
                on_step(epoch + 1, step, steps_per_epoch, float(loss.detach()))

        totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if distributed:
            totals = totals.to(_comm_device(device))
            dist.all_reduce(totals)
        train_loss, seen_all = float(totals[0] / totals[1]), int(totals[1])
        train_seconds = time.perf_counter() - epoch_start

        dev_accuracy = dev_f1 = None
        if dev_ds is not None:
            result = evaluate(model, dev_ds, device, config.eval_batch_size, max_len=config.max_len)
            dev_accuracy, dev_f1 = result.accuracy, result.macro_f1
            if distributed:
                shared = torch.tensor([dev_accuracy, dev_f1], dtype=torch.float64, device=_comm_device(device))
                dist.broadcast(shared, src=0)
                dev_accuracy, dev_f1 = float(shared[0]), float(shared[1])
        is_best = dev_ds is None or best["dev_accuracy"] is None or dev_accuracy > best["dev_accuracy"]
        if is_best:
            best = {"epoch": epoch + 1, "dev_accuracy": dev_accuracy, "weights": _to_cpu(model.state_dict())}

        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=train_loss,
            dev_accuracy=dev_accuracy,
            dev_macro_f1=dev_f1,
            lr=lr_last,
            lr_max=lr_max,
            seconds=time.perf_counter() - epoch_start,
            examples_per_second=seen_all / train_seconds if train_seconds > 0 else math.inf,
            is_best=is_best,
        )
        history.append(record)
        state = _make_state(epoch + 1, model, optimizer, scheduler, scaler, best, history, signature)
        if on_epoch is not None:
            on_epoch(dataclasses.replace(record, state=state))

    if state is None:  # zero epochs asked for: the current weights are all there is
        best = {"epoch": None, "dev_accuracy": None, "weights": _to_cpu(model.state_dict())}
        state = _make_state(0, model, optimizer, scheduler, scaler, best, history, signature)
    model.load_state_dict(best["weights"])
    return FitResult(
        best_epoch=best["epoch"],
        best_dev_accuracy=best["dev_accuracy"],
        best_state=best["weights"],
        history=history,
        state=state,
        device=str(device),
        amp={None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        seconds=time.perf_counter() - started,
    )
