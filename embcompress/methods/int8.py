"""``int8`` storage: symmetric int8 with one float32 scale per row, the paper's 8-bit baseline.

For a row r, scale_r = max_j |w_rj| / 127 and q_rj = round(w_rj / scale_r), so |w_rj - q_rj scale_r| <= scale_r / 2.
The codes keep the tensor's name and shape; the scales are ``<name>_scale``. One scheme everywhere: ``quantize``,
``compress --method int8``, the factors of ``svd+int8`` and ``export --quantize int8`` of a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, InputError
from .base import STORAGE, BudgetError, Config, Method, register

INT8_MAX = 127
SCALE_SUFFIX = "_scale"
_BLOCK_ELEMS = 1 << 22  # rows are quantized in blocks of about this many elements


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (dim 0): returns (q int8, same shape as w; scale float32, shape [rows]).

    scale_r = max |w_r| / 127 and q_r = round(w_r / scale_r) in [-127, 127]; an all-zero row gets scale 0.
    """
    if w.dim() < 1 or not w.is_floating_point():
        raise InputError(
            f"int8 quantization needs a floating tensor of at least 1 dimension, got {w.dtype} {tuple(w.shape)}"
        )
    rows = w.shape[0]
    flat = w.detach().reshape(rows, -1)
    q = torch.empty(flat.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, _BLOCK_ELEMS // max(1, flat.shape[1]))
    for i in range(0, rows, step):
        x = flat[i : i + step].to("cpu", torch.float64)
        s = (x.abs().amax(dim=1) / INT8_MAX).to(torch.float32) if x.shape[1] else torch.zeros(x.shape[0])
        safe = torch.where(s > 0, s, torch.ones_like(s)).double()
        q[i : i + step] = torch.round(x / safe.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[i : i + step] = s
    return q.reshape(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale, the scale broadcast along dim 0, in float32, then cast to ``dtype``."""
    if q.dim() < 1 or scale.dim() != 1 or scale.shape[0] != q.shape[0]:
        raise CheckpointError(
            f"int8 tensor of shape {tuple(q.shape)} does not fit scales of shape {tuple(scale.shape)}"
        )
    view = scale.to(torch.float32).reshape(-1, *([1] * (q.dim() - 1)))
    return (q.to(torch.float32) * view).to(dtype)


@dataclass(frozen=True)
class Int8Config(Config):
    """No options: one float32 scale per row."""

    def stored_bytes(self, rows: int, dim: int) -> int:
        return rows * dim + 4 * rows

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> Int8Config:
        config = cls(**options)
        need = config.stored_bytes(rows, dim)
        if need > budget:
            raise BudgetError(f"int8 needs {need} bytes for a {rows} x {dim} table, over the budget of {budget}")
        return config


def _quantize(w: torch.Tensor, config: Int8Config) -> dict[str, torch.Tensor]:
    q, scale = quantize_int8(w)
    return {"": q, SCALE_SUFFIX: scale}


def _dequantize(stored: Mapping[str, torch.Tensor], config: Int8Config, shape: tuple[int, ...]) -> torch.Tensor:
    return dequantize_int8(stored[""], stored[SCALE_SUFFIX]).reshape(shape)


METHOD = register(Method(
    name="int8",
    kind=STORAGE,
    config=Int8Config,
    description="symmetric int8, one float32 scale per row (0.26 of float32)",
    quantize=_quantize,
    dequantize=_dequantize,
))
