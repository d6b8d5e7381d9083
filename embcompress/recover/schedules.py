"""Learning-rate schedules stepped once per iteration: CLR, the paper's CALR, a constant rate, and warm-up + cosine
(every objective of the recovery loop may use any of them).

``CLR`` is Smith's (2017) triangular cyclic rate between a lower and an upper bound. ``CALR`` (Cyclically Annealed
Learning Rate, Acharya et al. 2019, Algorithm 1) runs the same triangle but shrinks the upper bound at the end of
every epoch, ``LR_UB <- LR_UB * exp(decay)`` with ``decay < 0``, and puts it back to its initial value once it falls
to or below the lower bound, so training alternates phases of exploration and annealing.

All are ``torch.optim.lr_scheduler.LRScheduler`` subclasses whose rate is a pure function of the iteration count
(``last_epoch``, which PyTorch's base class counts in ``step()`` calls), so ``state_dict``/``load_state_dict``
resume exactly. Every parameter group gets the same rate.

Defaults (``make_schedule``). The paper publishes no bounds, so they were chosen by short DAN/LSTM runs on SST-2
with Adam: ``lr_ub`` = the optimizer's learning rate (``TrainConfig`` sets 5e-3), ``lr_lb`` = ``lr_ub / 10``,
``step_size`` = half an epoch, rounded down (about one full triangle per epoch, so each epoch ends near the lower
bound, right where CALR lowers the next epoch's peak), ``decay`` = ln(1/2) (the peak halves every epoch; with
``lb = ub/10`` epochs 1-4 peak at ub, ub/2, ub/4, ub/8 and the 5th is back at ub).

``warmup-cosine`` (the usual schedule for transformers, and label-free distillation's default) rises linearly
over the first ``warmup`` fraction of the run's steps (default 5 %) to the optimizer's rate, then follows a
half cosine down to 0 at the last step; it needs the run's total number of steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..errors import InputError

SCHEDULES = ("calr", "clr", "constant", "warmup-cosine")
DEFAULT_DECAY = math.log(0.5)
DEFAULT_LB_RATIO = 0.1
DEFAULT_WARMUP = 0.05


def triangular_lr(iteration: int, lr_lb: float, lr_ub: float, step_size: int) -> float:
    """Smith's triangular policy: the rate at ``iteration`` (0-based) for a half-cycle of ``step_size`` iterations."""
    cycle = math.floor(1 + iteration / (2 * step_size))
    x = abs(iteration / step_size - 2 * cycle + 1)
    return lr_lb + (lr_ub - lr_lb) * max(0.0, 1 - x)


def _check_bounds(lr_lb: float, lr_ub: float, step_size: int) -> None:
    if not lr_lb > 0:
        raise InputError(f"the lower learning-rate bound must be positive, got {lr_lb}")
    if not lr_ub > lr_lb:
        raise InputError(f"the upper learning-rate bound ({lr_ub}) must exceed the lower one ({lr_lb})")
    if int(step_size) != step_size or step_size < 1:
        raise InputError(f"step_size must be a whole number of iterations >= 1, got {step_size}")


class CLR(LRScheduler):
    """Triangular cyclic learning rate (Smith 2017) between ``lr_lb`` and ``lr_ub``; half-cycle ``step_size``."""

    def __init__(self, optimizer: Optimizer, lr_lb: float, lr_ub: float, step_size: int, last_epoch: int = -1) -> None:
        _check_bounds(lr_lb, lr_ub, step_size)
        self.lr_lb = float(lr_lb)
        self.lr_ub = float(lr_ub)
        self.step_size = int(step_size)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = triangular_lr(self.last_epoch, self.lr_lb, self.lr_ub, self.step_size)
        return [lr for _ in self.optimizer.param_groups]


