import json
from pathlib import Path

import pytest
import torch

from embcompress import factorize
from embcompress.methods.pq import PQTable
from embcompress.ops.compress import compress
from embcompress.classifier import load_classifier
from embcompress.errors import DataError, InputError, OutputError
from embcompress.modules import FactorizedEmbedding
from embcompress.train.loop import TrainConfig
from embcompress.train.run import evaluate_classifier, finetune_classifier, resume_path, train_classifier
from tests.builders import write_sentiment_jsonl

FAST = dict(batch_size=16, lr=5e-3, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return write_sentiment_jsonl(tmp_path / "train.jsonl", 160), write_sentiment_jsonl(tmp_path / "dev.jsonl", 40, 1)


def test_train_factorize_finetune_evaluate(tmp_path: Path, data) -> None:
    train, dev = data
    report = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                              config=TrainConfig(epochs=8, **FAST))
    assert report.dev_after >= 0.75 and report.dev_after > report.dev_before + 0.15
    clf = load_classifier(report.output)
    assert clf.labels.labels == ["neg", "pos"] and len(clf.history) == 8
    small = factorize(report.output, rank=2).output
    ft = finetune_classifier(small, train, dev, tmp_path / "ft.safetensors", config=TrainConfig(epochs=2, **FAST))
    assert ft.factorized and ft.dev_before is not None and ft.dev_after >= ft.dev_before
    tuned = load_classifier(ft.output)
    assert isinstance(tuned.model.embedding, FactorizedEmbedding) and tuned.model.embedding.rank == 2
    assert tuned.factorization is not None  # the factorize record travels with the fine-tuned file
    assert [h["phase"] for h in tuned.history] == ["train"] * 8 + ["finetune"] * 2
    ev = evaluate_classifier(ft.output, dev, device="cpu")
    assert ev.result.accuracy == pytest.approx(ft.dev_after)
    assert not resume_path(Path(ft.output)).exists()


def test_same_seed_same_model(tmp_path: Path, data) -> None:
    train, dev = data
    outs = [train_classifier(train, dev, tmp_path / f"m{i}.safetensors", embed_dim=8,
                             config=TrainConfig(epochs=2, seed=3, **FAST)).output for i in range(2)]
    a, b = (load_classifier(o).model.state_dict() for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_interruption_keeps_finished_epochs(tmp_path: Path, data) -> None:
    train, dev = data
    out = tmp_path / "m.safetensors"
    config = TrainConfig(epochs=3, **FAST)

    class Stop(Exception):
        pass

    def interrupt(rec):
        if rec.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_classifier(train, dev, out, embed_dim=8, config=config, on_epoch=interrupt)
    assert resume_path(out).exists() and not out.exists()
    resumed = train_classifier(train, dev, out, embed_dim=8, config=config, resume=True)
    assert resumed.resumed_from_epoch == 2
    straight = train_classifier(train, dev, tmp_path / "s.safetensors", embed_dim=8, config=config)
    a, b = load_classifier(out).model.state_dict(), load_classifier(straight.output).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not resume_path(out).exists()


def test_errors(tmp_path: Path, data) -> None:
    train, dev = data
    with pytest.raises(InputError, match="no saved state"):
        train_classifier(train, dev, tmp_path / "x.safetensors", config=TrainConfig(epochs=1, **FAST), resume=True)
    out = tmp_path / "m.safetensors"
    train_classifier(train, None, out, embed_dim=4, config=TrainConfig(epochs=1, **FAST))
    with pytest.raises(OutputError, match="already exists"):
        train_classifier(train, None, out, config=TrainConfig(epochs=1, **FAST))
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "good", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"unseen.jsonl:2"):
        evaluate_classifier(out, unseen, device="cpu")


def test_finetune_keeps_the_starting_model_when_no_epoch_beats_it(tmp_path: Path, data) -> None:
    train, dev = data
    report = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                              config=TrainConfig(epochs=8, **FAST))
    # a rate this high wrecks the model in one epoch: the start must win on dev and be written unchanged
    ft = finetune_classifier(report.output, train, dev, tmp_path / "ft.safetensors",
                             config=TrainConfig(epochs=1, batch_size=16, lr=50.0, optimizer="sgd", device="cpu"))
    assert ft.history[0]["dev_accuracy"] < ft.dev_before
    assert ft.best_epoch == 0 and ft.dev_after == ft.dev_before
    before, after = load_classifier(report.output).model.state_dict(), load_classifier(ft.output).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _agreement(a: Path | str, b: Path | str, data: Path) -> float:
    pa = evaluate_classifier(a, data, device="cpu").result.predictions
    pb = evaluate_classifier(b, data, device="cpu").result.predictions
    return sum(x == y for x, y in zip(pa, pb)) / len(pa)


def test_finetune_with_a_teacher_learns_its_predictions_with_or_without_labels(tmp_path: Path, data) -> None:
    train, dev = data
    teacher = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                               config=TrainConfig(epochs=8, **FAST)).output
    small = factorize(teacher, rank=1).output
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(json.loads(line)["text"] + "\n" for line in train.read_text().splitlines()))
    before = _agreement(small, teacher, train)
    mixed = finetune_classifier(small, train, dev, tmp_path / "mixed.safetensors", teacher=teacher,
                                config=TrainConfig(epochs=6, **FAST))
    free = finetune_classifier(small, texts, None, tmp_path / "free.safetensors", teacher=teacher,
                               config=TrainConfig(epochs=6, **FAST))
    assert mixed.options["label_weight"] == 0.5 and mixed.options["teacher"] == str(teacher)
    assert free.options["label_weight"] == 0.0 and free.options["temperature"] == 2.0
    assert mixed.dev_after >= mixed.dev_before
    # trained on the teacher's predictions alone, the model agrees with it more than before
    assert _agreement(free.output, teacher, train) > before + 0.05
    assert isinstance(load_classifier(free.output).model.embedding, FactorizedEmbedding)


