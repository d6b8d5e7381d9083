"""Swap factorized embeddings into your own nn.Module, train as usual, save, and load back.

Run: .venv/bin/python examples/compress_module.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from embcompress import FactorizedEmbedding, compress_embeddings, factorize, load_factorized


class BagOfWords(nn.Module):
    def __init__(self, vocab: int = 20000, dim: int = 300, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(ids).mean(1))


def main() -> None:
    torch.manual_seed(0)
    model = BagOfWords()
    dense_params = sum(p.numel() for p in model.parameters())

    # 1. In place, on a live module: every nn.Embedding that looks like a token table becomes W_a W_b.
    reports = compress_embeddings(model, reduction=0.9)
    small_params = sum(p.numel() for p in model.parameters())
    print(f"swapped {reports[0].name}: rank {reports[0].rank}, relative error {reports[0].rel_error:.3f}")
    print(f"parameters {dense_params:,} -> {small_params:,}; {model.embedding}")
    assert isinstance(model.embedding, FactorizedEmbedding)
    logits = model(torch.randint(1, 20000, (4, 12)))  # train it like any other module from here
    print("logits", tuple(logits.shape))

    # 2. Or from a checkpoint on disk, then back into a fresh model.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bow.safetensors"
        save_file(BagOfWords().state_dict(), str(path))
        result = factorize(path, reduction=0.9)
        fresh = load_factorized(BagOfWords(), result.output)
        print(f"loaded {result.output}: embedding is {fresh.embedding}")


if __name__ == "__main__":
    main()