class CALR(LRScheduler):
    """Cyclically Annealed Learning Rate, the paper's Algorithm 1.

    Iteration ``it`` (0-based, counted over the whole run) gets ``triangular_lr(it, LR_LB, LR_UB(e), step_size)``
    where ``e = it // steps_per_epoch`` and ``LR_UB(e)`` is the initial upper bound after ``e`` epoch ends, each
    of which does ``LR_UB <- LR_UB * exp(decay)`` and then, if ``LR_UB <= LR_LB``, ``LR_UB <- initial LR_UB``.
    ``lr_ub_current`` is the upper bound in force for the current iteration.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lb: float,
        lr_ub: float,
        step_size: int,
        decay: float,
        steps_per_epoch: int,
        last_epoch: int = -1,
    ) -> None:
        _check_bounds(lr_lb, lr_ub, step_size)
        if not decay < 0:
            raise InputError(f"the CALR decay must be negative (LR_UB shrinks by exp(decay) per epoch), got {decay}")
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise InputError(f"steps_per_epoch must be a whole number >= 1, got {steps_per_epoch}")
        self.lr_lb = float(lr_lb)
        self.lr_ub = float(lr_ub)
        self.step_size = int(step_size)
        self.decay = float(decay)
        self.steps_per_epoch = int(steps_per_epoch)
        self.lr_ub_current = self.lr_ub
        self._ub_epoch = 0
        super().__init__(optimizer, last_epoch)

    def upper_bound(self, epoch: int) -> float:
        """LR_UB during 0-based ``epoch``: the initial bound after ``epoch`` end-of-epoch updates."""
        if epoch < self._ub_epoch:
            self._ub_epoch, self.lr_ub_current = 0, self.lr_ub
        ub = self.lr_ub_current
        for _ in range(self._ub_epoch, epoch):
            ub = ub * math.exp(self.decay)
            if ub <= self.lr_lb:
                ub = self.lr_ub
        self._ub_epoch, self.lr_ub_current = epoch, ub
        return ub

    def get_lr(self) -> list[float]:
        ub = self.upper_bound(self.last_epoch // self.steps_per_epoch)
        lr = triangular_lr(self.last_epoch, self.lr_lb, ub, self.step_size)
        return [lr for _ in self.optimizer.param_groups]


class ConstantLR(LRScheduler):
    """The optimizer's own learning rate at every iteration (a scheduler so the loop treats all schedules alike)."""

    def get_lr(self) -> list[float]:
        return list(self.base_lrs)


class WarmupCosine(LRScheduler):
    """Linear warm-up over ``warmup_steps`` iterations, then a half cosine from the optimizer's rate to 0 at
    iteration ``total_steps``: iteration ``i`` (0-based) trains at ``base * min(1, (i + 1) / w)`` during warm-up
    and ``base * (1 + cos(pi * (i + 1 - w) / (total - w))) / 2`` after."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, last_epoch: int = -1) -> None:
        if int(total_steps) != total_steps or total_steps < 1:
            raise InputError(f"total_steps must be a whole number >= 1, got {total_steps}")
        if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total_steps:
            raise InputError(f"warmup_steps must be a whole number in [0, {total_steps}], got {warmup_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = max(1, int(warmup_steps))
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        """The multiple of the base rate at ``iteration`` (0-based)."""
        w, i = self.warmup_steps, iteration + 1
        if i <= w:
            return min(1.0, i / w)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - w) / max(1, self.total_steps - w))))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


def make_schedule(
    name: str,
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    lr_lb: float | None = None,
    lr_ub: float | None = None,
    step_size: int | None = None,
    decay: float | None = None,
    total_steps: int | None = None,
    warmup: float | None = None,
) -> LRScheduler:
    """Build ``calr``, ``clr``, ``constant`` or ``warmup-cosine`` with the module's documented defaults for unset
    parameters.

    ``lr_ub`` defaults to the optimizer's (first group's) learning rate, ``lr_lb`` to ``lr_ub / 10``,
    ``step_size`` to half an epoch (at least 1) and ``decay`` to ln(1/2). ``warmup-cosine`` runs over
    ``total_steps`` (default: one epoch) and warms up over ``warmup`` of them (default 5 %).
    """
    if name not in SCHEDULES:
        raise InputError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})")
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise InputError(f"steps_per_epoch must be a whole number >= 1, got {steps_per_epoch}")
    if name == "constant":
        return ConstantLR(optimizer)
    if name == "warmup-cosine":
        total = steps_per_epoch if total_steps is None else total_steps
        fraction = DEFAULT_WARMUP if warmup is None else warmup
        if not 0.0 <= fraction < 1.0:
            raise InputError(f"warmup must be a fraction in [0, 1), got {fraction}")
        return WarmupCosine(optimizer, total, int(total * fraction))
    ub = float(optimizer.param_groups[0]["lr"]) if lr_ub is None else lr_ub
    lb = ub * DEFAULT_LB_RATIO if lr_lb is None else lr_lb
    size = max(1, steps_per_epoch // 2) if step_size is None else step_size
    if name == "clr":
        return CLR(optimizer, lb, ub, size)
    return CALR(optimizer, lb, ub, size, DEFAULT_DECAY if decay is None else decay, steps_per_epoch)
