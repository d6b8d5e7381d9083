"""LSTM sentence classifier, the paper's second model.

Word embeddings (dropout) -> an LSTM run over packed sequences, so padding never enters the recurrence -> the final
hidden state of the last layer (both directions concatenated when bidirectional) -> dropout -> a linear layer to
class logits. The table is the attribute ``embedding`` so that a ``FactorizedEmbedding`` can replace it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..errors import InputError
from .dan import _check_common


class LSTMClassifier(nn.Module):
    """Embeddings -> (Bi)LSTM over packed sequences -> last hidden state -> Linear to logits."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        num_classes: int,
        num_layers: int = 1,
        dropout: float = 0.4,
        padding_idx: int | None = 0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        _check_common(vocab_size, embed_dim, num_classes, dropout, padding_idx)
        if hidden_dim < 1 or num_layers < 1:
            raise InputError(f"hidden_dim and num_layers must be at least 1, got {hidden_dim} and {num_layers}")
        self.config = {
            "arch": "lstm",
            "vocab_size": int(vocab_size),
            "embed_dim": int(embed_dim),
            "hidden_dim": int(hidden_dim),
            "num_classes": int(num_classes),
            "num_layers": int(num_layers),
            "dropout": float(dropout),
            "padding_idx": padding_idx,
            "bidirectional": bool(bidirectional),
        }
        self.padding_idx = padding_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.classifier = nn.Linear(hidden_dim * (2 if bidirectional else 1), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B x C) for padded ids (B x T); ``lengths`` (B) defaults to the count of non-pad tokens."""
        if lengths is None:
            if self.padding_idx is None:
                lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
            else:
                lengths = (ids != self.padding_idx).sum(1)
        lengths = lengths.detach().to("cpu", torch.long).clamp(min=1, max=ids.shape[1])
        vectors = self.dropout(self.embedding(ids))
        packed = pack_padded_sequence(vectors, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        if self.lstm.bidirectional:
            last = torch.cat([h_n[-2], h_n[-1]], dim=-1)
        else:
            last = h_n[-1]
        return self.classifier(self.dropout(last))
