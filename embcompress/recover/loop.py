"""The one recovery loop: classifier training and fine-tuning, labelled fine-tuning of Hugging Face encoders and
label-free distillation all run ``run`` with their own objective (a loss on a batch) and batches.

What the loop does for every objective:

* **What it trains.** ``recoverable_parameters``: of a compressed table (a registry ``Table``) only what its
  ``recoverable()`` lists (factors, codebooks, scales; a ``StoredTable`` has none), everything else of the model.
  A table kept in a storage (``svd+int8``: ``core.store_`` set ``table.storage``) is trained with a straight-through
  estimate: the optimizer updates float master copies of its stored tensors, and after every step the tensors the
  model computes with are those masters sent through the storage again (``core.store_``: quantize, dequantize). The
  model in memory, what dev scores it and the saved file are therefore the same stored values, and the file's bytes
  do not change.
* **Schedules.** ``train.schedules``: CALR, CLR, constant and warm-up + cosine, stepped once per iteration.
* **Reproducibility and resume.** On a fresh start Python, NumPy and torch are seeded from ``config.seed``; torch is
  reseeded at the start of every epoch from ``(seed, epoch, rank)``. After every epoch ``on_epoch`` gets the resume
  state (weights, optimizer, schedule, grad scaler, RNG states, the batch source's own state, the straight-through
  masters, best so far and history, all CPU copies loadable with ``torch.load(weights_only=True)``); ``state``
  continues from it, so an interrupted run loses only the epoch it was in, and on the CPU a resumed run ends with
  the same weights as an uninterrupted one, bit for bit. An "epoch" is a pass over the data for classifiers and a
  block of steps for distillation.
* **Distributed.** Under ``torchrun`` (``init_distributed_from_env``), every rank trains on its own batches and the
  gradients of the trained parameters are averaged over the ranks after each backward pass, as
  ``DistributedDataParallel`` does; averaging explicitly also works for a truncated forward, frozen blocks and
  masked rows, which distillation uses. Parameters are broadcast from rank 0 at a fresh start. Every rank scores
  dev with the same weights and rank 0's score is broadcast, so all ranks keep the same best epoch. Callbacks run
  on every rank: guard side effects with ``is_main_process()``.
* **Progress.** ``on_step(epoch, step, steps_per_epoch, loss)`` after every optimizer step, ``on_epoch(record)``
  after every epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import core
from ..device import is_distributed, resolve_device
from ..errors import InputError
from ..methods.base import StoredTable
from .schedules import SCHEDULES, make_schedule

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
AMP_MODES = ("auto", "bf16", "fp16", "off")
STATE_VERSION = 1

# TrainConfig fields a resumed run must share with the run that made the state (epochs may grow, except under
# warm-up + cosine, whose shape depends on the run's length; device may change)
_RESUME_KEYS = (
    "batch_size", "lr", "optimizer", "momentum", "schedule", "lr_lb", "lr_ub", "step_size", "decay", "warmup",
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
    take the defaults of ``schedules.make_schedule`` (lb = ub/10, step_size = half an epoch, decay = ln 1/2;
    ``warmup``, the warm-up fraction of ``warmup-cosine``, 5 %).
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
    warmup: float | None = None
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
        if self.warmup is not None and not 0.0 <= self.warmup < 1.0:
            raise InputError(f"warmup must be a fraction in [0, 1), got {self.warmup}")

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
    """``sgd`` (with ``momentum``), ``adam``, ``adamw`` (decoupled weight decay) or ``adagrad`` over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


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
    source: Any = None,
    projection: StraightThrough | None = None,
) -> dict:
    """The resume state: CPU copies of everything an epoch boundary needs (see the module docstring)."""
    extra: dict[str, Any] = {}
    if source is not None and hasattr(source, "state_dict"):
        extra["source"] = _to_cpu(source.state_dict())
    if projection is not None and projection:
        extra["masters"] = _to_cpu(projection.masters)
    return {**extra,
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




# --- what recovery trains ------------------------------------------------------------------------------------------


def recoverable_parameters(model: nn.Module, candidates: Iterable[nn.Parameter] | None = None) -> list[nn.Parameter]:
    """The parameters recovery trains, of ``candidates`` (default: all of the model's): a compressed table's only
    where its ``recoverable()`` lists them (a ``StoredTable`` has none), every other module's all."""
    tables = core.tables_of(model).values()
    in_tables = {id(p) for t in tables for p in t.parameters()}
    allowed = {id(p) for t in tables for p in t.recoverable()}
    pool = model.parameters() if candidates is None else candidates
    out, seen = [], set()
    for p in pool:
        if id(p) not in seen and (id(p) not in in_tables or id(p) in allowed):
            seen.add(id(p))
            out.append(p)
    return out


def stored_tables(model: nn.Module) -> list[str]:
    """Names of the model's tables kept in a storage (``svd+int8``): what recovery trains with a straight-through
    estimate so that they stay in their storage."""
    return [name for name, t in core.tables_of(model).items()
            if getattr(t, "storage", None) is not None and not isinstance(t, StoredTable)]


class StraightThrough:
    """Straight-through training of the trained tensors of tables kept in a storage.

    ``masters`` holds float copies of those tensors. The model computes (forward, backward, dev) with the stored
    values; ``before_step`` puts the masters in place so the optimizer updates them, and ``after_step`` keeps the
    updated masters and sends the tensors through the storage again (``core.store_``)."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        trained = {id(p) for p in params}
        self.tables: list[Any] = []
        self.params: list[nn.Parameter] = []
        tables = core.tables_of(model)
        for name in stored_tables(model):
            table = tables[name]
            named = dict(table.named_parameters())
            mine = [named[n] for n in (getattr(table, "stored_names", ()) or ()) if n in named and id(named[n]) in trained]
            if mine:
                self.tables.append(table)
                self.params.extend(mine)
        self.masters = [p.detach().clone() for p in self.params]

    def __bool__(self) -> bool:
        return bool(self.params)

    def load(self, masters: Sequence[torch.Tensor]) -> None:
        """Masters from a resume state."""
        if len(masters) != len(self.params) or any(m.shape != p.shape for m, p in zip(masters, self.params)):
            raise InputError("the resume state's straight-through masters do not fit the model's stored tables")
        self.masters = [m.to(p.device, p.dtype).clone() for m, p in zip(masters, self.params)]

    @torch.no_grad()
    def before_step(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.copy_(p)
        for table in self.tables:
            core.store_(table, table.storage, table.storage_config)


# --- data parallel ---------------------------------------------------------------------------------------------


def _average_gradients(params: Sequence[nn.Parameter], world: int, comm: torch.device) -> None:
    """Average the gradients of ``params`` over the ranks (a missing gradient counts as zeros, on every rank)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for group in by_kind.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(comm)
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def _broadcast_model(model: nn.Module, comm: torch.device) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    for t in model.state_dict(keep_vars=True).values():
        buf = t.detach().to(comm)
        dist.broadcast(buf, src=0)
        if buf.data_ptr() != t.data_ptr():
            t.data.copy_(buf)


# --- the loop --------------------------------------------------------------------------------------------------


LossFn = Callable[[Any], torch.Tensor]
Batches = Callable[[int], Iterable[tuple[Any, int]]]
ScoreFn = Callable[[], tuple[float, float | None]]
StepFn = Callable[[int, int, int, float], None]
EpochFn = Callable[[EpochRecord], None]


def run(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    steps_per_epoch: int,
    config: TrainConfig,
    *,
    params: Sequence[nn.Parameter] | None = None,
    score: ScoreFn | None = None,
    total_steps: int | None = None,
    source: Any = None,
    signature: Mapping[str, Any] | None = None,
    train_mode: bool = True,
    diverged: Callable[[int, float], Exception] | None = None,
    on_step: StepFn | None = None,
    on_epoch: EpochFn | None = None,
    state: dict | None = None,
    start_score: float | None = None,
) -> FitResult:
    """Train ``model`` on ``loss_fn(batch)`` (the objective: a scalar loss) over ``batches(epoch)`` (pairs of a
    batch and its number of examples, ``steps_per_epoch`` of them) for ``config.epochs`` epochs, or until
    ``total_steps`` steps when given; return the best weights (by ``score``, loaded into the model) and the state to
    resume from.

    ``params`` are the candidates to train (default all), filtered by ``recoverable_parameters``. ``score()`` gives
    the dev score (higher is better) and an optional second figure after every epoch; without it the last epoch is
    the best. ``start_score`` (the score of the weights as given) makes the start a candidate, epoch 0.
    ``source`` (an object with ``state_dict``/``load_state_dict``) is the batches' own state, saved with the resume
    state. ``signature`` adds what a resumed run must share with the one that made ``state`` besides the config.
    ``train_mode`` is the mode the model trains in (False: dropout off). ``diverged(step, loss)`` builds the error
    raised on a non-finite loss (without it, training goes on).
    """
    config.validate()
    if steps_per_epoch < 1:
        raise InputError("the training set is empty")
    started = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = _resolve_amp(config.amp, device)
    distributed = is_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    comm = _comm_device(device) if distributed else device
    total = config.epochs * steps_per_epoch if total_steps is None else total_steps
    epochs = config.epochs if total_steps is None else math.ceil(total_steps / steps_per_epoch)

    model.to(device)
    trained = recoverable_parameters(model, params)
    optimizer = make_optimizer(config.optimizer, trained, config.lr, config.weight_decay, config.momentum)
    scheduler = make_schedule(config.schedule, optimizer, steps_per_epoch=steps_per_epoch, lr_lb=config.lr_lb,
                              lr_ub=config.lr_ub, step_size=config.step_size, decay=config.decay,
                              total_steps=max(1, total), warmup=config.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    sig = {k: getattr(config, k) for k in _RESUME_KEYS}
    sig.update(steps_per_epoch=steps_per_epoch, **(signature or {}))
    if config.schedule == "warmup-cosine":
        sig["total_steps"] = total

    if state is None:
        if distributed:
            _broadcast_model(model, comm)
        seed_everything(config.seed)
        start_epoch, history = 0, []
        best: dict = {"epoch": None, "dev_accuracy": None, "weights": None}
        if start_score is not None and score is not None:
            best = {"epoch": 0, "dev_accuracy": start_score, "weights": _to_cpu(model.state_dict())}
        projection = StraightThrough(model, trained)
    else:
        _check_resume(state, sig)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"] and scaler.is_enabled():  # a disabled scaler (CPU, bf16) saves and needs nothing
                scaler.load_state_dict(state["scaler"])
            projection = StraightThrough(model, trained)
            if "masters" in state:
                projection.load(state["masters"])
            if "source" in state and source is not None:
                source.load_state_dict(state["source"])
            rng = dict(state["rng"], python=_python_state(state["rng"]["python"]))
            _set_rng_state(rng)
            start_epoch = int(state["epoch"])
            history = [EpochRecord(**record) for record in state["history"]]
            best = dict(state["best"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"the resume state is damaged ({type(e).__name__}: {first}); delete it to start over"
                             ) from None

    autocast = (
        partial(torch.autocast, device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext
    )

    for epoch in range(start_epoch, epochs):
        epoch_start = time.perf_counter()
        torch.manual_seed(_derived_seed(config.seed, epoch, rank))
        model.train(train_mode)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        lr_last = lr_max = 0.0
        steps = min(steps_per_epoch, total - epoch * steps_per_epoch)
        for step, (batch, size) in enumerate(batches(epoch), start=1):
            if step > steps:
                break
            lr_last = float(optimizer.param_groups[0]["lr"])
            lr_max = max(lr_max, lr_last)
            with autocast():
                loss = loss_fn(batch)
            loss = loss.float()
            if diverged is not None and not torch.isfinite(loss):
                raise diverged(epoch * steps_per_epoch + step, float(loss))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if distributed:
                _average_gradients(trained, world, comm)
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
            if projection:
                projection.before_step()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if projection:
                projection.after_step()
            loss_sum += loss.detach().double() * size
            seen += size
            if on_step is not None:
                on_step(epoch + 1, step, steps_per_epoch, float(loss.detach()))

        totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if distributed:
            totals = totals.to(comm)
            dist.all_reduce(totals)
        train_loss, seen_all = float(totals[0] / totals[1].clamp(min=1)), int(totals[1])
        train_seconds = time.perf_counter() - epoch_start

        dev_accuracy = dev_f1 = None
        if score is not None:
            dev_accuracy, dev_f1 = score()
            if distributed:
                shared = torch.tensor([dev_accuracy, math.nan if dev_f1 is None else dev_f1], dtype=torch.float64,
                                      device=comm)
                dist.broadcast(shared, src=0)
                dev_accuracy = float(shared[0])
                dev_f1 = None if math.isnan(float(shared[1])) else float(shared[1])
        is_best = score is None or best["dev_accuracy"] is None or dev_accuracy > best["dev_accuracy"]
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
        state = _make_state(epoch + 1, model, optimizer, scheduler, scaler, best, history, sig, source, projection)
        if on_epoch is not None:
            on_epoch(dataclasses.replace(record, state=state))

    if state is None:  # zero epochs asked for: the current weights are all there is
        best = {"epoch": None, "dev_accuracy": None, "weights": _to_cpu(model.state_dict())}
        state = _make_state(0, model, optimizer, scheduler, scaler, best, history, sig, source, projection)
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
