"""``fp16`` storage: IEEE half precision, the paper's 16-bit baseline (values beyond its range are refused)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TableError
from .base import STORAGE, BudgetError, Config, Method, register

_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class Fp16Config(Config):
    """No options."""

    def stored_bytes(self, rows: int, dim: int) -> int:
        return 2 * rows * dim

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> Fp16Config:
        config = cls(**options)
        if config.stored_bytes(rows, dim) > budget:
            raise BudgetError(f"fp16 needs {config.stored_bytes(rows, dim)} bytes, over the budget of {budget}")
        return config


def _quantize(w: torch.Tensor, config: Fp16Config) -> dict[str, torch.Tensor]:
    if w.numel() and float(w.detach().abs().max()) > _FP16_MAX:
        raise TableError(f"values up to {float(w.abs().max()):.3g} do not fit float16 (max {_FP16_MAX:.0f})")
    return {"": w.detach().to(torch.float16)}


def _dequantize(stored: Mapping[str, torch.Tensor], config: Fp16Config, shape: tuple[int, ...]) -> torch.Tensor:
    return stored[""].to(torch.float32).reshape(shape)


METHOD = register(Method(
    name="fp16",
    kind=STORAGE,
    config=Fp16Config,
    description="IEEE half precision (0.5 of float32)",
    quantize=_quantize,
    dequantize=_dequantize,
))
