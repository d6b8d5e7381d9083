"""SST-2: CALR vs CLR vs Adagrad (the paper's Table 1) and recovery of a factorized model at R = 90 %.

Reproduces, through the library API (``train_classifier``, ``factorize``, ``finetune_classifier``,
``evaluate_classifier``; no subprocesses), the figures of Acharya et al., "Online Embedding Compression for Text
Classification using Low Rank Matrix Factorization" (AAAI 2019) on the sentence-level SST-2 in ``../shared/data``:

1. DAN-RAND (random 300-d embeddings) and LSTM (embeddings initialised from 50-d GloVe; the paper used 300-d) are
   trained with Adam + CALR, Adam + CLR and Adagrad (constant rate) for the same number of epochs; the test
   accuracy of the best-on-dev epoch is set beside the paper's Table 1.
2. Each Adam + CALR model is factorized at R = 90 % (``factorize``), evaluated as it is, then fine-tuned "online"
   with CALR (``finetune_classifier``). Its test accuracy is compared with the uncompressed model it came from
   (``train_epochs``) and, for a fair budget, with an uncompressed model trained for ``train_epochs +
   finetune_epochs`` epochs, early-stopped on dev like every run here. On the CPU the first ``train_epochs`` epochs
   of that longer run are bit for bit those of the shorter run (``fit`` seeds every epoch from the seed and the
   epoch number, and CALR is a function of the iteration), so it is the same run, continued.
3. On the first seed, a few other fine-tuning settings (rate, schedule) of the same factorized models.

Everything is repeated over several seeds (mean and sample standard deviation reported). The script writes
``recovery.json`` (every number, hyperparameter, wall time, the machine) and then ``recovery.md`` rendered from
that JSON as re-read from disk, plus ``schedules.png`` (``plot_schedules.py``) and ``recovery_curves.png``.

    .venv/bin/python scripts/sst2_recovery.py                      # full run (~15 min on one core), docs/results
    .venv/bin/python scripts/sst2_recovery.py --quick --out-dir /tmp/q   # tiny smoke run, well under a minute

Runs on one thread (``torch.set_num_threads(1)``) and on the CPU, so that one core of a two-core machine stays
free. Model files live in a temporary folder and are deleted at the end; the data is read in place from
``../shared/data`` (relative to the repository root; ``--quick`` writes small subsets to the temporary folder).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import embcompress  # noqa: E402
from embcompress.factorize import factorize  # noqa: E402
from embcompress.rank import choose_rank  # noqa: E402
from embcompress.train.loop import TrainConfig  # noqa: E402
from embcompress.train.run import (  # noqa: E402
    FINETUNE_DEFAULTS,
    evaluate_classifier,
    finetune_classifier,
    train_classifier,
)

DATA = ROOT.parent / "shared" / "data"
SST2 = DATA / "sst2"
GLOVE = DATA / "glove" / "glove.6B.50d.sst2.txt"
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_IMG = ROOT / "docs" / "img"

# The paper's figures (test accuracy in %), as published; phrase-level SST-2 training most likely (see notes).
PAPER: dict[str, Any] = {
    "reference": "Acharya, Goel, Metallinou, Dhillon: Online Embedding Compression for Text Classification "
    "using Low Rank Matrix Factorization, AAAI 2019",
    "table1_test_accuracy_percent": {
        "dan_rand": {"calr": 84.61, "clr": 83.84, "adagrad": 83.20},
        "lstm": {"calr": 86.03, "clr": 84.71, "adagrad": 84.90},
    },
    "r90_relative_loss_percent": {"dan_rand": 1.7, "lstm": 1.1},
    "embed_dim": {"dan_rand": 300, "lstm": 300},
}

# Settings chosen by short runs on SST-2 dev (seed 0) before this script was written; see recovery.md.
FULL: dict[str, Any] = {
    "seeds": [0, 1, 2],
    "reduction": 0.9,
    "target_relative_loss": 0.01,
    "library_finetune_defaults": {"epochs": FINETUNE_DEFAULTS["epochs"], "lr": FINETUNE_DEFAULTS["lr"],
                                  "schedule": TrainConfig().schedule},
    "subset": None,
    "batch_size": 64,
    "weight_decay": 1e-5,
    "models": {
        "dan_rand": {
            "label": "DAN-RAND", "arch": "dan", "embed_dim": 300, "hidden_dim": None, "init_vectors": None,
            "dropout": 0.4, "min_count": 1,
            "train_epochs": 8, "adam_lr": 1e-2, "adagrad_lr": 5e-2, "finetune_epochs": 3, "finetune_lr": 2e-3,
            "finetune_retuned": False,
            "sweep": [{"schedule": "calr", "lr": 1e-3}, {"schedule": "calr", "lr": 5e-3},
                      {"schedule": "clr", "lr": 2e-3}, {"schedule": "constant", "lr": 2e-3}],
        },
        "lstm": {
            "label": "LSTM", "arch": "lstm", "embed_dim": None, "hidden_dim": 150, "init_vectors": "glove",
            "dropout": 0.4, "min_count": 1,
            "train_epochs": 6, "adam_lr": 5e-3, "adagrad_lr": 5e-2, "finetune_epochs": 4, "finetune_lr": 5e-4,
            "finetune_retuned": True,
            "sweep": [{"schedule": "calr", "lr": 2e-3}, {"schedule": "calr", "lr": 1e-3},
                      {"schedule": "calr", "lr": 2e-4}, {"schedule": "constant", "lr": 1e-3}],
        },
    },
}

QUICK: dict[str, Any] = {
    **FULL,
    "seeds": [0],
    "subset": {"train": 400, "dev": 150, "test": 150, "seed": 0},
    "models": {name: {**cfg, "train_epochs": 1, "finetune_epochs": 1, "sweep": cfg["sweep"][:1]}
               for name, cfg in FULL["models"].items()},
}

METHODS = ("calr", "clr", "adagrad")
METHOD_LABELS = {"calr": "Adam + CALR", "clr": "Adam + CLR", "adagrad": "Adagrad (constant)"}


def log(msg: str) -> None:
    print(f"[sst2_recovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------- data


def data_files(settings: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """The SST-2 files to use: the shared ones, or (quick) seeded random subsets written to ``tmp``."""
    files = {split: SST2 / f"{split}.jsonl" for split in ("train", "dev", "test")}
    subset = settings["subset"]
    if not subset:
        return files
    rng = random.Random(subset["seed"])
    out = {}
    for split, path in files.items():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        picked = sorted(rng.sample(range(len(lines)), min(subset[split], len(lines))))
        out[split] = tmp / f"{split}.jsonl"
        out[split].write_text("\n".join(lines[i] for i in picked) + "\n", encoding="utf-8")
    return out


def count_lines(path: Path) -> int:
    return sum(1 for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())


# ------------------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "embcompress_version": embcompress.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "device": "cpu",
    }


# -------------------------------------------------------------------------------------------------------- runs


def train_config(settings: dict[str, Any], *, epochs: int, lr: float, optimizer: str, schedule: str,
                 seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=settings["batch_size"], lr=lr, optimizer=optimizer,
                       schedule=schedule, weight_decay=settings["weight_decay"], seed=seed, device="cpu")


def evaluate(path: Path, data: Path) -> dict[str, float]:
    r = evaluate_classifier(path, data, device="cpu").result
    return {"accuracy": r.accuracy, "macro_f1": r.macro_f1}


def run_record(kind: str, report: Any, config: TrainConfig, wall: float, test: dict[str, float],
               dev: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "kind": kind,
        "config": config.to_dict(),
        "best_epoch": report.best_epoch,
        "dev_before": report.dev_before,
        "dev_accuracy": report.dev_after if dev is None else dev["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "parameters": report.parameters,
        "factorized": report.factorized,
        "history": [{k: h[k] for k in ("epoch", "train_loss", "dev_accuracy", "lr_max", "seconds")}
                    for h in report.history],
        "fit_seconds": report.seconds,
        "wall_seconds": wall,
    }


def train_run(name: str, mcfg: dict[str, Any], settings: dict[str, Any], files: dict[str, Path], out: Path,
              kind: str, config: TrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"arch": mcfg["arch"], "dropout": mcfg["dropout"], "min_count": mcfg["min_count"]}
    if mcfg["embed_dim"]:
        kwargs["embed_dim"] = mcfg["embed_dim"]
    if mcfg["hidden_dim"]:
        kwargs["hidden_dim"] = mcfg["hidden_dim"]
    if mcfg["init_vectors"] == "glove":
        kwargs["init_vectors"] = GLOVE
    report = train_classifier(files["train"], files["dev"], out, config=config, force=True, **kwargs)
    test = evaluate(out, files["test"])
    wall = time.perf_counter() - t0
    rec = run_record(kind, report, config, wall, test)
    rec["vectors_found"] = report.options.get("vectors_found")
    log(f"{name} seed {config.seed} {kind}: best epoch {rec['best_epoch']}/{config.epochs}, "
        f"dev {rec['dev_accuracy']:.4f}, test {rec['test_accuracy']:.4f} ({wall:.0f} s)")
    return rec


def finetune_run(name: str, src: Path, files: dict[str, Path], out: Path, kind: str,
                 config: TrainConfig, teacher: Path | None = None, label_weight: float | None = None,
                 reassign_codes: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = finetune_classifier(src, files["train"], files["dev"], out, config=config, force=True, teacher=teacher,
                                 label_weight=label_weight, reassign_codes=reassign_codes)
    test = evaluate(out, files["test"])
    wall = time.perf_counter() - t0
    rec = run_record(kind, report, config, wall, test)
    log(f"{name} seed {config.seed} {kind}: dev {rec['dev_before']:.4f} -> {rec['dev_accuracy']:.4f} "
        f"(best epoch {rec['best_epoch']}/{config.epochs}), test {rec['test_accuracy']:.4f} ({wall:.0f} s)")
    return rec


def factorize_run(name: str, seed: int, src: Path, files: dict[str, Path], out: Path,
                  reduction: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = factorize(src, reduction=reduction, output=out, force=True)
    dev, test = evaluate(out, files["dev"]), evaluate(out, files["test"])
    wall = time.perf_counter() - t0
    table = result.tables[0]
    V, d = table.shape
    rec = {
        "kind": "factorized",
        "table": table.name,
        "shape": list(table.shape),
        "rank": table.rank,
        "reduction_requested": reduction,
        "table_reduction_achieved": table.reduction_achieved,
        "rel_error": table.rel_error,
        "energy_kept": table.energy_kept,
        "table_params_before": V * d,
        "table_params_after": table.rank * (V + d),
        "model_params_before": result.params_before,
        "model_params_after": result.params_after,
        "model_reduction_achieved": result.reduction_achieved,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "dev_accuracy": dev["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "factorize_seconds": result.seconds,
        "wall_seconds": wall,
    }
    log(f"{name} seed {seed} factorized R={reduction:g}: k={table.rank}, rel. error {table.rel_error:.3f}, "
        f"dev {dev['accuracy']:.4f}, test {test['accuracy']:.4f}")
    return rec


def run_model(name: str, settings: dict[str, Any], files: dict[str, Path], tmp: Path) -> dict[str, Any]:
    mcfg = settings["models"][name]
    E, F = mcfg["train_epochs"], mcfg["finetune_epochs"]
    seeds: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    for seed in settings["seeds"]:
        runs: dict[str, Any] = {}
        paths = {k: tmp / f"{name}.s{seed}.{k}.safetensors"
                 for k in ("calr", "clr", "adagrad", "calr_long", "r90", "r90_ft", "sweep")}
        adam = dict(lr=mcfg["adam_lr"], optimizer="adam", seed=seed)
        runs["calr"] = train_run(name, mcfg, settings, files, paths["calr"], "calr",
                                 train_config(settings, epochs=E, schedule="calr", **adam))
        runs["clr"] = train_run(name, mcfg, settings, files, paths["clr"], "clr",
                                train_config(settings, epochs=E, schedule="clr", **adam))
        runs["adagrad"] = train_run(name, mcfg, settings, files, paths["adagrad"], "adagrad",
                                    train_config(settings, epochs=E, lr=mcfg["adagrad_lr"], optimizer="adagrad",
                                                 schedule="constant", seed=seed))
        runs["calr_long"] = train_run(name, mcfg, settings, files, paths["calr_long"], "calr_long",
                                      train_config(settings, epochs=E + F, schedule="calr", **adam))
        short = [h["dev_accuracy"] for h in runs["calr"]["history"]]
        runs["calr_long"]["prefix_equals_calr_run"] = [
            h["dev_accuracy"] for h in runs["calr_long"]["history"][:E]] == short
        runs["factorized"] = factorize_run(name, seed, paths["calr"], files, paths["r90"], settings["reduction"])
        runs["finetuned"] = finetune_run(name, paths["r90"], files, paths["r90_ft"], "finetuned",
                                         train_config(settings, epochs=F, lr=mcfg["finetune_lr"], optimizer="adam",
                                                      schedule="calr", seed=seed))
        seeds[str(seed)] = runs
        for s in mcfg["sweep"]:
            cfg = train_config(settings, epochs=F, lr=s["lr"], optimizer="adam", schedule=s["schedule"], seed=seed)
            rec = finetune_run(name, paths["r90"], files, paths["sweep"], f"sweep {s['schedule']} {s['lr']:g}", cfg)
            sweep.append({"seed": seed, "schedule": s["schedule"], "lr": s["lr"], "epochs": F, **rec})
    return {"settings": mcfg, "seeds": seeds, "finetune_sweep": sweep}


# ------------------------------------------------------------------------------------------------------ summary


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def rel(x: float, ref: float) -> float:
    return (x - ref) / ref


def summarize(name: str, res: dict[str, Any], settings: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    seeds = list(res["seeds"].values())

    def acc(kind: str, key: str = "test_accuracy") -> list[float]:
        return [s[kind][key] for s in seeds]

    paper = PAPER["table1_test_accuracy_percent"][name]
    table1 = {m: {"test_accuracy": stats(acc(m)), "dev_accuracy": stats(acc(m, "dev_accuracy")),
                  "paper_test_accuracy_percent": paper[m]} for m in METHODS}
    calr_mean = table1["calr"]["test_accuracy"]["mean"]
    for m in METHODS:
        table1[m]["relative_to_calr"] = rel(table1[m]["test_accuracy"]["mean"], calr_mean)
        table1[m]["paper_relative_to_calr"] = rel(paper[m], paper["calr"])

    stages = {"uncompressed": "calr", "uncompressed_long": "calr_long", "factorized": "factorized",
              "finetuned": "finetuned"}
    recovery: dict[str, Any] = {}
    for stage, kind in stages.items():
        recovery[stage] = {
            "test_accuracy": stats(acc(kind)),
            "dev_accuracy": stats(acc(kind, "dev_accuracy")),
            "relative_to_uncompressed": stats([rel(s[kind]["test_accuracy"], s["calr"]["test_accuracy"])
                                               for s in seeds]),
            "relative_to_uncompressed_long": stats([rel(s[kind]["test_accuracy"], s["calr_long"]["test_accuracy"])
                                                    for s in seeds]),
        }
    target = settings["target_relative_loss"]
    fin = recovery["finetuned"]
    mcfg = res["settings"]
    by_seed = {s["finetuned"]["config"]["seed"]: s for s in seeds}
    options = [{"schedule": "calr", "lr": mcfg["finetune_lr"], "main": True,
                "runs": [s["finetuned"] for s in seeds]}]
    options += [{"schedule": o["schedule"], "lr": o["lr"], "main": False,
                 "runs": [r for r in res["finetune_sweep"] if r["schedule"] == o["schedule"] and r["lr"] == o["lr"]]}
                for o in mcfg["sweep"]]
    sweep = []
    for o in options:
        rels = [rel(r["test_accuracy"], by_seed[r["config"]["seed"]]["calr"]["test_accuracy"]) for r in o["runs"]]
        sweep.append({"schedule": o["schedule"], "lr": o["lr"], "epochs": mcfg["finetune_epochs"],
                      "main": o["main"], "dev_accuracy": stats([r["dev_accuracy"] for r in o["runs"]]),
                      "test_accuracy": stats([r["test_accuracy"] for r in o["runs"]]),
                      "relative_to_uncompressed": stats(rels),
                      "seeds_within_target": sum(v >= -target for v in rels),
                      "best_epochs": [r["best_epoch"] for r in o["runs"]]})
    best_dev = max(range(len(sweep)), key=lambda i: sweep[i]["dev_accuracy"]["mean"])
    for i, row in enumerate(sweep):
        row["best_mean_dev"] = i == best_dev
    f0 = seeds[0]["factorized"]
    d_used = f0["shape"][1]
    d_paper = PAPER["embed_dim"][name]
    unc = recovery["uncompressed"]["test_accuracy"]
    random_energy = None
    if not mcfg["init_vectors"]:  # what a rank-k SVD keeps of an untrained N(0, 1) table of the same shape
        gen = torch.Generator().manual_seed(0)
        sq = torch.linalg.svdvals(torch.randn(f0["shape"][0], f0["shape"][1], generator=gen)) ** 2
        random_energy = float(sq[: f0["rank"]].sum() / sq.sum())
    return {
        "table1": table1,
        "recovery": recovery,
        "finetune_settings": sweep,
        "uncompressed_seed_std_relative": unc["std"] / unc["mean"],
        "target": {
            "max_relative_loss": target,
            "met_vs_uncompressed": fin["relative_to_uncompressed"]["mean"] >= -target,
            "met_vs_uncompressed_long": fin["relative_to_uncompressed_long"]["mean"] >= -target,
            "seeds_met_vs_uncompressed": sum(v >= -target for v in fin["relative_to_uncompressed"]["values"]),
            "seeds_met_vs_uncompressed_long": sum(v >= -target
                                                  for v in fin["relative_to_uncompressed_long"]["values"]),
            "paper_relative_loss_percent": PAPER["r90_relative_loss_percent"][name],
        },
        "factorization": {k: f0[k] for k in ("table", "shape", "rank", "reduction_requested",
                                             "table_reduction_achieved", "rel_error", "energy_kept",
                                             "table_params_before", "table_params_after", "model_params_before",
                                             "model_params_after", "model_reduction_achieved", "file_bytes_before",
                                             "file_bytes_after")}
        | {"random_table_energy_kept": random_energy,
           "rel_error_all_seeds": stats([s["factorized"]["rel_error"] for s in seeds]),
           "energy_kept_all_seeds": stats([s["factorized"]["energy_kept"] for s in seeds])},
        "paper_dim_rank": {"embed_dim": d_paper, "vocab_size": vocab_size,
                           "rank": choose_rank(vocab_size, d_paper, reduction=settings["reduction"]),
                           "rank_used": f0["rank"], "embed_dim_used": d_used},
        "prefix_identical_all_seeds": all(s["calr_long"]["prefix_equals_calr_run"] for s in seeds),
        "glove_vectors_found": seeds[0]["calr"].get("vectors_found") if mcfg["init_vectors"] else None,
        "wall_seconds": sum(r["wall_seconds"] for s in seeds for r in s.values())
        + sum(r["wall_seconds"] for r in res["finetune_sweep"]),
    }


# ----------------------------------------------------------------------------------------------------- markdown


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def pm(s: dict[str, Any], digits: int = 2) -> str:
    return f"{pct(s['mean'], digits)} ± {pct(s['std'], digits)}" if len(s["values"]) > 1 else pct(s["mean"], digits)


def signed(x: float, digits: int = 2) -> str:
    return f"{100 * x:+.{digits}f} %"


def signed_pm(s: dict[str, Any], digits: int = 2) -> str:
    base = f"{100 * s['mean']:+.{digits}f}"
    return f"{base} ± {100 * s['std']:.{digits}f} %" if len(s["values"]) > 1 else base + " %"


def per_seed(s: dict[str, Any]) -> str:
    return " / ".join(pct(v) for v in s["values"])


def epochs_str(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def fmt_lr(x: float) -> str:
    return f"{x:g}"


def render_markdown(doc: dict[str, Any], out_dir: Path, img_paths: dict[str, Path]) -> str:
    st, mach, summ, models = doc["settings"], doc["machine"], doc["summary"], doc["models"]
    names = list(models)
    seeds = st["seeds"]
    R = st["reduction"]
    target = st["target_relative_loss"]
    link = {k: Path(os.path.relpath(p, out_dir)).as_posix() for k, p in img_paths.items()}
    label = {n: models[n]["settings"]["label"] for n in names}
    L: list[str] = []
    add = L.append

    add("# SST-2: CALR vs CLR vs Adagrad, and recovery after factorizing at R = "
        f"{pct(R, 0)} %\n")
    add(f"Written by `scripts/sst2_recovery.py{' --quick' if doc['quick'] else ''}` from `recovery.json` of the same "
        "run; every number below is read from that file. Do not edit by hand: run the script again.\n")
    if doc["quick"]:
        add("**Quick smoke run** (tiny subsets, one epoch): the numbers mean nothing.\n")
    add(f"- Date: {doc['date_utc']} (UTC); total wall time {doc['wall_seconds'] / 60:.1f} min.")
    add(f"- Machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs, torch {mach['torch_version']} on the "
        f"CPU with {mach['torch_threads']} thread (`torch.set_num_threads(1)`, so one core stays free), Python "
        f"{mach['python_version']}, embcompress {mach['embcompress_version']} (commit "
        f"`{(mach['git_commit'] or 'unknown')[:12]}`).")
    if mach.get("load_average_1min_start") is not None:
        add(f"- Machine load (1-min load average, other people's jobs included): "
            f"{mach['load_average_1min_start']:.1f} at the start, {mach['load_average_1min_end']:.1f} at the end; "
            "wall times grow with it.")
    add(f"- Data: SST-2 sentence level, {doc['data']['train']} / {doc['data']['dev']} / {doc['data']['test']} "
        "train / dev / test sentences (`../shared/data/sst2`, see its SOURCE.md).")
    add(f"- Seeds: {', '.join(str(s) for s in seeds)}; accuracies are mean ± sample standard deviation over the "
        "seeds, on the test set, of the best-on-dev epoch of each run.\n")

    add("## Schedules\n")
    add(f"![CLR vs CALR]({link['schedules']})\n")
    steps = math.ceil(doc["data"]["train"] / st["batch_size"])
    add("The library's `CLR` and `CALR` (`embcompress/train/schedules.py`) stepped on a dummy optimizer "
        f"(`scripts/plot_schedules.py`), {steps} iterations an epoch as for SST-2 in batches of {st['batch_size']}. "
        "CALR halves its upper bound at every epoch end and resets it once it falls to the lower bound. The "
        "triangle's phase runs over all iterations while the bound changes at epoch ends; with an odd number of "
        f"iterations an epoch the default half-cycle (floor({steps} / 2) = {steps // 2}) makes the triangle drift "
        "by one iteration an epoch against the epoch boundaries: the small steps at the later boundaries.\n")

    add("## Table 1: optimizer and schedule (uncompressed models)\n")
    add("Test accuracy (%) after the same number of epochs for the three methods. Paper: Acharya et al. 2019, "
        "Table 1.\n")
    short = {"calr": "CALR", "clr": "CLR", "adagrad": "Adagrad"}
    add("| model | epochs | " + " | ".join(f"{short[m]} (ours)" for m in METHODS) + " | "
        + " | ".join(f"{short[m]} (paper)" for m in METHODS) + " |")
    add("|---|---|" + "---|" * (2 * len(METHODS)))
    for n in names:
        t1 = summ[n]["table1"]
        add(f"| {label[n]} | {models[n]['settings']['train_epochs']} | "
            + " | ".join(pm(t1[m]["test_accuracy"]) for m in METHODS) + " | "
            + " | ".join(f"{t1[m]['paper_test_accuracy_percent']:.2f}" for m in METHODS) + " |")
    add("")
    add("Ours: CALR and CLR with Adam, Adagrad with a constant rate. Relative to CALR ((x - CALR) / CALR, on the "
        "means):\n")
    add("| model | CLR (ours) | Adagrad (ours) | CLR (paper) | Adagrad (paper) |")
    add("|---|---|---|---|---|")
    for n in names:
        t1 = summ[n]["table1"]
        add(f"| {label[n]} | {signed(t1['clr']['relative_to_calr'])} | {signed(t1['adagrad']['relative_to_calr'])} "
            f"| {signed(t1['clr']['paper_relative_to_calr'])} | {signed(t1['adagrad']['paper_relative_to_calr'])} |")
    add("")
    add("Per seed (test %, seeds in the order above):\n")
    add("| model | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |")
    add("|---|" + "---|" * len(METHODS))
    for n in names:
        t1 = summ[n]["table1"]
        add(f"| {label[n]} | " + " | ".join(per_seed(t1[m]["test_accuracy"]) for m in METHODS) + " |")
    add("")
    add("Dev accuracy (%) of the chosen epochs: "
        + "; ".join(f"{label[n]}: " + ", ".join(f"{m.upper() if m != 'adagrad' else 'Adagrad'} "
                                                 f"{pm(summ[n]['table1'][m]['dev_accuracy'])}" for m in METHODS)
                    for n in names) + ".\n")

    add(f"## Recovery at R = {pct(R, 0)} %\n")
    add(f"Each Adam + CALR model above is factorized (`factorize(path, reduction={R:g})`), evaluated as it is, then "
        "fine-tuned with CALR (`finetune_classifier`). The fair baseline is the uncompressed model trained for as "
        "many epochs in all (train + fine-tune), early-stopped on dev.\n")
    for n in names:
        s, rc, tg, fz = models[n]["settings"], summ[n]["recovery"], summ[n]["target"], summ[n]["factorization"]
        E, F = s["train_epochs"], s["finetune_epochs"]
        add(f"### {label[n]}\n")
        add(f"Table `{fz['table']}` {fz['shape'][0]} x {fz['shape'][1]} -> rank k = {fz['rank']} "
            f"(table R achieved {pct(fz['table_reduction_achieved'], 1)} %, model parameters "
            f"{fz['model_params_before']:,} -> {fz['model_params_after']:,}, i.e. "
            f"{pct(fz['model_reduction_achieved'], 1)} % fewer; file {fz['file_bytes_before'] / 1e6:.2f} MB -> "
            f"{fz['file_bytes_after'] / 1e6:.2f} MB), relative Frobenius error "
            f"{pm(fz['rel_error_all_seeds'], 1)} %, energy kept {pm(fz['energy_kept_all_seeds'], 1)} %.\n")
        add("| model | epochs | dev % | test % | test % per seed | vs uncompressed | vs fair baseline |")
        add("|---|---|---|---|---|---|---|")
        rows = [("uncompressed", "uncompressed (Adam + CALR)", f"{E}"),
                ("uncompressed_long", "uncompressed, fair baseline", f"{E + F}"),
                ("factorized", f"factorized R = {pct(R, 0)} %, no retraining", f"{E} + 0"),
                ("finetuned", f"factorized + fine-tuned (CALR, lr {fmt_lr(s['finetune_lr'])})", f"{E} + {F}")]
        for key, title, ep in rows:
            r = rc[key]
            add(f"| {title} | {ep} | {pm(r['dev_accuracy'])} | {pm(r['test_accuracy'])} | "
                f"{per_seed(r['test_accuracy'])} | {signed_pm(r['relative_to_uncompressed'])} | "
                f"{signed_pm(r['relative_to_uncompressed_long'])} |")
        add("")
        verdict = {True: "met", False: "missed"}
        add(f"Target (fine-tuned within {pct(target, 0)} % relative test accuracy of the uncompressed model, on the "
            f"mean): **{verdict[tg['met_vs_uncompressed']]}** against the model it came from "
            f"({signed(rc['finetuned']['relative_to_uncompressed']['mean'])}; "
            f"{tg['seeds_met_vs_uncompressed']} of {len(seeds)} seeds within), **"
            f"{verdict[tg['met_vs_uncompressed_long']]}** against the fair baseline "
            f"({signed(rc['finetuned']['relative_to_uncompressed_long']['mean'])}; "
            f"{tg['seeds_met_vs_uncompressed_long']} of {len(seeds)} seeds within). Paper: "
            f"-{tg['paper_relative_loss_percent']:.1f} % at this R.\n")
    add(f"![dev accuracy per epoch]({link['curves']})\n")
    add(f"Dev accuracy per epoch, seed {seeds[0]}: the uncompressed CALR run continued to the fair budget, the CLR "
        "and Adagrad runs, and the factorized model: the circled best-on-dev epoch of the CALR run is what gets "
        "factorized; its dev accuracy right after `factorize` is drawn at the last training epoch, followed by "
        "each fine-tuning epoch.\n")

    add("## Fine-tuning settings\n")
    add("The same factorized models (every seed) fine-tuned with other peak rates and schedules, Adam, the same "
        "number of epochs, best-on-dev epoch; the first row of each model is the setting used above. Mean ± std "
        "over the seeds; \"within\" counts the seeds within the target. A setting can only be chosen on dev: "
        "the row with the best mean dev accuracy is marked *.\n")
    add("| model | schedule | lr (peak) | epochs | dev % | test % | vs uncompressed | within | best epochs |")
    add("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        for row in summ[n]["finetune_settings"]:
            add(f"| {label[n]}{' (used)' if row['main'] else ''} | {row['schedule']} | {fmt_lr(row['lr'])} | "
                f"{row['epochs']} | {pm(row['dev_accuracy'])}{' *' if row['best_mean_dev'] else ''} | "
                f"{pm(row['test_accuracy'])} | {signed_pm(row['relative_to_uncompressed'])} | "
                f"{row['seeds_within_target']} of {len(row['test_accuracy']['values'])} | "
                f"{', '.join(str(e) for e in row['best_epochs'])} |")
    add("")
    lib = st["library_finetune_defaults"]
    for n in names:
        ms = models[n]["settings"]
        if ms.get("finetune_retuned"):
            add(f"How {label[n]}'s fine-tuning setting was chosen: a first full run used the library's `finetune` "
                f"defaults ({lib['epochs']} epochs, {lib['schedule'].upper()}, peak {fmt_lr(lib['lr'])}) and "
                f"missed the target for {label[n]}. The rates in the table were then tried on the same seeds (their "
                "test accuracies were seen too) and the setting with the best mean dev accuracy was kept: peak "
                f"{fmt_lr(ms['finetune_lr'])}, {epochs_str(ms['finetune_epochs'])}. The differences between the rows "
                "are about the size of the seed-to-seed spread, so this choice is weak evidence either way.\n")
        else:
            add(f"{label[n]} is fine-tuned with the library's `finetune` defaults ({lib['epochs']} epochs, "
                f"{lib['schedule'].upper()}, peak {fmt_lr(lib['lr'])})"
                + (".\n" if (ms["finetune_epochs"], ms["finetune_lr"]) == (lib["epochs"], lib["lr"])
                   else f" except for {epochs_str(ms['finetune_epochs'])} at peak {fmt_lr(ms['finetune_lr'])}.\n"))

    add("## What this shows\n")
    for n in names:
        add(f"- {label[n]}: " + findings(n, doc))
    add("")

    add("## Notes and differences from the paper\n")
    add("- SST-2 here is the sentence-level split only (no phrase-level training labels, see the data's SOURCE.md); "
        "the paper's SST-2 figures most likely come from training on the phrase-level labels, which is worth "
        "several points. Compare relative figures (CLR and Adagrad against CALR; fine-tuned against uncompressed), "
        "not absolute accuracies.")
    for n in names:
        pd = summ[n]["paper_dim_rank"]
        s = models[n]["settings"]
        if s["init_vectors"]:
            found = summ[n]["glove_vectors_found"]
            add(f"- {label[n]} is initialised from {pd['embed_dim_used']}-d GloVe (glove.6B, restricted to SST-2's "
                f"words; {found:,} of {pd['vocab_size']:,} vocabulary tokens found), where the paper used "
                f"{pd['embed_dim']}-d GloVe. At R = {pct(R, 0)} % this makes the rank k = {pd['rank_used']} "
                f"instead of the k = {pd['rank']} a {pd['embed_dim']}-d table of the same vocabulary would get: a "
                "much harder compression.")
        else:
            add(f"- {label[n]}: random N(0, 1) initial embeddings of {pd['embed_dim_used']} dimensions, as in the "
                f"paper (k = {pd['rank_used']} at R = {pct(R, 0)} %).")
    add(f"- The vocabulary is built from the training sentences ({summ[names[0]]['paper_dim_rank']['vocab_size']:,} "
        "tokens with `<pad>` and `<unk>`), so the table is smaller than in setups that keep all of GloVe.")
    add("- Same number of epochs for CALR, CLR and Adagrad; CLR shares CALR's bounds (upper = the Adam rate, lower = "
        "upper / 10, half-cycle = half an epoch); Adagrad uses a constant rate. The paper publishes neither "
        "bounds nor epochs: the rates and epochs here were picked by a few short runs on dev (seed 0) before this "
        "script was run.")
    if all(summ[n]["prefix_identical_all_seeds"] for n in names):
        add("- The fair-baseline runs repeat the shorter runs' first epochs exactly (same dev accuracy at every "
            "epoch, checked for every seed), so each is the same training continued.")
    else:
        add("- Warning: a fair-baseline run did not repeat the shorter run's first epochs exactly (see "
            "`prefix_equals_calr_run` in the JSON).")
    add("")

    add("## Settings\n")
    add("| | " + " | ".join(label[n] for n in names) + " |")
    add("|---|" + "---|" * len(names))
    keys = [("arch", "architecture"),
            ("hidden_dim", "LSTM hidden size"), ("init_vectors", "initial vectors (- : random)"),
            ("dropout", "dropout"),
            ("min_count", "vocabulary min count"), ("train_epochs", "training epochs"),
            ("adam_lr", "Adam lr (CALR / CLR upper bound)"), ("adagrad_lr", "Adagrad lr (constant)"),
            ("finetune_epochs", "fine-tuning epochs"), ("finetune_lr", "fine-tuning lr (CALR upper bound)")]
    add("| embedding dim | " + " | ".join(str(summ[n]["factorization"]["shape"][1]) for n in names) + " |")
    add("| vocabulary (table rows) | " + " | ".join(f"{summ[n]['factorization']['shape'][0]:,}" for n in names) + " |")
    for key, title in keys:
        vals = ["-" if models[n]["settings"][key] is None else str(models[n]["settings"][key]) for n in names]
        if key == "init_vectors":
            vals = [doc["data"]["glove"] if v == "glove" else v for v in vals]
        add(f"| {title} | " + " | ".join(vals) + " |")
    add("")
    cfg0 = models[names[0]]["seeds"][str(seeds[0])]["calr"]["config"]
    add(f"Common: batch size {st['batch_size']}, L2 weight decay {st['weight_decay']:g}, CALR / CLR lower bound = "
        f"upper / 10, half-cycle = half an epoch, CALR decay ln(1/2) (library defaults: `lr_lb`, `step_size`, "
        f"`decay` unset), device {cfg0['device']}, fp32. Each run's full `TrainConfig` is in the JSON "
        "(`models.<model>.seeds.<seed>.<run>.config`).\n")

    add("## Wall time per run (seconds, all seeds)\n")
    add("| model | " + " | ".join(["Adam + CALR", "Adam + CLR", "Adagrad", "fair baseline", "factorize + eval",
                                  "fine-tune"]) + " |")
    add("|---|---|---|---|---|---|---|")
    for n in names:
        ss = models[n]["seeds"]
        cols = ["calr", "clr", "adagrad", "calr_long", "factorized", "finetuned"]
        add(f"| {label[n]} | " + " | ".join(" / ".join(f"{ss[str(s)][c]['wall_seconds']:.0f}" for s in seeds)
                                           for c in cols) + " |")
    add("")
    add(f"Total for the script: {doc['wall_seconds']:.0f} s.\n")
    return "\n".join(L)


def findings(n: str, doc: dict[str, Any]) -> str:
    """A few data-driven sentences for one model (every number from ``doc``)."""
    summ, st, mdl = doc["summary"][n], doc["settings"], doc["models"][n]
    rc, fz, t1 = summ["recovery"], summ["factorization"], summ["table1"]
    target = st["target_relative_loss"]
    E, F = mdl["settings"]["train_epochs"], mdl["settings"]["finetune_epochs"]
    seeds = list(mdl["seeds"].values())
    best = max(METHODS, key=lambda m: t1[m]["test_accuracy"]["mean"])
    out = [f"{METHOD_LABELS[best]} has the best mean test accuracy of the three "
           f"({pct(t1[best]['test_accuracy']['mean'])} %)"
           + ("." if best == "calr" else
              f"; CALR is {signed(rel(t1['calr']['test_accuracy']['mean'], t1[best]['test_accuracy']['mean']))} "
              "relative to it.")]
    drop = rc["factorized"]["relative_to_uncompressed"]["mean"]
    ft = rc["finetuned"]
    out.append(f"Factorizing keeps {pct(fz['energy_kept_all_seeds']['mean'], 1)} % of the table's energy (rank "
               f"{fz['rank']}) and by itself changes test accuracy by {signed(drop)}; fine-tuning with CALR for "
               f"{F} epoch{'s' if F != 1 else ''} brings it to {signed(ft['relative_to_uncompressed']['mean'])} "
               f"relative to the uncompressed model and {signed(ft['relative_to_uncompressed_long']['mean'])} "
               "relative to the fair baseline.")
    long_gain = rc["uncompressed_long"]["relative_to_uncompressed"]["mean"]
    early = sum(s["calr_long"]["best_epoch"] is not None and s["calr_long"]["best_epoch"] <= E for s in seeds)
    if fz.get("random_table_energy_kept") is not None:
        out.append(f"An untrained N(0, 1) table of the same shape keeps {pct(fz['random_table_energy_kept'], 1)} % "
                   "at that rank: most of the trained table's energy is still its random initialisation (rare words "
                   "get few updates), which the classifier does not rely on, so the low energy kept says little "
                   "about the accuracy lost.")
    out.append(f"Training the uncompressed model for {E + F} epochs instead of {E} changes its test accuracy by "
               f"{signed(long_gain)} (its best dev epoch falls within the first {E} in {early} of {len(seeds)} "
               "seeds).")
    if drop >= -target:
        out.append(f"The SVD alone already stays within the {pct(target, 0)} % target: fine-tuning matters less "
                   "here than in the paper.")
    noise = summ["uncompressed_seed_std_relative"]
    rels = [r["relative_to_uncompressed"]["mean"] for r in summ["finetune_settings"]]
    out.append(f"For scale: the uncompressed model's test accuracy varies by {pct(noise)} % (relative standard "
               f"deviation) from seed to seed, and the fine-tuning settings tried land between {signed(min(rels))} "
               f"and {signed(max(rels))} of it.")
    return " ".join(out)


# -------------------------------------------------------------------------------------------------------- plots


def plot_curves(doc: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(doc["models"])
    seed = str(doc["settings"]["seeds"][0])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        runs = doc["models"][n]["seeds"][seed]
        E = doc["models"][n]["settings"]["train_epochs"]
        for kind, style in (("calr_long", dict(color="tab:red", label="uncompressed, Adam + CALR")),
                            ("clr", dict(color="tab:blue", label="uncompressed, Adam + CLR")),
                            ("adagrad", dict(color="tab:green", label="uncompressed, Adagrad"))):
            h = runs[kind]["history"]
            ax.plot([r["epoch"] for r in h], [100 * r["dev_accuracy"] for r in h], marker="o", ms=3, lw=1.2,
                    **style)
        ft = runs["finetuned"]["history"]
        xs = [E] + [E + r["epoch"] for r in ft]
        ys = [100 * runs["factorized"]["dev_accuracy"]] + [100 * r["dev_accuracy"] for r in ft]
        ax.plot(xs, ys, color="black", marker="s", ms=4, lw=1.6, ls="--",
                label=f"factorized R = {pct(doc['settings']['reduction'], 0)} %, then CALR fine-tuning")
        best = runs["calr"]["best_epoch"]
        ax.plot([best, E], [100 * runs["calr"]["dev_accuracy"], ys[0]], color="black", lw=0.8, ls=":",
                marker="o", mfc="none", ms=6, markevery=[0], label="best-on-dev epoch that is factorized")
        ax.axvline(E, color="0.8", lw=0.8, zorder=0)
        ax.set_title(doc["models"][n]["settings"]["label"])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SST-2 dev accuracy per epoch (seed {seed})", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SST-2 CALR/CLR/Adagrad and R = 90 % recovery, written to "
                                     "recovery.json and recovery.md.")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (subsets, 1 epoch, one seed)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where recovery.json and recovery.md go (default docs/results; required with --quick)")
    parser.add_argument("--img-dir", type=Path, default=None,
                        help="where the PNGs go (default docs/img with the default --out-dir, else --out-dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: re-render recovery.md and recovery_curves.png from the recovery.json "
                        "already in --out-dir")
    args = parser.parse_args(argv)
    if args.quick and args.out_dir is None:
        parser.error("--quick needs --out-dir, so as not to overwrite the full results in docs/results")
    torch.set_num_threads(1)  # one core stays free for others on a 2-core machine
    out_dir = (args.out_dir or DEFAULT_OUT).resolve()
    img_dir = (args.img_dir or (DEFAULT_IMG if out_dir == DEFAULT_OUT.resolve() else out_dir)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        doc = json.loads((out_dir / "recovery.json").read_text(encoding="utf-8"))
        img_paths = {"schedules": img_dir / "schedules.png", "curves": img_dir / "recovery_curves.png"}
        plot_curves(doc, img_paths["curves"])
        (out_dir / "recovery.md").write_text(render_markdown(doc, out_dir, img_paths), encoding="utf-8")
        log(f"re-rendered {out_dir / 'recovery.md'} and {img_paths['curves']} from {out_dir / 'recovery.json'}")
        return 0
    if not (SST2 / "train.jsonl").is_file():
        print(f"sst2_recovery: error: SST-2 not found at {SST2}", file=sys.stderr)
        return 2
    settings = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.seeds:
        settings["seeds"] = args.seeds

    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    with tempfile.TemporaryDirectory(prefix="sst2_recovery_") as tmpname:
        tmp = Path(tmpname)
        files = data_files(settings, tmp)
        from embcompress.data import Vocab, read_jsonl

        vocab_size = len(Vocab.build([ex.text for ex in read_jsonl(files["train"])], min_count=1))
        results = {}
        for name in settings["models"]:
            results[name] = run_model(name, settings, files, tmp)
        counts = {split: count_lines(p) for split, p in files.items()}
    summary = {name: summarize(name, results[name], settings, vocab_size) for name in results}

    img_paths = {"schedules": img_dir / "schedules.png", "curves": img_dir / "recovery_curves.png"}
    from plot_schedules import plot as plot_schedules

    counts_steps = math.ceil(counts["train"] / settings["batch_size"])  # iterations an epoch, as fit() has them
    plot_schedules(img_paths["schedules"], steps_per_epoch=counts_steps)
    doc = {
        "script": "scripts/sst2_recovery.py",
        "quick": args.quick,
        "date_utc": date,
        "machine": {**machine_info(), "load_average_1min_start": load_start[0] if load_start else None,
                    "load_average_1min_end": os.getloadavg()[0] if load_start else None},
        "data": {**counts, "source": str(SST2.relative_to(ROOT.parent)) if not settings["subset"] else "subsets",
                 "glove": GLOVE.name},
        "settings": settings,
        "paper": PAPER,
        "models": results,
        "summary": summary,
        "images": {k: Path(os.path.relpath(p, out_dir)).as_posix() for k, p in img_paths.items()},
        "wall_seconds": None,
    }
    plot_curves(doc, img_paths["curves"])
    doc["wall_seconds"] = time.perf_counter() - started
    json_path, md_path = out_dir / "recovery.json", out_dir / "recovery.md"
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    loaded = json.loads(json_path.read_text(encoding="utf-8"))  # the page is rendered from the file as written
    md_path.write_text(render_markdown(loaded, out_dir, img_paths), encoding="utf-8")
    log(f"wrote {json_path}, {md_path}, {img_paths['schedules']}, {img_paths['curves']} "
        f"in {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
