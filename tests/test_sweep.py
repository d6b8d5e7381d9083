"""The budget sweep (embcompress.sweep) on a tiny random BERT and a tiny DAN: every registered method, rows that
cannot fit, the cache of the original's embeddings, the probe, the front, and refused inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from embcompress import core, sweep  # noqa: E402
from embcompress.errors import DataError, InputError  # noqa: E402
from embcompress.methods import registered  # noqa: E402
from tests.builders import write_sentiment_jsonl  # noqa: E402
from tests.test_hf import TEXTS, tiny_bert  # noqa: E402

FAST = "svd,int8,svd+int8,lowbit"


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    return tiny_bert(tmp_path / "bert")


def _texts(path: Path, labels: list | None = None, n: int = 28) -> Path:
    lines = [TEXTS[i % len(TEXTS)] + f" w{i}" for i in range(n)]
    if labels is None:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text": t, "label": labels[i % len(labels)]}) + "\n"
                                for i, t in enumerate(lines)), encoding="utf-8")
    return path


def test_every_registered_method_is_a_row_and_the_front_holds(bert: Path, tmp_path: Path) -> None:
    result = sweep.sweep(bert, _texts(tmp_path / "t.txt"), budgets=["0.3"], cache_dir=tmp_path / "c")
    names = sweep.candidates()
    for m in registered():
        assert m.name in names
    assert len(result.rows) == 1 + len(names)
    assert result.rows[0].method == sweep.UNCOMPRESSED and result.rows[0].quality == pytest.approx(1.0)
    measured = [r for r in result.rows[1:] if r.fits]
    assert measured and any(not r.fits for r in result.rows)  # fp16 alone cannot reach 0.3 of float32
    for r in measured:
        assert r.table_bytes <= r.budget_bytes < result.float32_bytes
        assert r.file_bytes < result.rows[0].file_bytes
        assert -1 <= r.cosine["worst"] <= r.cosine["p05"] <= r.quality <= 1 + 1e-9
    for r in result.rows:
        if not r.fits:
            assert r.note.startswith(("cannot fit", "over the budget")) and not r.pareto
    front = result.front()
    for r in front:  # nothing measured is both smaller and better
        assert not any(o.table_bytes < r.table_bytes and o.quality > r.quality for o in measured)
    off = [r for r in measured if not r.pareto]
    for r in off:
        assert any(o.table_bytes <= r.table_bytes and o.quality >= r.quality for o in front)


def test_cache_is_reused_and_keyed_by_the_texts(bert: Path, tmp_path: Path) -> None:
    texts = _texts(tmp_path / "t.txt")
    first = sweep.sweep(bert, texts, budgets=["0.2"], methods="int8", cache_dir=tmp_path / "c")
    again = sweep.sweep(bert, texts, budgets=["0.2"], methods="int8", cache_dir=tmp_path / "c")
    assert not first.settings["cache_hit"] and again.settings["cache_hit"]
    assert again.rows[1].quality == pytest.approx(first.rows[1].quality, abs=1e-12)
    other = sweep.sweep(bert, _texts(tmp_path / "u.txt", n=20), budgets=["0.2"], methods="int8",
                        cache_dir=tmp_path / "c")
    assert not other.settings["cache_hit"] and len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    # the rows measured are kept (the original's at least; a budget int8 cannot size is no entry), then read back,
    # then measured again for other texts
    kept = sum(r.cache_key is not None for r in first.rows)
    assert kept >= 1 and first.settings["row_cache"]["written"] == kept and first.settings["row_cache"]["read"] == 0
    assert again.settings["row_cache"] == {**first.settings["row_cache"], "read": kept, "written": 0}
    assert other.settings["row_cache"]["read"] == 0 and not any(r.cached for r in other.rows)


def test_cached_rows_equal_measured_ones_and_a_damaged_entry_is_measured_again(bert: Path, tmp_path: Path) -> None:
    texts, cache = _texts(tmp_path / "t.txt"), tmp_path / "c"
    first = sweep.sweep(bert, texts, budgets=["0.3", "0.1"], methods="svd,lowbit,fp16", cache_dir=cache)
    again = sweep.sweep(bert, texts, budgets=["0.3", "0.1"], methods="svd,lowbit,fp16", cache_dir=cache)
    kept = [r.cache_key is not None for r in first.rows]  # fp16 cannot be sized to 0.3: refused again, not kept
    assert not all(kept) and sum(kept) >= 5 and not any(r.cached for r in first.rows)
    assert [r.cached for r in again.rows] == kept
    assert again.settings["row_cache"]["read"] == sum(kept) and again.settings["row_cache"]["written"] == 0
    figures = ("method", "fits", "table_bytes", "file_bytes", "quality", "cosine", "options", "note", "pareto")
    assert [[getattr(r, k) for k in figures] for r in again.rows] == [[getattr(r, k) for k in figures]
                                                                      for r in first.rows]
    svd = next(r for r in first.rows if r.method == "svd" and r.budget == pytest.approx(0.3))
    tables = sweep.cached_tables(again, next(r for r in again.rows if r.cache_key == svd.cache_key))
    assert tables and sum(core.table_entry(t)["bytes"] for t in tables.values()) == svd.table_bytes
    entry = cache / sweep.ROWS_FOLDER / f"{svd.cache_key}.safetensors"
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a torn write
    third = sweep.sweep(bert, texts, budgets=["0.3", "0.1"], methods="svd,lowbit,fp16", cache_dir=cache)
    assert third.settings["row_cache"]["damaged"] == 1 and third.settings["row_cache"]["written"] == 1
    redone = next(r for r in third.rows if r.cache_key == svd.cache_key)
    assert not redone.cached and redone.quality == pytest.approx(svd.quality, abs=1e-6)
    fourth = sweep.sweep(bert, texts, budgets=["0.3", "0.1"], methods="svd,lowbit,fp16", cache_dir=cache)
    assert fourth.settings["row_cache"]["read"] == sum(kept) and fourth.settings["row_cache"]["damaged"] == 0


def test_probe_on_labelled_texts_and_mixed_labels_refused(bert: Path, tmp_path: Path) -> None:
    result = sweep.sweep(bert, _texts(tmp_path / "t.jsonl", ["neg", "pos"]), budgets=["0.3"], methods="svd")
    assert 0 <= result.rows[0].probe <= 1 and 0 <= result.rows[1].probe <= 1
    with pytest.raises(DataError, match="mixed"):
        sweep.sweep(bert, _texts(tmp_path / "m.jsonl", [0, "pos"]), budgets=["0.3"], methods="svd")


def test_probe_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    labels = ["a" if v > 0 else "b" for v in x[:, 0]]
    assert sweep.probe_accuracy(x, labels) > 0.95
    assert sweep.probe_accuracy(torch.randn(200, 5, generator=g), labels) < 0.75


@pytest.mark.parametrize("budgets, match", [(["1.5"], "in \\(0, 1\\)"), (["0"], "positive|in \\(0, 1\\)"),
                                            (["10GB"], "at or above")])
def test_bad_budgets_refused_before_anything_is_written(bert: Path, tmp_path: Path, budgets: list[str],
                                                        match: str) -> None:
    with pytest.raises(InputError, match=match):
        sweep.sweep(bert, _texts(tmp_path / "t.txt"), budgets=budgets, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_unknown_method_and_empty_texts_refused(bert: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown method 'nope'"):
        sweep.sweep(bert, _texts(tmp_path / "t.txt"), methods="svd,nope")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no texts"):
        sweep.sweep(bert, tmp_path / "empty.txt", methods="svd")
    with pytest.raises(DataError, match="no such file"):
        sweep.sweep(bert, tmp_path / "missing.txt", methods="svd")


def test_recovery_rows_stay_in_budget(bert: Path, tmp_path: Path) -> None:
    result = sweep.sweep(bert, _texts(tmp_path / "t.txt"), budgets=["0.2"], methods="svd+int8", recover=3,
                         cache_dir=tmp_path / "c")
    plain, rec = result.rows[1], result.rows[2]
    assert not plain.recovered and rec.recovered and rec.table_bytes == plain.table_bytes
    assert rec.quality is not None and "distillation" in rec.note
    again = sweep.sweep(bert, _texts(tmp_path / "t.txt"), budgets=["0.2"], methods="svd+int8", recover=3,
                        cache_dir=tmp_path / "c")  # recovery starts from the tables read back from the cache
    assert again.rows[1].cached and not again.rows[2].cached
    assert again.rows[2].quality == pytest.approx(rec.quality, abs=1e-5)


def test_classifier_rows_score_accuracy(tmp_path: Path) -> None:
    from embcompress.train.loop import TrainConfig
    from embcompress.train.run import train_classifier

    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 120)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 40, 1)
    model = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16,
                             config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output
    result = sweep.sweep(model, dev, budgets=["0.3"], methods=FAST + ",groupreduce", recover=2, train=train, dev=dev)
    assert result.family == sweep.CLASSIFIER
    rows = [r for r in result.rows if r.fits]
    assert {r.method for r in rows} >= {"uncompressed", "svd", "svd+int8", "groupreduce"}
    assert all(0 <= r.accuracy <= 1 and r.quality == r.accuracy for r in rows)
    assert any(r.recovered for r in rows)
    with pytest.raises(InputError, match="--train"):
        sweep.sweep(model, dev, budgets=["0.3"], methods="svd", recover=2)
    first = sweep.sweep(model, dev, budgets=["0.3"], methods="svd,groupreduce", train=train, cache_dir=tmp_path / "c")
    again = sweep.sweep(model, dev, budgets=["0.3"], methods="svd,groupreduce", train=train, cache_dir=tmp_path / "c")
    assert all(r.cached for r in again.rows) and not any(r.cached for r in first.rows)
    assert [r.accuracy for r in again.rows] == [r.accuracy for r in first.rows]
    tables = sweep.cached_tables(again, again.rows[2])
    assert tables is not None and list(tables) == ["embedding.weight"]


def test_the_front_is_timed_in_onnxruntime_for_both_families(bert: Path, tmp_path: Path) -> None:
    """Each front row is written as its family writes it and exported through its family's graph."""
    pytest.importorskip("onnxruntime")
    from embcompress.train.loop import TrainConfig
    from embcompress.train.run import train_classifier

    encoder = sweep.sweep(bert, _texts(tmp_path / "t.txt"), budgets=["0.3"], methods="lowbit", latency=True,
                          threads=1, cache_dir=tmp_path / "c")
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 60)
    model = train_classifier(train, None, tmp_path / "m.safetensors", embed_dim=8,
                             config=TrainConfig(epochs=1, batch_size=16, device="cpu")).output
    classifier = sweep.sweep(model, train, budgets=["0.3"], methods="svd", latency=True, threads=1,
                             cache_dir=tmp_path / "d")
    for result in (encoder, classifier):
        front = [r for r in result.rows if r.pareto]
        assert front and all(r.latency_ms.get(1, 0) > 0 for r in front)
    # factors fold when onnxruntime loads the graph, so they are timed a second time, decoded at load; lowbit's
    # GatherBlockQuantized never folds, and the original has nothing to decode
    assert not any(r.latency_decoded_ms for r in encoder.rows)
    for r in classifier.rows:
        if r.pareto:
            assert (r.latency_decoded_ms.get(1, 0) > 0) == (r.method == "svd")
    assert any(r.pareto and r.method == "svd" for r in classifier.rows)
    assert "decoded at load" in sweep.to_markdown(classifier) and "decoded at load" not in sweep.to_markdown(encoder)
    assert "latency_decoded_ms_b1" in sweep.to_csv(classifier).splitlines()[0]
