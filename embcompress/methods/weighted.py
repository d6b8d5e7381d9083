"""``weighted`` structure: frequency-weighted truncated SVD (needs token counts).

Row i is weighted by f_i = (count_i + smoothing) ** power and the factors minimise sum_i f_i ||w_i - (W_a W_b)_i||^2,
so the rank goes where the user's texts are. Served by the same module as ``svd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..svd import factorize_weighted
from .base import STRUCTURE, Context, Method, register
from . import svd
from .svd import FactorizedEmbedding, SVDConfig

DEFAULT_SMOOTHING = 1.0


@dataclass(frozen=True)
class WeightedConfig(SVDConfig):
    """The SVD's options plus how counts become row weights."""

    smoothing: float = DEFAULT_SMOOTHING
    power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.smoothing > 0:
            raise InputError(f"--smoothing must be a positive number, got {self.smoothing}")
        if not 0 <= self.power <= 4:
            raise InputError(f"--weight-power must be in [0, 4], got {self.power}")

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        return (counts.to(torch.float64) + self.smoothing) ** self.power


def row_weights(config: Any, context: Context, rows: int, method: str) -> torch.Tensor:
    """The row weights of a counted method, refused with one line when the counts are missing or do not fit."""
    if context.counts is None:
        raise InputError(f"--method {method} needs token counts (--counts FILE or --corpus TEXTS)")
    if context.counts.numel() != rows:
        raise InputError(f"{context.counts.numel()} token counts for a table of {rows} rows; the counts must come "
                         "from this model's vocabulary")
    return config.weights(context.counts)


def _encode(W: torch.Tensor, config: WeightedConfig, context: Context) -> FactorizedEmbedding:
    weights = row_weights(config, context, W.shape[0], "weighted")
    k = config.choose_rank(W)
    factors = factorize_weighted(W.detach().to(context.device), k, weights)
    module = FactorizedEmbedding.from_factors(factors.a.cpu(), factors.b.cpu(), context.padding_idx)
    module.rel_error = factors.rel_error
    module._config = WeightedConfig(rank=k, algorithm=config.algorithm, force=config.force,
                                    multiple=config.multiple, smoothing=config.smoothing, power=config.power)
    return module


METHOD = register(Method(
    name="weighted",
    kind=STRUCTURE,
    config=WeightedConfig,
    description="truncated SVD weighted by token counts: rank goes to frequent tokens",
    encode=_encode,
    table=FactorizedEmbedding,
    fit_stored=svd.METHOD.fit_stored,
    needs=("counts",),
    budget_options=("rank",),
))
