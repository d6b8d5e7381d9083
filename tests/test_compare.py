from pathlib import Path

import pytest
import torch

from embcompress.checkpoint import load_checkpoint
from embcompress.compare import compare, compare_model, parse_baselines, parse_reductions
from embcompress import sweep
from embcompress.errors import InputError
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
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 40, 1)
    model = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                             config=TrainConfig(epochs=2, batch_size=16, device="cpu")).output
    return Path(model), train, dev


def test_all_rows_measured(setup, tmp_path: Path) -> None:
    model, train, dev = setup
    result = compare(model, data=dev, train=train, dev=dev, reductions=[0.5], finetune_epochs=1, repeats=2,
                     threads=1, device="cpu")
    methods = [r.method for r in result.rows]
    assert methods == ["uncompressed", "fair", "quant16", "quant8", "svd", "proposed", "proposed+int8", "offline"]
    by = {r.method: r for r in result.rows}
    assert by["quant8"].size_bytes < by["quant16"].size_bytes < by["uncompressed"].size_bytes
    assert by["svd"].size_bytes < by["uncompressed"].size_bytes
    assert by["proposed+int8"].size_bytes < by["proposed"].size_bytes
    assert by["uncompressed"].relative_change == 0.0
    for row in result.rows:
        assert 0.0 <= row.accuracy <= 1.0
        assert row.latency_ms[1] > 0 and row.latency_ms[64] > 0 and Path(row.onnx).exists()
    assert by["fair"].recovered and "trained 2 + 1 epochs" in by["fair"].note
    assert by["svd"].table_bytes < by["uncompressed"].table_bytes and by["svd"].budget < 1


def test_reuse_skips_training_and_needs_train_otherwise(setup, tmp_path: Path) -> None:
    model, train, dev = setup
    with pytest.raises(InputError, match="needs --train"):
        compare(model, data=dev, baselines=["svd"], reductions=[0.5], latency=False, device="cpu")
    result = compare(model, data=dev, baselines=["svd"], reductions=[0.5], reuse={0.5: model}, latency=False,
                     device="cpu")
    assert result.rows[-1].note == "reused from the workspace record"


def test_parsers() -> None:
    assert parse_baselines("quant8, offline") == ["quant8", "offline"]
    with pytest.raises(InputError, match="unknown"):
        parse_baselines("quant4")
    assert parse_reductions("0.5,0.9") == [0.5, 0.9]
    with pytest.raises(InputError):
        parse_reductions("1.0")


def test_finetune_rate_is_used_and_checked(setup) -> None:
    model, train, dev = setup
    result = compare(model, data=dev, train=train, dev=dev, baselines=["svd"], reductions=[0.5], finetune_epochs=1,
                     finetune_lr=1e-3, latency=False, device="cpu")
    assert result.settings["finetune_lr"] == 1e-3
    assert "peak lr 0.001" in result.rows[-1].note
    with pytest.raises(InputError, match="positive rate"):
        compare(model, data=dev, train=train, dev=dev, baselines=["svd"], reductions=[0.5], finetune_lr=-1.0,
                latency=False, device="cpu", work_dir=model.parent / "refused")
    assert not (model.parent / "refused").exists()


def test_lstm_rows_are_timed(tmp_path: Path) -> None:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 80)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 20, 1)
    model = train_classifier(train, dev, tmp_path / "lstm.safetensors", arch="lstm", embed_dim=8, hidden_dim=8,
                             config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output
    result = compare(model, data=dev, train=train, dev=dev, baselines=["quant8"], reductions=[0.5],
                     finetune_epochs=1, repeats=1, threads=1, device="cpu")
    assert [r.method for r in result.rows] == ["uncompressed", "quant8", "proposed"]
    assert all(r.latency_ms[1] > 0 and r.latency_ms[64] > 0 for r in result.rows)


def test_groupreduce_row_is_asked_for_by_name(setup) -> None:
    model, train, dev = setup
    assert "groupreduce" not in parse_baselines(None)
    result = compare(model, data=dev, train=train, dev=dev, baselines=["groupreduce"], reductions=[0.5],
                     finetune_epochs=1, repeats=2, threads=1, device="cpu")
    row = result.rows[-1]
    assert row.method == "groupreduce" and "blocks, ranks" in row.note
    assert row.latency_ms[1] > 0 and Path(row.onnx).exists()
    proposed = next(r for r in result.rows if r.method == "proposed")
    with load_checkpoint(row.checkpoint) as ours, load_checkpoint(proposed.checkpoint) as plain:
        assert ours.total_bytes <= plain.total_bytes  # the same budget, the groups map included


def test_compare_model_joins_sweep_and_protocol_rows(setup, tmp_path: Path) -> None:
    model, train, dev = setup
    out = tmp_path / "cmp"
    result = compare_model(model, dev, budgets=["0.3"], methods="svd,svd+int8", train=train, dev=dev,
                           baselines=["svd", "fair"], reductions=[0.5], finetune_epochs=1, latency=False, output=out,
                           device="cpu")
    methods = [r.method for r in result.rows]
    assert methods[:3] == ["uncompressed", "svd", "svd+int8"] and {"fair", "proposed"} <= set(methods)
    assert methods.count("uncompressed") == 1 and any(r.pareto for r in result.rows)
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png", "compare.log"):
        assert (out / name).is_file()
    assert "[1/2] svd at 0.3" in (out / "compare.log").read_text()
    doc = (out / "compare.json").read_text()
    assert '"fair"' in doc and '"pareto": true' in doc
    with pytest.raises(Exception, match="already exists"):
        compare_model(model, dev, budgets=["0.3"], methods="svd", output=out, latency=False)
    assert sweep.to_csv(result).count("\n") == len(result.rows) + 1
