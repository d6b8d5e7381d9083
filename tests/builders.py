"""Builders of tiny state dicts and model folders, shared by the tests (imported as ``tests.builders``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def low_rank_table(V: int, d: int, rank: int, seed: int = 0, noise: float = 0.01) -> torch.Tensor:
    """A V x d table of (numerical) rank ``rank`` plus a little noise, with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(V, rank, generator=g)
    b = torch.randn(rank, d, generator=g) * torch.linspace(1.0, 0.1, rank).unsqueeze(1)
    return (a @ b + noise * torch.randn(V, d, generator=g)).float()


def dan_state(V: int = 600, d: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    emb = low_rank_table(V, d, 8, seed)
    emb[0] = 0.0  # padding row
    return {
        "embedding.weight": emb,
        "fc1.weight": torch.randn(32, d, generator=g),
        "fc1.bias": torch.zeros(32),
        "out.weight": torch.randn(2, 32, generator=g),
        "out.bias": torch.zeros(2),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def bert_state(V: int = 1000, d: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embeddings.word_embeddings.weight": low_rank_table(V, d, 12, seed=3),
        "embeddings.position_embeddings.weight": torch.randn(64, d, generator=g),
        "embeddings.token_type_embeddings.weight": torch.randn(2, d, generator=g),
        "embeddings.LayerNorm.weight": torch.ones(d),
        "embeddings.LayerNorm.bias": torch.zeros(d),
        "embeddings.position_ids": torch.arange(64, dtype=torch.int64).unsqueeze(0),
        "encoder.layer.0.attention.self.query.weight": torch.randn(d, d, generator=g),
        "encoder.layer.0.attention.self.query.bias": torch.zeros(d),
        "encoder.layer.1.attention.self.query.weight": torch.randn(d, d, generator=g),
        "encoder.layer.1.attention.self.query.bias": torch.zeros(d),
        "pooler.dense.weight": torch.randn(d, d, generator=g).half(),
    }


def write_hf_folder(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def write_sentiment_jsonl(path: Path, n: int, seed: int = 0, labels: tuple = ("neg", "pos")) -> Path:
    """A tiny, learnable two-class text set: the label is carried by a cue word among filler words."""
    g = torch.Generator().manual_seed(seed)
    cues = {labels[0]: ["bad", "awful", "dull"], labels[1]: ["good", "great", "fun"]}
    filler = [f"w{i}" for i in range(40)]
    lines = []
    for i in range(n):
        label = labels[i % 2]
        words = [filler[int(j)] for j in torch.randint(0, len(filler), (6,), generator=g)]
        words.insert(int(torch.randint(0, 6, (1,), generator=g)), cues[label][i % 3])
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_classifier(path: Path, words: int = 120, embed_dim: int = 8, seed: int = 0) -> Path:
    """A tiny untrained DAN classifier over the vocabulary ``<pad> <unk> w0 ... w{words-1}`` (no training)."""
    from embcompress.classifier import Classifier, save_classifier
    from embcompress.data import PAD, UNK, LabelSet, Vocab
    from embcompress.models import build_model

    torch.manual_seed(seed)
    vocab = Vocab([PAD, UNK, *(f"w{i}" for i in range(words))])
    model = build_model({"arch": "dan", "vocab_size": len(vocab), "embed_dim": embed_dim, "num_classes": 3,
                         "hidden": [16], "dropout": 0.0}).eval()
    save_classifier(Classifier(model, vocab, LabelSet(["a", "b", "c"])), path)
    return path
