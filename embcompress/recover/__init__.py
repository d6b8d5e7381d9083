"""Recovery: the one training loop (``loop.run``) that classifier training and fine-tuning, labelled fine-tuning of
Hugging Face encoders and label-free distillation share, with what it trains and how tables stay in their storage."""

from __future__ import annotations

from .loop import (
    EpochRecord,
    FitResult,
    StraightThrough,
    TrainConfig,
    recoverable_parameters,
    run,
    stored_tables,
)

__all__ = ["EpochRecord", "FitResult", "StraightThrough", "TrainConfig", "recoverable_parameters", "run",
           "stored_tables"]
