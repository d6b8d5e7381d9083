"""``compress --method auto`` in the library: the choice over a sweep's rows, and the file it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from embcompress import core, hf, sweep  # noqa: E402
from embcompress.compare import compare_model  # noqa: E402
from embcompress.errors import InputError  # noqa: E402
from embcompress.ops.plan import choose, compress_auto  # noqa: E402
from tests.test_hf import TEXTS, tiny_bert  # noqa: E402


def _result(rows: list[sweep.Row]) -> sweep.SweepResult:
    base = sweep.Row(sweep.UNCOMPRESSED, None, 1000, 2000, 1.0)
    result = sweep.SweepResult("m", "t", sweep.ENCODER, "mean cosine to the original", 1000, [base, *rows])
    sweep.mark_front(result.rows)
    return result


def test_choice_is_best_within_budget_or_smallest_reaching_the_floor() -> None:
    rows = [sweep.Row("a", 0.1, 100, 1100, 0.90, 0.01), sweep.Row("b", 0.1, 95, 1095, 0.97, 0.002),
            sweep.Row("c", 0.1, 60, 1060, 0.95, 0.003), sweep.Row("d", 0.1, None, None, None, fits=False),
            sweep.Row("e", 0.2, 150, 1150, 0.999)]
    result = _result(rows)
    best = choose(result, 100)
    assert best.row.method == "b" and best.row.pareto and best.runner_up.method == "c"
    assert "next c 0.9500, 0.0200 lower" in best.why and "standard errors" in best.why
    small = choose(result, 100, min_quality=0.94)
    assert small.row.method == "c" and "smallest" in small.why
    with pytest.raises(InputError, match="reaches --min-quality 0.99; the best is b"):
        choose(result, 100, min_quality=0.99)
    with pytest.raises(InputError, match="no method fits"):
        choose(result, 10)
    for q in (0.0, 1.5, -1):
        with pytest.raises(InputError, match="--min-quality"):
            choose(result, 100, min_quality=q)


def test_auto_writes_the_measured_choice(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    bert = tiny_bert(tmp_path / "bert")
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    res = compress_auto(bert, budget="0.3", data=texts, methods="svd,svd+int8,lowbit", output=tmp_path / "out")
    row = res.choice.row
    assert row.pareto and row.table_bytes <= res.sweep.settings["budget_bytes"]["0.3"]
    assert all(row.quality >= r.quality for r in res.sweep.rows if r.fits and r.method != sweep.UNCOMPRESSED)
    assert res.written.method == row.method and res.written.table_bytes_after == row.table_bytes
    model, ref = hf.load(tmp_path / "out", task="base"), hf.load(bert, task="base")
    tok = hf.load_tokenizer(bert)
    sim = hf.cosine_report(hf.embed(model, tok, TEXTS * 3), hf.embed(ref, tok, TEXTS * 3), TEXTS * 3)
    assert sim.mean == pytest.approx(row.quality, abs=1e-5)  # the file holds what was measured
    assert (tmp_path / sweep.CACHE_NAME).is_dir()


def test_auto_after_compare_reuses_its_rows_and_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compare then auto on the same model, texts, counts and methods: auto reads every row and the chosen tables
    from compare's cache (nothing is encoded), and writes what compare measured; a damaged entry is measured
    again."""
    torch.set_num_threads(1)
    bert = tiny_bert(tmp_path / "bert")
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    methods = "svd,svd+int8,lowbit,tiered"
    measured = compare_model(bert, texts, budgets=["0.3"], methods=methods, train=texts, latency=False,
                             output=tmp_path / "cmp")
    kept = measured.settings["row_cache"]["written"]
    assert kept == len(measured.rows) and measured.settings["row_cache"]["read"] == 0
    encodes = []
    real = core.encode_table
    monkeypatch.setattr(core, "encode_table", lambda *a, **k: encodes.append(a[1].name) or real(*a, **k))
    res = compress_auto(bert, budget="0.3", data=texts, corpus=texts, methods=methods, output=tmp_path / "out")
    assert encodes == [] and res.settings["tables_from_cache"] and res.settings["rows_from_cache"] == kept
    assert res.sweep.settings["row_cache"]["written"] == 0 and all(r.cached for r in res.sweep.rows)
    row = res.choice.row
    assert row.quality == next(r.quality for r in measured.rows if r.method == row.method)
    model, ref = hf.load(tmp_path / "out", task="base"), hf.load(bert, task="base")
    tok = hf.load_tokenizer(bert)
    sim = hf.cosine_report(hf.embed(model, tok, TEXTS * 3), hf.embed(ref, tok, TEXTS * 3), TEXTS * 3)
    assert sim.mean == pytest.approx(row.quality, abs=1e-5)  # the file holds what compare measured
    entry = tmp_path / sweep.CACHE_NAME / sweep.ROWS_FOLDER / f"{row.cache_key}.safetensors"
    entry.write_bytes(b"not a safetensors file")
    again = compress_auto(bert, budget="0.3", data=texts, corpus=texts, methods=methods, output=tmp_path / "out",
                          force=True)
    assert encodes == [row.method] * len(res.sweep.settings["tables"])  # the damaged row, and only it
    assert again.sweep.settings["row_cache"]["damaged"] == 1 and again.sweep.settings["row_cache"]["written"] == 1
    assert again.choice.row.method == row.method and again.choice.row.quality == pytest.approx(row.quality, abs=1e-6)


def test_auto_refuses_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--data"):
        compress_auto(tmp_path, budget="0.1", data=None)
    with pytest.raises(InputError, match="--min-quality"):
        compress_auto(tmp_path, budget="0.1", data=tmp_path / "t.txt", min_quality=2.0)
    with pytest.raises(InputError, match="in \\(0, 1\\)"):
        compress_auto(tmp_path, budget="1.5", data=tmp_path / "t.txt")
    assert list(tmp_path.iterdir()) == []
