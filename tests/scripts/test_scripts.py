"""Smoke tests of scripts/plot_schedules.py and scripts/sst2_recovery.py, run as a user would (subprocesses).

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
