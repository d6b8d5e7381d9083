"""LSTMClassifier: shapes, packed sequences ignore padding, the config round trip, a FactorizedEmbedding in place."""

from __future__ import annotations

import json

import pytest
import torch

from embcompress.errors import InputError
from embcompress.models import LSTMClassifier, build_model, model_config
from embcompress.modules import FactorizedEmbedding


def small_lstm(**kw: object) -> LSTMClassifier:
    torch.manual_seed(0)
    return LSTMClassifier(40, 6, 10, 3, **kw).eval()


IDS = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0], [8, 0, 0, 0]])
LENGTHS = torch.tensor([4, 2, 1])


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"bidirectional": True}])
def test_forward_shape(kw: dict) -> None:
    assert small_lstm(**kw)(IDS, LENGTHS).shape == (3, 3)


def test_padding_and_batch_company_change_nothing() -> None:
    model = small_lstm(bidirectional=True)
    base = model(IDS, LENGTHS)
    padded = torch.cat([IDS, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(base, model(padded, LENGTHS), atol=1e-6)
    assert torch.allclose(base, model(padded, None), atol=1e-6)  # lengths default to the non-pad count
    alone = model(IDS[1:2, :2], LENGTHS[1:2])
    assert torch.allclose(base[1:2], alone, atol=1e-6)


def test_factorized_embedding_in_place() -> None:
    model = small_lstm()
    model.embedding = FactorizedEmbedding(40, 6, 2, padding_idx=0)
    logits = model(IDS, LENGTHS)
    assert logits.shape == (3, 3)
    model.train()
    model(IDS, LENGTHS).sum().backward()
    assert model.embedding.weight_a.grad is not None and model.embedding.weight_b.grad is not None


def test_config_round_trip_and_checks() -> None:
    model = small_lstm(num_layers=2, dropout=0.2)
    config = json.loads(json.dumps(model_config(model)))
    assert config == {
        "arch": "lstm", "vocab_size": 40, "embed_dim": 6, "hidden_dim": 10, "num_classes": 3, "num_layers": 2,
        "dropout": 0.2, "padding_idx": 0, "bidirectional": False,
    }  # fmt: skip
    again = build_model(config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.eval()(IDS, LENGTHS), model(IDS, LENGTHS))
    with pytest.raises(InputError):
        LSTMClassifier(40, 6, 0, 3)
    with pytest.raises(InputError):
        build_model({"arch": "lstm", "vocab_size": 40, "embed_dim": 6, "num_classes": 3})
