from pathlib import Path

import pytest
import torch

from embcompress.budget import rank_for_budget
from embcompress.classifier import load_classifier
from embcompress.errors import InputError
from embcompress.modules import FactorizedEmbedding
from embcompress.train.loop import TrainConfig
from embcompress.train.run import train_classifier
from tests.builders import write_sentiment_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, Path]:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 40, 1)
    model = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                             config=TrainConfig(epochs=4, batch_size=16, device="cpu")).output
    return Path(model), train, dev


def test_bisection_finds_smallest_rank_within_budget(trained, tmp_path: Path) -> None:
    model, train, dev = trained
    result = rank_for_budget(model, dev, max_drop=0.05, config=TrainConfig(device="cpu"))
    assert result.dev_accuracy >= result.baseline_dev_accuracy - 0.05
    ranks = [t.rank for t in result.trials]
    assert result.rank in ranks and ranks == sorted(ranks)
    # every rank below the chosen one that was tried failed the budget
    assert all(not t.within_budget for t in result.trials if t.rank < result.rank)
    clf = load_classifier(result.output)
    assert isinstance(clf.model.embedding, FactorizedEmbedding) and clf.model.embedding.rank == result.rank


def test_with_finetune_and_errors(trained, tmp_path: Path) -> None:
    model, train, dev = trained
    result = rank_for_budget(model, dev, max_drop=0.05, train_path=train, finetune_epochs=1,
                             output=tmp_path / "b.safetensors", config=TrainConfig(batch_size=16, device="cpu"))
    assert result.finetune_epochs == 1 and Path(result.output).exists()
    with pytest.raises(InputError, match="needs --data"):
        rank_for_budget(model, dev, max_drop=0.01, finetune_epochs=1)
    with pytest.raises(InputError, match="max-drop"):
        rank_for_budget(model, dev, max_drop=1.5)
    with pytest.raises(InputError, match="already factorized"):
        rank_for_budget(result.output, dev, max_drop=0.01, output=tmp_path / "c.safetensors")
