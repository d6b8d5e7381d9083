"""fit and evaluate on tiny synthetic data: learning, determinism, resume equality, callbacks, metrics, devices."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embcompress.data import EncodedDataset, LabelSet
from embcompress.errors import InputError
from embcompress.models import DAN, LSTMClassifier
from embcompress.modules import FactorizedEmbedding
from embcompress.train.loop import Distillation
from embcompress.train import (
    TrainConfig,
    evaluate,
    fit,
    init_distributed_from_env,
    is_main_process,
    resolve_device,
)

VOCAB = 24


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and intra-op threads crawl on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def separable(n: int, seed: int) -> EncodedDataset:
    """Class 0 texts use tokens 2..12, class 1 texts tokens 13..23; lengths 2..6."""
    rng = random.Random(seed)
    sequences, labels = [], []
    for i in range(n):
        label = i % 2
        low = 2 if label == 0 else 13
        sequences.append(torch.tensor([rng.randrange(low, low + 11) for _ in range(rng.randint(2, 6))]))
        labels.append(label)
    return EncodedDataset(sequences, labels, LabelSet.build(["neg", "pos"]))


TRAIN, DEV = separable(320, 1), separable(60, 2)


def dan(seed: int = 0) -> DAN:
    torch.manual_seed(seed)
    return DAN(VOCAB, 8, 2, hidden=(16,), dropout=0.2)


def config(**kw: object) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 16, "lr": 2e-2, "device": "cpu", "seed": 3}
    return TrainConfig(**{**base, **kw})


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def timeless(history: list) -> list[dict]:
    """Epoch records without their wall-clock fields."""
    return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "examples_per_second")} for r in history]


def test_fit_learns_a_separable_task() -> None:
    model = dan()
    result = fit(model, TRAIN, DEV, config(epochs=4))
    assert result.best_dev_accuracy >= 0.95
    assert len(result.history) == 4
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(0 < r.lr <= r.lr_max <= 2e-2 * (1 + 1e-9) for r in result.history)
    assert result.device == "cpu" and result.amp == "off"
    best = result.history[result.best_epoch - 1]
    assert best.is_best and best.dev_accuracy == result.best_dev_accuracy
    assert same_weights({k: v for k, v in model.state_dict().items()}, result.best_state)
    assert evaluate(model, DEV, "cpu").accuracy == result.best_dev_accuracy


@pytest.mark.parametrize(
    "kw",
    [
        {"optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "schedule": "clr"},
        {"optimizer": "adagrad", "lr": 0.05, "schedule": "constant", "max_grad_norm": 1.0},
        {"optimizer": "adam", "max_len": 3, "weight_decay": 0.0},
    ],
)
def test_fit_with_other_optimizers_and_schedules(kw: dict) -> None:
    result = fit(dan(), TRAIN, DEV, config(epochs=2, **kw))
    assert result.best_dev_accuracy >= 0.9


def test_fit_lstm_and_factorized_embedding() -> None:
    torch.manual_seed(0)
    lstm = LSTMClassifier(VOCAB, 8, 12, 2, dropout=0.1)
    assert fit(lstm, TRAIN, DEV, config(epochs=3)).best_dev_accuracy >= 0.9
    model = dan()
    model.embedding = FactorizedEmbedding(VOCAB, 8, 4, padding_idx=0)
    before = model.embedding.weight_a.detach().clone()
    result = fit(model, TRAIN, DEV, config(epochs=3))
    assert result.best_dev_accuracy >= 0.9
    assert not torch.equal(before, model.embedding.weight_a.detach())
    assert torch.all(model.embedding.weight_a.detach()[0] == 0)


def test_same_seed_same_weights() -> None:
    a = fit(dan(), TRAIN, DEV, config())
    b = fit(dan(), TRAIN, DEV, config())
    assert same_weights(a.state["model"], b.state["model"])
    assert same_weights(a.best_state, b.best_state)
    c = fit(dan(), TRAIN, DEV, config(seed=4))
    assert not same_weights(a.state["model"], c.state["model"])


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = fit(dan(), TRAIN, DEV, config(epochs=3))
    saved = tmp_path / "state.pt"
    first = fit(dan(), TRAIN, DEV, config(epochs=2), on_epoch=lambda record: torch.save(record.state, saved))
    assert first.state["epoch"] == 2
    state = torch.load(saved, weights_only=True)
    steps = []
    resumed = fit(dan(seed=99), TRAIN, DEV, config(epochs=3), state=state, on_step=lambda *a: steps.append(a))
    assert {s[0] for s in steps} == {3}  # only the missing epoch ran
    assert same_weights(resumed.state["model"], straight.state["model"])
    assert same_weights(resumed.best_state, straight.best_state)
    assert resumed.best_epoch == straight.best_epoch
    assert timeless(resumed.history) == timeless(straight.history)
    again = fit(dan(), TRAIN, DEV, config(epochs=3), state=resumed.state)  # nothing left to do
    assert same_weights(again.best_state, straight.best_state)


def test_resume_refuses_a_different_run() -> None:
    state = fit(dan(), TRAIN, DEV, config(epochs=1)).state
    with pytest.raises(InputError, match="batch_size"):
        fit(dan(), TRAIN, DEV, config(epochs=2, batch_size=8), state=state)
    with pytest.raises(InputError):
        fit(dan(), TRAIN, DEV, config(epochs=2), state={"epoch": 1})


def test_callbacks() -> None:
    steps, epochs = [], []
    fit(dan(), TRAIN, None, config(epochs=2), on_step=lambda *a: steps.append(a), on_epoch=epochs.append)
    assert [s[:3] for s in steps] == [(e, i, 20) for e in (1, 2) for i in range(1, 21)]
    assert all(isinstance(s[3], float) for s in steps)
    assert [r.epoch for r in epochs] == [1, 2]
    assert all(r.state is not None and r.state["epoch"] == r.epoch for r in epochs)
    assert all(r.dev_accuracy is None and r.is_best for r in epochs)
    assert "state" not in epochs[0].to_dict()


def test_zero_epochs_keeps_the_model() -> None:
    model = dan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, TRAIN, DEV, config(epochs=0))
    assert result.history == [] and result.best_epoch is None
    assert same_weights(before, model.state_dict())


class Lookup(nn.Module):
    """Predicts class ``ids[:, 0] - 2``: a model whose predictions the test chooses."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(ids[:, 0] - 2, self.num_classes).float() + self.dummy


