"""The learning-rate schedules, kept where the classifier loop first had them: they live in
``embcompress.recover.schedules`` (the one recovery loop's)."""

from __future__ import annotations

from ..recover.schedules import (
    CALR,
    CLR,
    DEFAULT_DECAY,
    DEFAULT_LB_RATIO,
    DEFAULT_WARMUP,
    SCHEDULES,
    ConstantLR,
    WarmupCosine,
    make_schedule,
    triangular_lr,
)

__all__ = ["CALR", "CLR", "DEFAULT_DECAY", "DEFAULT_LB_RATIO", "DEFAULT_WARMUP", "SCHEDULES", "ConstantLR",
           "WarmupCosine", "make_schedule", "triangular_lr"]