def test_finetune_teacher_refusals_write_nothing(tmp_path: Path, data) -> None:
    train, dev = data
    teacher = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=8,
                               config=TrainConfig(epochs=1, **FAST)).output
    other = write_sentiment_jsonl(tmp_path / "other.jsonl", 40)
    other.write_text(other.read_text().replace('"pos"', '"positive"'))
    stranger = train_classifier(other, None, tmp_path / "o.safetensors", embed_dim=8,
                                config=TrainConfig(epochs=1, **FAST)).output
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\nbad film\n")
    out = tmp_path / "ft.safetensors"
    cases = [
        (dict(teacher=stranger), train, "differ from the model's"),
        (dict(teacher=teacher, label_weight=0.5), texts, "plain texts carry no labels"),
        (dict(teacher=teacher, label_weight=1.5), train, "label weight must be in"),
        (dict(teacher=teacher, temperature=0.0), train, "temperature must be positive"),
        (dict(teacher=teacher, reassign_codes=True), train, r"a table that stores codes \(pq\); this model"),
    ]
    for kwargs, data_path, message in cases:
        with pytest.raises(InputError, match=message):
            finetune_classifier(teacher, data_path, None, out, config=TrainConfig(epochs=1, **FAST), **kwargs)
        assert not out.exists() and not resume_path(out).exists()


def _codes(path: Path | str) -> dict[str, torch.Tensor]:
    table = load_classifier(path).model.embedding
    assert isinstance(table, PQTable)
    return table.tensors()


def test_finetune_reassigns_pq_codes_in_the_same_bytes(tmp_path: Path, data) -> None:
    train, dev = data
    teacher = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                               config=TrainConfig(epochs=8, **FAST)).output
    small = compress(teacher, "pq", options={"subvector": 4, "centroids": 8}, output=tmp_path / "pq.safetensors")
    before = _codes(small.output)
    plain = finetune_classifier(small.output, train, None, tmp_path / "ft.safetensors", teacher=teacher,
                                config=TrainConfig(epochs=3, **FAST))
    moved = finetune_classifier(small.output, train, None, tmp_path / "rc.safetensors", teacher=teacher,
                                reassign_codes=True, config=TrainConfig(epochs=3, **FAST))
    assert moved.options["reassign_codes"] is True and "reassign_codes" not in plain.options
    assert torch.equal(_codes(plain.output)["codes"], before["codes"])  # without it the codes stay
    after = _codes(moved.output)
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    assert not torch.equal(after["codes"], before["codes"])
    assert load_classifier(moved.output).model.embedding.info()["codes_trained"] is True
    assert _agreement(moved.output, teacher, train) >= 0.9
    # labels only: from the decoded table, whose rows sit on their centroids until training carries them off
    alone = finetune_classifier(small.output, train, None, tmp_path / "alone.safetensors", reassign_codes=True,
                                config=TrainConfig(epochs=3, **{**FAST, "lr": 0.1}))
    assert "teacher" not in alone.options
    assert not torch.equal(_codes(alone.output)["codes"], before["codes"])


def test_finetune_reassigning_codes_keeps_the_given_table_when_the_start_wins(tmp_path: Path, data) -> None:
    train, dev = data
    teacher = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                               config=TrainConfig(epochs=8, **FAST)).output
    small = compress(teacher, "pq", options={"subvector": 4, "centroids": 8}, output=tmp_path / "pq.safetensors")
    ft = finetune_classifier(small.output, train, dev, tmp_path / "rc.safetensors", teacher=teacher,
                             reassign_codes=True,
                             config=TrainConfig(epochs=1, batch_size=16, lr=50.0, optimizer="sgd", device="cpu"))
    assert ft.best_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(_codes(small.output).values(), _codes(ft.output).values()))


def test_finetune_reassigning_codes_resumes_and_a_resume_must_ask_for_it_again(tmp_path: Path, data) -> None:
    train, dev = data
    teacher = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                               config=TrainConfig(epochs=4, **FAST)).output
    small = compress(teacher, "pq", options={"subvector": 4, "centroids": 8}, output=tmp_path / "pq.safetensors")
    out, config = tmp_path / "rc.safetensors", TrainConfig(epochs=2, **FAST)

    class Stop(Exception):
        pass

    def interrupt(rec):
        raise Stop

    with pytest.raises(Stop):
        finetune_classifier(small.output, train, dev, out, teacher=teacher, reassign_codes=True, config=config,
                            on_epoch=interrupt)
    assert resume_path(out).exists() and not out.exists()
    with pytest.raises(InputError, match="codes_trained"):
        finetune_classifier(small.output, train, dev, out, teacher=teacher, config=config, resume=True)
    assert resume_path(out).exists() and not out.exists()
    resumed = finetune_classifier(small.output, train, dev, out, teacher=teacher, reassign_codes=True, config=config,
                                  resume=True)
    assert resumed.resumed_from_epoch == 1 and isinstance(load_classifier(out).model.embedding, PQTable)
    assert not resume_path(out).exists()
