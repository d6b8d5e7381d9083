"""DAN: shapes, masking of padding, the config round trip, and a FactorizedEmbedding in place of the table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from embcompress.errors import InputError
from embcompress.models import DAN, MODELS, build_model, init_embedding, model_config
from embcompress.modules import FactorizedEmbedding


def small_dan(**kw: object) -> DAN:
    torch.manual_seed(0)
    return DAN(50, 8, 3, **{"hidden": (16, 12), "dropout": 0.4, **kw}).eval()


def test_forward_shape_and_default_architecture() -> None:
    model = small_dan()
    ids = torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0]])
    logits = model(ids, torch.tensor([3, 2]))
    assert logits.shape == (2, 3)
    paper = DAN(100, 16, 2)
    widths = [m.out_features for m in paper.modules() if isinstance(m, nn.Linear)]
    assert widths == [1024, 512, 2]
    assert [m.p for m in paper.modules() if isinstance(m, nn.Dropout)] == [0.4, 0.4]
    assert paper.embedding.padding_idx == 0


def test_appending_padding_changes_nothing() -> None:
    model = small_dan()
    ids = torch.tensor([[2, 3, 4], [5, 6, 0]])
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    base = model(ids, torch.tensor([3, 2]))
    assert torch.equal(base, model(padded, torch.tensor([3, 2])))
    assert torch.allclose(base, model(padded, None))


def test_sentence_vector_is_the_mean_over_real_tokens() -> None:
    model = small_dan()
    captured = {}
    model.mlp.register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
    model(torch.tensor([[2, 3, 0]]), torch.tensor([2]))
    table = model.embedding.weight.detach()
    assert torch.allclose(captured["x"][0], (table[2] + table[3]) / 2)


def test_lengths_mask_without_padding_index() -> None:
    model = small_dan(padding_idx=None)
    a = model(torch.tensor([[2, 3, 7, 7]]), torch.tensor([2]))
    b = model(torch.tensor([[2, 3]]), torch.tensor([2]))
    assert torch.allclose(a, b, atol=1e-6)


def test_factorized_embedding_in_place() -> None:
    model = small_dan()
    model.embedding = FactorizedEmbedding(50, 8, 3, padding_idx=0)
    ids = torch.tensor([[2, 3, 0], [4, 0, 0]])
    logits = model(ids, torch.tensor([2, 1]))
    assert logits.shape == (2, 3)
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(logits, model(padded, torch.tensor([2, 1])), atol=1e-6)
    model.train()
    model(ids, torch.tensor([2, 1])).sum().backward()
    assert model.embedding.weight_a.grad is not None and model.embedding.weight_b.grad is not None
    assert torch.all(model.embedding.weight_a.grad[0] == 0)


def test_build_model_and_model_config_round_trip_through_json() -> None:
    model = small_dan()
    config = json.loads(json.dumps(model_config(model)))
    assert config["arch"] == "dan" and config["hidden"] == [16, 12]
    again = build_model(config)
    assert isinstance(again, DAN)
    assert model_config(again) == config
    again.load_state_dict(model.state_dict())
    assert set(MODELS) == {"dan", "lstm"}


@pytest.mark.parametrize(
    "config",
    [
        {"vocab_size": 10, "embed_dim": 4, "num_classes": 2},
        {"arch": "cnn", "vocab_size": 10, "embed_dim": 4, "num_classes": 2},
        {"arch": "dan", "vocab_size": 10, "embed_dim": 4},
        {"arch": "dan", "vocab_size": 10, "embed_dim": 4, "num_classes": 2, "hiden": [4]},
        {"arch": "dan", "vocab_size": 10, "embed_dim": 4, "num_classes": 2, "dropout": 1.5},
        {"arch": "dan", "vocab_size": 10, "embed_dim": 4, "num_classes": 1},
        {"arch": "dan", "vocab_size": 10, "embed_dim": 4, "num_classes": 2, "padding_idx": 10},
    ],
)
def test_build_model_rejects_bad_configs(config: dict) -> None:
    with pytest.raises(InputError):
        build_model(config)


def test_init_embedding_copies_vectors_and_checks_shape() -> None:
    model = small_dan()
    vectors = torch.randn(50, 8)
    init_embedding(model, vectors)
    assert torch.equal(model.embedding.weight.detach(), vectors)
    with pytest.raises(InputError):
        init_embedding(model, torch.randn(49, 8))
