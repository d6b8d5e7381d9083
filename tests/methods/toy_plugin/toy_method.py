"""A toy structure installed by the tests: the table kept as float16 rows times one learnable float32 gain.

It lives outside the package, as a third party's method would, and registers itself with one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.methods import STRUCTURE, BudgetError, Config, Context, Method, Table, register


@dataclass(frozen=True)
class ToyConfig(Config):
    gain: float = 2.0

    def stored_bytes(self, rows: int, dim: int) -> int:
        return 2 * rows * dim + 4

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> ToyConfig:
        config = cls(**options)
        if config.stored_bytes(rows, dim) > budget:
            raise BudgetError("the toy needs half the float32 bytes")
        return config


class ToyTable(Table):
    method = "toy"

    def __init__(self, rows: torch.Tensor, gain: float, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.shape
        self.padding_idx = padding_idx
        self.register_buffer("rows", rows.to(torch.float16))
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self._config = ToyConfig(gain=gain)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.rows.float()) * self.gain

    def dense_weight(self) -> torch.Tensor:
        return self.rows.float() * self.gain

    def config(self) -> Config:
        return self._config

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> ToyTable:
        table = cls(tensors["rows"], 1.0, entry.get("padding_idx"))
        with torch.no_grad():
            table.gain.copy_(tensors["gain"])
        return table


def _encode(W: torch.Tensor, config: ToyConfig, context: Context) -> ToyTable:
    return ToyTable(W.detach() / config.gain, config.gain, context.padding_idx)


METHOD = register(Method(name="toy", kind=STRUCTURE, config=ToyConfig, description="a test's toy structure",
                         encode=_encode, table=ToyTable), replace=True)
