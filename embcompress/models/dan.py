"""Deep Averaging Network (Iyyer et al., 2015), the paper's first classifier.

The sentence vector is the mean of its word embeddings over the non-pad tokens; fully connected layers (1024 and 512
units in the paper) with ReLU and dropout 0.4 follow, then a linear layer to class logits (softmax lives in the
loss). The table is the attribute ``embedding`` so that a ``FactorizedEmbedding`` can replace it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError


class DAN(nn.Module):
    """Mean of word embeddings -> [Linear, ReLU, Dropout] per hidden size -> Linear to logits."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (1024, 512),
        dropout: float = 0.4,
        padding_idx: int | None = 0,
    ) -> None:
        super().__init__()
        _check_common(vocab_size, embed_dim, num_classes, dropout, padding_idx)
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise InputError(f"hidden sizes must be at least 1, got {hidden}")
        self.config = {
            "arch": "dan",
            "vocab_size": int(vocab_size),
            "embed_dim": int(embed_dim),
            "num_classes": int(num_classes),
            "hidden": hidden,
            "dropout": float(dropout),
            "padding_idx": padding_idx,
        }
        self.padding_idx = padding_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        layers: list[nn.Module] = []
        width = embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B x C) for padded ids (B x T).

        With a padding index the mask is ``ids != padding_idx``, so extra pad columns change nothing; without one,
        ``lengths`` says how many leading tokens are real.
        """
        if self.padding_idx is not None:
            mask = ids != self.padding_idx
        elif lengths is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            mask = positions.unsqueeze(0) < lengths.to(ids.device).unsqueeze(1)
        else:
            mask = torch.ones_like(ids, dtype=torch.bool)
        vectors = self.embedding(ids)
        mask = mask.unsqueeze(-1).to(vectors.dtype)
        mean = (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(self.mlp(mean))


def _check_common(vocab_size: int, embed_dim: int, num_classes: int, dropout: float, padding_idx: int | None) -> None:
    """Shared argument checks of the classifiers (InputError on a bad value)."""
    if vocab_size < 1 or embed_dim < 1:
        raise InputError(f"vocab_size and embed_dim must be at least 1, got {vocab_size} and {embed_dim}")
    if num_classes < 2:
        raise InputError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout}")
    if padding_idx is not None and not 0 <= padding_idx < vocab_size:
        raise InputError(f"padding_idx must be in [0, {vocab_size}), got {padding_idx}")
