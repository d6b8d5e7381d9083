"""Training: learning-rate schedules (CLR, the paper's CALR, constant, warm-up + cosine) and the classifier's
fit/evaluate on the one recovery loop (``embcompress.recover``)."""

from __future__ import annotations

from .loop import (
    ClassMetrics,
    EpochRecord,
    EvalResult,
    FitResult,
    TrainConfig,
    cleanup_distributed,
    evaluate,
    fit,
    init_distributed_from_env,
    is_distributed,
    is_main_process,
    make_optimizer,
    resolve_device,
    seed_everything,
)
from ..recover.schedules import CALR, CLR, SCHEDULES, ConstantLR, WarmupCosine, make_schedule, triangular_lr

__all__ = [
    "CALR",
    "CLR",
    "SCHEDULES",
    "ClassMetrics",
    "ConstantLR",
    "EpochRecord",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "WarmupCosine",
    "cleanup_distributed",
    "evaluate",
    "fit",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
    "make_optimizer",
    "make_schedule",
    "resolve_device",
    "seed_everything",
    "triangular_lr",
]