def test_evaluate_metrics() -> None:
    truth = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 0, 1]
    ds = EncodedDataset([torch.tensor([p + 2, 5]) for p in predicted], truth, LabelSet.build(["a", "b", "c"]))
    model = Lookup(3).train()
    result = evaluate(model, ds, "cpu", batch_size=4)
    assert model.training  # mode restored
    assert result.predictions == predicted
    assert result.accuracy == pytest.approx(3 / 6)
    assert result.confusion == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    a, b, c = result.per_class
    assert (a.label, a.precision, a.recall, a.support) == ("a", pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall, b.f1, b.support) == (pytest.approx(1 / 3), 0.5, pytest.approx(0.4), 2)
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 1)
    assert result.macro_f1 == pytest.approx((2 / 3 + 0.4 + 0.0) / 3)
    assert result.num_examples == 6 and result.examples_per_second > 0
    assert "predictions" not in result.to_dict() and result.to_dict(predictions=True)["predictions"] == predicted


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")


def test_train_config_checks_and_round_trip() -> None:
    cfg = config(schedule="clr", lr_lb=1e-4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"optimizer": "rmsprop"}, {"schedule": "cosine"}, {"lr": 0.0}, {"batch_size": 0}, {"amp": "fp8"}):
        with pytest.raises(InputError):
            fit(dan(), TRAIN, DEV, dataclasses.replace(cfg, **bad))
    with pytest.raises(InputError):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 1.0})
    with pytest.raises(InputError):  # the schedule's own check: upper bound below the lower one
        fit(dan(), TRAIN, DEV, config(lr_lb=0.1, lr_ub=0.01))


def test_not_distributed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed_from_env() is False
    assert is_main_process()


def test_distillation_loss() -> None:
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.0], [-3.0, 1.0]])
    rows, labels = torch.tensor([2, 0]), torch.tensor([1, 1])
    soft = Distillation(teacher, temperature=2.0)
    assert soft.loss(teacher[rows], rows, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert soft.loss(teacher[[0, 2]], rows, labels).item() > 0.1  # rows point at the other examples' targets
    hard = Distillation(teacher, label_weight=1.0)
    logits = torch.randn(2, 2)
    assert hard.loss(logits, rows, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    with pytest.raises(InputError, match="temperature"):
        Distillation(teacher, temperature=-1.0)
