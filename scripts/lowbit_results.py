"""Low-bit tables and every registered method under one byte budget, on all-MiniLM-L6-v2 and the SST-2 classifiers:
writes docs/results/lowbit.{md,json,png} (issue 15: 2, 3 and 4 bits) and docs/results/lowbit_minilm.{md,json,png}
(issue 16: every method and combination at budgets 0.25, 0.10, 0.05 and 0.03, with and without recovery).

MiniLM: each method's model folder is written by ``embcompress.ops.compress.compress`` (token counts from the SST-2
training sentences for the methods that use them), read back with ``hf.load``, and scored by the cosine between its
and the original's mean-pooled sentence embeddings of the SST-2 test sentences (the original's computed once). At
each budget whose best method stays below the issue's 0.995 without training, the best two are recovered by
label-free distillation on the SST-2 training sentences (``distill.distill_model``, labels unused), written, read
back and scored again. Classifiers (DAN-RAND and LSTM, the settings of ``scripts/sst2_recovery.py``): the
uncompressed model of each seed is trained, compressed with the same methods at 0.05 and 0.02 of its table's bytes
and at 2, 3 and 4 bits, scored on SST-2 test; the methods the first seed ranks best on dev, and 2 bits, are then
fine-tuned (``finetune_classifier``) in every seed, once with the labels and once toward the uncompressed model's
predictions with the labels unread (``teacher=``, label weight 0).

    .venv/bin/python scripts/lowbit_results.py --work /tmp/lowbit_work     # the full run, docs/results
    .venv/bin/python scripts/lowbit_results.py --quick --out /tmp/lb       # a smoke run (tiny subsets, < 1 min)
    .venv/bin/python scripts/lowbit_results.py --render-only               # re-render the pages from their JSON
    .venv/bin/python scripts/lowbit_results.py --only classifiers --work /tmp/lowbit_clf   # re-measure DAN and LSTM
    .venv/bin/python scripts/lowbit_results.py --only minilm-recovery --recover-steps 1200 --rows tiered@0.05,pq@0.03
    .venv/bin/python scripts/lowbit_results.py --only minilm-refusals    # ask the refused MiniLM rows again

``--work`` keeps every measured point in a cache there, so a stopped run continues where it was. ``--only
classifiers`` runs the classifier part alone (DAN-RAND and LSTM in two processes) and keeps the MiniLM figures of
``--out``/lowbit_minilm.json (a MiniLM run takes hours on 2 shared cores); both pages are written again, saying
which run each part comes from. ``--only minilm-recovery`` re-runs the recovery of the chosen MiniLM rows
(``method@budget``) with ``--recover-steps`` steps and keeps every other figure of ``--out``/lowbit_minilm.json: each
row is encoded again as the full run encodes it, its no-training cosine re-measured and checked against the JSON's
(1e-4), recovered, scored, and stored beside the figures of its earlier recovery; only the MiniLM page is rewritten.
``--only minilm-refusals`` asks every MiniLM row the JSON records as refused again of the current code: a row now
stored is measured as the full run measures it (without recovery), one still refused gets today's reason; every
other figure is kept and the page says so. A refusal is never taken from the ``--work`` cache: it is asked again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import multiprocessing
import shutil
import statistics
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

from embcompress import core, distill, hf, load_checkpoint  # noqa: E402
from embcompress.classifier import load_classifier  # noqa: E402
from embcompress.errors import InputError  # noqa: E402
from embcompress.methods import STORAGE, STRUCTURE, BudgetError, registered  # noqa: E402
from embcompress.methods.base import budget_bytes  # noqa: E402
from embcompress.methods.lowbit import LowBitConfig  # noqa: E402
from embcompress.ops.compress import compress  # noqa: E402
from embcompress.tables import find_embeddings  # noqa: E402
from beyond_minilm import table_bytes  # noqa: E402
from minilm_recovery import file_bytes, minilm_folder, read_jsonl  # noqa: E402
from sst2_recovery import (  # noqa: E402
    FULL,
    QUICK,
    data_files,
    evaluate,
    finetune_run,
    machine_info,
    train_config,
    train_run,
)

DEFAULT_OUT = ROOT / "docs" / "results"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MINILM_BUDGETS = (0.25, 0.10, 0.05, 0.03)
CLASSIFIER_BUDGETS = (0.05, 0.02)
BITS = (2, 3, 4)
GROUP = 32
LOWBIT_OPTIONS = {"refine": True}  # the storage's options wherever a budget sizes it
# Combinations left out, with the reason the page gives (the rest of structure x storage is run).
SKIPPED = {"*+fp16": "16-bit factors; int8 stores the same factors in half the bytes (svd+int8 is run)",
           "weighted+*": "weighted SVD has plain SVD's factors with a count-weighted fit; svd+int8 and svd+lowbit "
                         "show what the storages do to such factors"}
TARGET_BAR = 0.995  # recovery runs at a budget whose best method stays below this without training
RECOVER_TOP = 2
FINETUNE_TOP = {0.05: 1, 0.02: 1}
# Fine-tuning that re-assigns a pq table's codes (finetune --reassign-codes), toward the uncompressed model with the
# labels: the best mean dev accuracy of the LSTM at 0.02 over its three seeds among seven settings tried by hand
# (REASSIGN_TRIED); the test sentences played no part.
REASSIGN = {"epochs": 24, "lr": 2e-3, "schedule": "warmup-cosine", "label_weight": 0.5}
REASSIGN_TRIED = "12 or 24 epochs, lr 1e-3 or 2e-3, penalty weight 1 or 0.25, label weight 0, 0.5 or 0.8"
STAGES = {"before": "without fine-tuning", "after": "fine-tuned", "distilled": "distilled without labels",
          "reassigned": "fine-tuned with its codes re-assigned"}
TEST_SENTENCES = 600  # the protocol (the first 600 SST-2 test sentences): 2 shared cores
MINILM_TARGETS = ({"budget": 0.10, "cosine": 0.995, "recovery": False},
                  {"budget": 0.05, "cosine": 0.985, "recovery": True},
                  {"budget": 0.03, "cosine": 0.96, "recovery": True})
CLASSIFIER_TARGET = {"budget": 0.02, "relative": -0.01}
QUICK_METHODS = ("lowbit", "svd", "svd+lowbit", "int8")


def log(msg: str) -> None:
    print(f"[lowbit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- what to run -----------------------------------------------------------------------------------------------


def skipped(name: str) -> str | None:
    """Why a structure+storage combination is not run, or None."""
    return next((why for pattern, why in SKIPPED.items() if fnmatch.fnmatchcase(name, pattern)), None)


def combinable(structure: Any) -> bool:
    """Whether a structure keeps float tensors a storage could hold (low-rank factors do; PQ's fp16 codebooks and
    IIQ's bits do not): its budget-sized config plans their shapes."""
    try:
        config = structure.config.for_budget(1000, 64, 25600)
    except BudgetError:
        return False
    return config.planned_shapes(1000, 64) is not None


def budget_methods(quick: bool) -> tuple[list[str], dict[str, str]]:
    """Every registered structure, every storage alone, and each structure+storage that makes sense; and the
    combinations left out with their reason."""
    structures, storages = registered(STRUCTURE), registered(STORAGE)
    names = [m.name for m in structures] + [m.name for m in storages]
    left_out = {}
    for s in structures:
        if not combinable(s):
            continue
        for st in storages:
            name = f"{s.name}+{st.name}"
            why = skipped(name)
            if why:
                left_out[name] = why
            else:
                names.append(name)
    if quick:
        names = [n for n in names if n in QUICK_METHODS]
    return names, left_out


def storage_options(method: str) -> dict[str, Any]:
    return dict(LOWBIT_OPTIONS) if method.split("+")[-1] == "lowbit" else {}


def fixed_points() -> list[dict[str, Any]]:
    """The storages at their own sizes: 2, 3 and 4 bits in groups of 32 with and without refinement, int8, fp16."""
    points = [{"key": f"lowbit{b}{'r' if r else ''}", "method": "lowbit", "bits": b, "refine": r,
               "storage_options": {"bits": b, "group_size": GROUP, "scheme": "asym", "refine": r}}
              for b in BITS for r in (False, True)]
    return points + [{"key": m, "method": m, "storage_options": {}} for m in ("int8", "fp16")]


def reachable(method: str, rows: int, dim: int, budget: float) -> str | None:
    """None when the method can be sized to the budget, else why not (core.spec_for_budget's refusal)."""
    try:
        core.spec_for_budget(method, rows, dim, budget_bytes(budget, rows, dim),
                             storage_options=storage_options(method))
    except InputError as e:  # a BudgetError, or a shape the method refuses (a subvector dividing d)
        return str(e)
    return None


class Cache:
    """Measured points by key, kept in a JSON file of the work folder so that a stopped run continues."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        tmp.replace(self.path)
        return value


def _table(result: Any) -> dict[str, Any]:
    t = result.tables[0]
    return {"method": t["method"], "config": t["config"], "storage_config": t["storage_config"],
            "bytes": t["bytes"], "float32_bytes": t["float32_bytes"], "fraction": t["fraction"],
            "rel_error": (t.get("info") or {}).get("rel_error"), "file_bytes": result.file_bytes_after,
            "compress_seconds": t["seconds"]}


# --- MiniLM ----------------------------------------------------------------------------------------------------


def minilm_env(job: dict[str, Any]) -> dict[str, Any]:
    """What every MiniLM measurement of a job needs: the original, its tokenizer, the texts, the original's sentence
    embeddings of the test texts, and the recovery's settings."""
    torch.set_num_threads(job["threads"])
    s = job["settings"]
    original = minilm_folder()
    train_file = Path(job["files"]["train_texts"])
    tok = hf.load_tokenizer(original)
    teacher = hf.load(original, task="base")
    test_t = read_jsonl(Path(job["files"]["test"]))[0][: s["test_limit"]]
    t0 = time.perf_counter()
    ref = hf.embed(teacher, tok, test_t)
    return {"original": original, "train_file": train_file, "tok": tok, "teacher": teacher, "test_t": test_t,
            "train_t": read_jsonl(train_file)[0][: s["train_limit"]], "ref": ref,
            "embed_seconds": time.perf_counter() - t0, "config": recovery_config(s)}


def recovery_config(s: dict[str, Any]) -> distill.DistillConfig:
    """The label-free recovery's settings for the run's settings."""
    return distill.DistillConfig(steps=s["steps"], layers=s["layers"], lr=s["lr"], device="cpu", seed=0)


def recover(env: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Distil the model in ``folder`` toward the original on the training texts, save it, read it back and score
    it: the recovered figures, with the steps and the seconds the recovery took."""
    student = hf.load(folder, task="base")
    trains = "table and layers" if student.get_input_embeddings().recoverable() else \
        "layers only (the table has no trainable tensors)"
    config = env["config"]
    started = time.perf_counter()
    phases = distill.distill_model(student, env["teacher"], env["tok"], env["train_t"], config)
    seconds = time.perf_counter() - started
    saved = folder.with_name(f"{folder.name}.recovered")
    hf.save(student.cpu(), saved, like=folder, force=True)
    again = hf.load(saved, task="base")
    return {"trains": trains, "steps": config.steps, "recovery_seconds": seconds,
            "loss_last": phases[-1]["loss_last"] if phases else None, "table_bytes": table_bytes(saved),
            "file_bytes": file_bytes(saved), **_cos(hf.embed(again, env["tok"], env["test_t"]), env["ref"],
                                                    env["test_t"])}


def minilm_job(job: dict[str, Any]) -> dict[str, Any]:
    work, s = Path(job["work"]), job["settings"]
    cache = Cache(work / "minilm.cache.json")
    env = minilm_env(job)
    original, train_file, tok, teacher = env["original"], env["train_file"], env["tok"], env["teacher"]
    test_t, ref = env["test_t"], env["ref"]
    V, d = teacher.get_input_embeddings().weight.shape
    out: dict[str, Any] = {"original": {"file_bytes": file_bytes(original), "table_float32_bytes": 4 * V * d,
                                        "shape": [V, d], "embed_seconds": env["embed_seconds"]},
                           "fixed": {}, "budgets": {}, "recovered": {}}
    folder = work / "minilm-model"

    def measure(key: str, method: str, budget: float | None, opts: dict[str, Any]) -> dict[str, Any]:
        key = f"n{len(test_t)}/{key}"
        hit = cache.get(key)
        if hit is not None and hit.get("reached") is not False:  # a refusal is asked again: the code may take it now
            return hit
        if time.time() > job["deadline"]:
            return {"reached": None, "why": "not run: past the run's time limit"}
        started = time.perf_counter()
        try:
            res = compress(original, method, budget=budget, storage_options=opts, corpus=train_file,
                           output=folder, force=True)
        except InputError as e:  # the method refuses this table (its shape, its budget)
            return cache.put(key, {"reached": False, "why": str(e)})
        model = hf.load(folder, task="base")
        rec = {"reached": True, **_table(res), **_cos(hf.embed(model, tok, test_t), ref, test_t),
               "seconds": time.perf_counter() - started}
        log(f"MiniLM {key}: {rec['fraction']:.4f} of float32, cosine {rec['mean']:.4f} (worst {rec['worst']:.4f})")
        return cache.put(key, rec)

    for p in fixed_points()[: s["fixed_points"]]:
        out["fixed"][p["key"]] = {**p, **measure(f"fixed/{p['key']}", p["method"], None, p["storage_options"])}
    methods, left_out = budget_methods(s["quick"])
    out["methods"], out["left_out"] = methods, left_out
    for budget in sorted(s["minilm_budgets"], key=lambda b: (b > 0.1, -b)):  # 0.10, 0.05, 0.03, then 0.25
        row: dict[str, Any] = {}
        for method in methods:
            why = reachable(method, V, d, budget)
            row[method] = ({"reached": False, "why": why} if why else
                           measure(f"{budget}/{method}", method, budget, storage_options(method)))
        out["budgets"][str(budget)] = row
    out["budgets"] = {str(b): out["budgets"][str(b)] for b in s["minilm_budgets"]}
    config = env["config"]
    for key, method, budget, opts in recovery_plan(out, s["recover_top"]):
        hit = cache.get(f"n{len(test_t)}/s{config.steps}/recovered/{key}")
        if hit is None:
            compress(original, method, budget=budget, storage_options=opts, corpus=train_file, output=folder,
                     force=True)
            hit = cache.put(f"n{len(test_t)}/s{config.steps}/recovered/{key}", recover(env, folder))
            log(f"MiniLM {key} recovered ({hit['trains']}, {hit['recovery_seconds'] / 60:.1f} min): "
                f"cosine {hit['mean']:.4f}")
        out["recovered"][key] = hit
    out["settings"] = {"test_sentences": len(test_t), "recovery_texts": len(env["train_t"]), **config.to_dict()}
    return {"job": "minilm", "result": out}


def minilm_recovery_job(job: dict[str, Any]) -> dict[str, Any]:
    """One MiniLM row (``budget/method``) encoded again as the full run encodes it, its no-training cosine
    re-measured (and checked against the kept one when the protocol is the kept run's), then recovered and scored."""
    work, key, kept = Path(job["work"]), job["row"], job["kept"]
    budget, method = key.split("/", 1)
    env = minilm_env(job)
    cache = Cache(work / f"minilm.{key.replace('/', '_')}.cache.json")
    cache_key = f"n{len(env['test_t'])}/s{env['config'].steps}/recovered/{key}"
    hit = cache.get(cache_key)
    if hit is None:
        folder = work / f"minilm-model.{key.replace('/', '_')}"
        compress(env["original"], method, budget=float(budget), storage_options=storage_options(method),
                 corpus=env["train_file"], output=folder, force=True)
        before = _cos(hf.embed(hf.load(folder, task="base"), env["tok"], env["test_t"]), env["ref"],
                      env["test_t"])["mean"]
        log(f"MiniLM {key} encoded again: cosine {before:.6f}, the kept run's {kept['mean']:.6f} "
            f"(difference {abs(before - kept['mean']):.2e})")
        if job["compare"] and abs(before - kept["mean"]) > REMEASURE_TOLERANCE:
            raise RemeasureError(f"{key} encoded again scores {before:.6f} without training, the kept run "
                                 f"{kept['mean']:.6f}: not the same encoding (tolerance {REMEASURE_TOLERANCE:g})")
        hit = cache.put(cache_key, {**recover(env, folder), "before_remeasured": before})
        log(f"MiniLM {key} recovered ({hit['steps']} steps, {hit['recovery_seconds'] / 60:.1f} min): "
            f"cosine {hit['mean']:.4f}")
    return {"job": "minilm-recovery", "row": key, "result": hit}


def recovery_plan(out: dict[str, Any], top: int) -> list[tuple[str, str, float | None, dict[str, Any]]]:
    """At each budget whose best method stays below TARGET_BAR, its best ``top``; and the 2-bit table."""
    plan: list[tuple[str, str, float | None, dict[str, Any]]] = []
    allowed = {t["budget"] for t in MINILM_TARGETS if t["recovery"]}
    for budget, row in out["budgets"].items():
        ranked = sorted((m for m, r in row.items() if r["reached"]), key=lambda m: -row[m]["mean"])
        if float(budget) in allowed and ranked and row[ranked[0]]["mean"] < TARGET_BAR:
            plan += [(f"{budget}/{m}", m, float(budget), storage_options(m)) for m in ranked[:top]]
    two = next((p for p in fixed_points() if p["key"] == "lowbit2r"), None)
    if two and out["fixed"].get("lowbit2r", {}).get("reached"):
        plan.append(("fixed/lowbit2r", "lowbit", None, two["storage_options"]))
    return plan


def _cos(a: torch.Tensor, b: torch.Tensor, texts: list[str]) -> dict[str, float]:
    r = hf.cosine_report(a, b, texts)
    return {"mean": r.mean, "worst": r.worst, "p05": r.p05}


# --- classifiers -----------------------------------------------------------------------------------------------


def classifier_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model, seed by seed (the seeds after the first are cut once the run's time limit has passed)."""
    torch.set_num_threads(job["threads"])
    settings = job["settings"]
    names = list(job.get("names") or settings["models"])
    seeds: dict[str, dict[str, Any]] = {n: {} for n in names}
    chosen: dict[str, list[str]] = {}
    for seed in settings["seeds"]:
        if seeds[names[0]] and time.time() > job["deadline"]:
            break
        for name in names:
            seeds[name][str(seed)] = classifier_seed(job, name, seed, chosen)
    methods, left_out = budget_methods(settings["quick"])
    return [{"job": "classifier", "model": n, "seeds": seeds[n], "finetuned": chosen[n], "methods": methods,
             "left_out": left_out} for n in names]


def classifier_seed(job: dict[str, Any], name: str, seed: int, chosen: dict[str, list[str]]) -> dict[str, Any]:
    """One model and seed: train it, compress it every way, score; fine-tune what the first seed chose."""
    settings, work = job["settings"], Path(job["work"])
    files = {k: Path(v) for k, v in job["files"].items() if k in ("train", "dev", "test")}
    mcfg = settings["models"][name]
    cache = Cache(work / f"{name}.cache.json")
    methods, _ = budget_methods(settings["quick"])
    dense = work / f"{name}.s{seed}.dense.safetensors"
    runs: dict[str, Any] = {"dense": cache.get(f"s{seed}/dense")}
    if runs["dense"] is None or not dense.is_file():
        runs["dense"] = cache.put(f"s{seed}/dense", train_run(
            name, mcfg, settings, files, dense, "dense",
            train_config(settings, epochs=mcfg["train_epochs"], lr=mcfg["adam_lr"], optimizer="adam",
                         schedule="calr", seed=seed)))
    points: dict[str, Any] = {}

    def measure(key: str, method: str, budget: float | None, opts: dict[str, Any]) -> dict[str, Any]:
        hit = cache.get(f"s{seed}/{key}")
        path = work / f"{name}.s{seed}.{key.replace('/', '_')}.safetensors"
        if hit is not None and hit.get("reached") and path.is_file():  # a refusal is asked again (it is cheap)
            return hit
        if budget is not None:
            why = reachable(method, *table_shape(dense), budget)
            if why:
                return cache.put(f"s{seed}/{key}", {"reached": False, "why": why})
        try:
            res = compress(dense, method, budget=budget, storage_options=opts, corpus=files["train"],
                           output=path, force=True)
        except InputError as e:  # the method refuses this table (its shape, its budget)
            return cache.put(f"s{seed}/{key}", {"reached": False, "why": str(e)})
        rec = {"reached": True, **_table(res), "before": evaluate(path, files["test"])["accuracy"],
               "dev_before": evaluate(path, files["dev"])["accuracy"]}
        log(f"{name} seed {seed} {key}: {rec['fraction']:.4f}, test {rec['before']:.4f}")
        return cache.put(f"s{seed}/{key}", rec)

    for b in BITS:
        key = f"lowbit{b}r"
        points[key] = measure(key, "lowbit", None, {"bits": b, "group_size": GROUP, "scheme": "asym",
                                                     "refine": True})
    for budget in settings["classifier_budgets"]:
        for method in methods:
            points[f"{budget}/{method}"] = measure(f"{budget}/{method}", method, budget, storage_options(method))
    if name not in chosen:  # ranked on the first seed's dev accuracy, then the same ones in every seed
        chosen[name] = ["lowbit2r"] if points["lowbit2r"]["reached"] else []
        for budget in settings["classifier_budgets"]:
            here = [k for k in points if k.startswith(f"{budget}/") and points[k]["reached"]]
            here.sort(key=lambda k: -points[k]["dev_before"])
            chosen[name] += here[: FINETUNE_TOP.get(budget, 1)]
    for key in chosen[name]:
        src = work / f"{name}.s{seed}.{key.replace('/', '_')}.safetensors"
        hit = cache.get(f"s{seed}/{key}/ft")
        if hit is None:
            ft = finetune_run(name, src, files, work / f"{name}.s{seed}.{key.replace('/', '_')}.ft.safetensors",
                              f"{key} fine-tuned",
                              train_config(settings, epochs=mcfg["finetune_epochs"], lr=mcfg["finetune_lr"],
                                           optimizer="adam", schedule="calr", seed=seed))
            hit = cache.put(f"s{seed}/{key}/ft", {"after": ft["test_accuracy"], "dev_after": ft["dev_accuracy"],
                                                  "seconds": ft["wall_seconds"]})
        points[key] = {**points[key], **hit}
        hit = cache.get(f"s{seed}/{key}/distilled")
        if hit is None:  # the same fine-tuning toward the uncompressed model's predictions, the labels unread
            kd = finetune_run(name, src, files, work / f"{name}.s{seed}.{key.replace('/', '_')}.kd.safetensors",
                              f"{key} distilled, no labels",
                              train_config(settings, epochs=mcfg["finetune_epochs"], lr=mcfg["finetune_lr"],
                                           optimizer="adam", schedule="calr", seed=seed),
                              teacher=dense, label_weight=0.0)
            hit = cache.put(f"s{seed}/{key}/distilled", {"distilled": kd["test_accuracy"],
                                                         "dev_distilled": kd["dev_accuracy"],
                                                         "seconds_distilled": kd["wall_seconds"]})
        points[key] = {**points[key], **hit}
        hit = cache.get(f"s{seed}/{key}/reassigned")
        if hit is not None and hit.get("reassign_settings") != REASSIGN:  # measured with other settings
            hit = None
        if hit is None and trains_codes(src):  # its codes move too, toward the uncompressed model and the labels
            rs = finetune_run(name, src, files, work / f"{name}.s{seed}.{key.replace('/', '_')}.rc.safetensors",
                              f"{key} codes re-assigned",
                              reassign_config(settings, seed),
                              teacher=dense, label_weight=REASSIGN["label_weight"], reassign_codes=True)
            hit = cache.put(f"s{seed}/{key}/reassigned", {"reassigned": rs["test_accuracy"],
                                                          "dev_reassigned": rs["dev_accuracy"],
                                                          "seconds_reassigned": rs["wall_seconds"],
                                                          "reassign_settings": REASSIGN})
        points[key] = {**points[key], **(hit or {})}
    if any("reassigned" in p for p in points.values()):  # the uncompressed model given the same recipe
        hit = cache.get(f"s{seed}/dense/recipe")
        if hit is None or hit.get("reassign_settings") != REASSIGN:
            rs = finetune_run(name, dense, files, work / f"{name}.s{seed}.dense.recipe.safetensors",
                              "uncompressed, the re-assignment's recipe",
                              reassign_config(settings, seed),
                              teacher=dense, label_weight=REASSIGN["label_weight"])
            hit = cache.put(f"s{seed}/dense/recipe", {"test_accuracy": rs["test_accuracy"],
                                                      "dev_accuracy": rs["dev_accuracy"],
                                                      "seconds": rs["wall_seconds"], "reassign_settings": REASSIGN})
        runs["dense_recipe"] = hit
    runs["points"] = points
    runs["shape"] = list(table_shape(dense))
    return runs


def reassign_config(settings: dict[str, Any], seed: int) -> Any:
    """The training settings of the code re-assignment's recipe (also given to the uncompressed reference)."""
    return train_config(settings, epochs=REASSIGN["epochs"], lr=REASSIGN["lr"], optimizer="adam",
                        schedule=REASSIGN["schedule"], seed=seed)


def trains_codes(path: Path) -> bool:
    """Whether a classifier checkpoint has a table whose codes fine-tuning can re-assign (pq)."""
    return any(t.trains_codes for t in core.tables_of(load_classifier(path).model).values())


def table_shape(path: Path) -> tuple[int, int]:
    """The shape of a classifier checkpoint's embedding table (read from the file's header)."""
    with load_checkpoint(path) as ckpt:
        t = find_embeddings(ckpt, None)[0]
    return t.rows, t.cols


def summarize_classifier(res: dict[str, Any]) -> dict[str, Any]:
    """Mean and spread over seeds of each point's test accuracy, before and after fine-tuning, and relative to the
    uncompressed model of the same seed."""
    seeds = list(res["seeds"].values())
    dense = [s["dense"]["test_accuracy"] for s in seeds]
    out: dict[str, Any] = {"dense": stats(dense), "seeds": [int(k) for k in res["seeds"]], "points": {}}
    recipe = [s.get("dense_recipe", {}).get("test_accuracy") for s in seeds]
    if all(v is not None for v in recipe):  # the uncompressed model fine-tuned with the re-assignment's recipe
        out["dense_recipe"] = stats(recipe)
    if "shape" in seeds[0]:
        out["shape"] = seeds[0]["shape"]
    for key, first in seeds[0]["points"].items():
        if not first.get("reached"):
            out["points"][key] = {"reached": False, "why": first["why"]}
            continue
        entry = {"reached": True, "fraction": first["fraction"], "bytes": first["bytes"],
                 "float32_bytes": first["float32_bytes"], "config": first["config"],
                 "storage_config": first["storage_config"]}
        for stage in STAGES:
            values = [s["points"].get(key, {}).get(stage) for s in seeds]
            if all(v is not None for v in values):
                entry[stage] = stats(values)
                entry[f"{stage}_relative"] = stats([(v - d) / d for v, d in zip(values, dense)])
                if stage == "reassigned" and "dense_recipe" in out:
                    entry["reassigned_vs_recipe"] = stats([(v - d) / d for v, d in zip(values, recipe)])
        out["points"][key] = entry
    return out


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


# --- the run ---------------------------------------------------------------------------------------------------


def settings_for(quick: bool, steps: int) -> dict[str, Any]:
    base = json.loads(json.dumps(QUICK if quick else FULL))
    return {**base, "quick": quick, "minilm_budgets": [0.05] if quick else list(MINILM_BUDGETS),
            "classifier_budgets": list(CLASSIFIER_BUDGETS), "test_limit": 40 if quick else TEST_SENTENCES,
            "train_limit": 200 if quick else None, "steps": 2 if quick else steps, "layers": 1, "lr": 4e-3,
            "fixed_points": 2 if quick else len(fixed_points()), "threads": 1,
            "recover_top": 1 if quick else RECOVER_TOP}


def minilm_refusals_job(job: dict[str, Any]) -> dict[str, Any]:
    """The MiniLM rows the kept run could not store, asked again of the current code: each refused again (with
    today's reason) or encoded, read back and scored as the full run scores it."""
    env, out = minilm_env(job), {}
    V, d = env["teacher"].get_input_embeddings().weight.shape
    folder = Path(job["work"]) / "minilm-model.refusals"
    for key in job["rows"]:
        budget, method = key.split("/", 1)
        why = reachable(method, V, d, float(budget))
        if why:
            out[key] = {"reached": False, "why": why}
            continue
        started = time.perf_counter()
        try:
            res = compress(env["original"], method, budget=float(budget), storage_options=storage_options(method),
                           corpus=env["train_file"], output=folder, force=True)
        except InputError as e:
            out[key] = {"reached": False, "why": str(e)}
            continue
        model = hf.load(folder, task="base")
        out[key] = {"reached": True, **_table(res), **_cos(hf.embed(model, env["tok"], env["test_t"]), env["ref"],
                                                          env["test_t"]), "seconds": time.perf_counter() - started}
        log(f"MiniLM {key} (refused by the kept run): {out[key]['fraction']:.4f} of float32, cosine "
            f"{out[key]['mean']:.4f}")
    return {"job": "minilm-refusals", "result": out}


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    if job["model"] == "minilm-recovery":
        return [minilm_recovery_job(job)]
    if job["model"] == "minilm-refusals":
        return [minilm_refusals_job(job)]
    return [minilm_job(job)] if job["model"] == "minilm" else classifier_job(job)


PARTS = ("all", "classifiers", "minilm-recovery", "minilm-refusals")
REMEASURE_TOLERANCE = 1e-4  # a row encoded again must score its kept no-training cosine within this


class RemeasureError(InputError):
    """A row encoded again does not score what the kept run measured (the code or the data changed)."""


def kept_minilm(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MiniLM result of the pages in ``out`` and the run it came from (for ``--only classifiers``)."""
    src = out / "lowbit_minilm.json"
    if not src.is_file():
        raise SystemExit(f"--only classifiers keeps the MiniLM figures of {src}, which does not exist; run the "
                         "whole script first")
    doc = json.loads(src.read_text(encoding="utf-8"))
    run = doc.get("minilm_run") or {"date_utc": doc["date_utc"], "wall_seconds": doc["wall_seconds"],
                                    "git_commit": doc["machine"].get("git_commit"), "resumed": doc.get("resumed")}
    return doc["minilm"], run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=None, help="keep models and measured points here (resumable)")
    ap.add_argument("--steps", "--recover-steps", type=int, default=300,
                    help="label-free recovery steps (layer phase) per method")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="MiniLM points not measured by then are shown as not run (recovery still runs); "
                         "classifier seeds after the first are not started after it")
    ap.add_argument("--only", choices=PARTS, default="all",
                    help="classifiers: run DAN-RAND and LSTM only (one process each) and keep the MiniLM figures of "
                         "--out/lowbit_minilm.json; minilm-recovery: re-run the recovery of the --rows of "
                         "--out/lowbit_minilm.json with --recover-steps steps and keep every other figure; "
                         "minilm-refusals: ask the refused MiniLM rows of --out/lowbit_minilm.json again")
    ap.add_argument("--rows", default="", help="with --only minilm-recovery: MiniLM rows as method@budget, "
                                               "comma-separated (e.g. tiered@0.05,pq@0.03)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets, one seed, a few steps (a smoke run)")
    ap.add_argument("--render-only", action="store_true", help="re-render the pages from their JSON in --out")
    args = ap.parse_args(argv)
    if args.render_only:
        for page in ("lowbit", "lowbit_minilm"):
            src = args.out / f"{page}.json"
            if src.is_file():
                doc = json.loads(src.read_text(encoding="utf-8"))
                (args.out / f"{page}.md").write_text(RENDER[page](doc), encoding="utf-8")
        return 0
    if args.quick and args.out.resolve() == DEFAULT_OUT.resolve():
        ap.error("--quick needs --out (it must not overwrite docs/results)")
    if args.only in ("minilm-recovery", "minilm-refusals"):
        try:
            return rerun_recovery(args) if args.only == "minilm-recovery" else recheck_refusals(args)
        except InputError as e:
            raise SystemExit(f"error: {e}") from None
    kept = kept_minilm(args.out) if args.only == "classifiers" else None
    settings = settings_for(args.quick, args.steps)
    started = time.perf_counter()
    machine = {**machine_info(), "torch_threads": settings["threads"]}
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    tmp = tempfile.mkdtemp(prefix="lowbit_")
    work = args.work or Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    resumed = any(work.glob("*.cache.json"))
    try:
        files = data_files(settings, Path(tmp))
        train_texts = files["train"]
        deadline = time.time() + 60 * args.minutes
        parts = ([{"model": "classifiers", "names": [n]} for n in settings["models"]] if kept else
                 [{"model": m} for m in ("minilm", "classifiers")])
        jobs = [{**part, "settings": settings, "work": str(work), "threads": settings["threads"],
                 "deadline": deadline,
                 "files": {**{k: str(v) for k, v in files.items()}, "train_texts": str(train_texts)}}
                for part in parts]
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            results = [r for rs in pool.map(run_job, jobs, chunksize=1) for r in rs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    minilm = kept[0] if kept else next(r["result"] for r in results if r["job"] == "minilm")
    classifiers = {r["model"]: r for r in results if r["job"] == "classifier"}
    common = {"quick": args.quick, "date_utc": date, "machine": machine, "wall_seconds": time.perf_counter() - started,
              "resumed": resumed,
              "settings": {k: settings[k] for k in ("seeds", "minilm_budgets", "classifier_budgets", "steps",
                                                     "layers", "lr", "subset", "batch_size", "weight_decay")},
              "models": {n: {k: settings["models"][n][k] for k in ("label", "arch", "train_epochs", "finetune_epochs",
                                                                   "finetune_lr", "adam_lr")}
                         for n in settings["models"]},
              "minilm_settings": minilm["settings"], **({"minilm_run": kept[1]} if kept else {})}
    clf = {n: {"summary": summarize_classifier(r), "finetuned": r["finetuned"], "runs": r["seeds"]}
           for n, r in classifiers.items()}
    docs = {"lowbit_minilm": {**common, "script": "scripts/lowbit_results.py", "minilm": minilm,
                              "classifiers": clf},
            "lowbit": {**common, "script": "scripts/lowbit_results.py",
                       "minilm": {k: minilm[k] for k in ("original", "fixed", "recovered")},
                       "classifiers": {n: {"summary": {**{k: c["summary"][k] for k in ("dense", "seeds", "shape")
                                                          if k in c["summary"]},
                                                       "points": {k: v for k, v in c["summary"]["points"].items()
                                                                  if k.startswith("lowbit")}}}
                                       for n, c in clf.items()}}}
    args.out.mkdir(parents=True, exist_ok=True)
    for page, doc in docs.items():
        (args.out / f"{page}.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        doc = json.loads((args.out / f"{page}.json").read_text(encoding="utf-8"))
        (args.out / f"{page}.md").write_text(RENDER[page](doc), encoding="utf-8")
        PLOT[page](doc, args.out / f"{page}.png")
    log(f"wrote {args.out}/lowbit.md and lowbit_minilm.md in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def chosen_rows(doc: dict[str, Any], rows: str) -> list[str]:
    """The ``budget/method`` keys of ``--rows`` (method@budget, comma-separated), each a row the JSON measured."""
    keys = []
    for item in filter(None, (r.strip() for r in rows.split(","))):
        method, _, budget = item.partition("@")
        try:
            key = f"{float(budget)}/{method}"
        except ValueError:
            raise InputError(f"--rows: {item!r} is not method@budget (e.g. tiered@0.05)") from None
        row = doc["minilm"]["budgets"].get(key.split("/")[0], {}).get(method)
        if not row or not row.get("reached"):
            raise InputError(f"--rows: {item!r} is not a measured MiniLM row of the JSON (budgets "
                             f"{', '.join(doc['minilm']['budgets'])})")
        keys.append(key)
    if not keys:
        raise InputError("--only minilm-recovery needs --rows, e.g. --rows tiered@0.05,pq@0.03")
    return keys


def _kept_doc(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The MiniLM page's JSON in ``--out`` that an ``--only minilm-...`` run updates."""
    src = args.out / "lowbit_minilm.json"
    if not src.is_file():
        raise InputError(f"--only {args.only} keeps the figures of {src}, which does not exist")
    return src, json.loads(src.read_text(encoding="utf-8"))


def _run_minilm_jobs(args: argparse.Namespace, settings: dict[str, Any], jobs: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """The jobs, each in its own process (two at a time), with the work folder and the data files filled in."""
    tmp = tempfile.mkdtemp(prefix="lowbit_")
    work = args.work or Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = data_files(settings, Path(tmp))
        paths = {**{k: str(v) for k, v in files.items()}, "train_texts": str(files["train"])}
        jobs = [{**job, "work": str(work), "files": paths} for job in jobs]
        with multiprocessing.get_context("spawn").Pool(min(2, len(jobs))) as pool:
            return [r for rs in pool.map(run_job, jobs, chunksize=1) for r in rs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_minilm(args: argparse.Namespace, src: Path, doc: dict[str, Any], started: float) -> None:
    """The updated JSON written, read back and rendered to the MiniLM page and plot."""
    src.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    doc = json.loads(src.read_text(encoding="utf-8"))
    (args.out / "lowbit_minilm.md").write_text(render_minilm(doc), encoding="utf-8")
    PLOT["lowbit_minilm"](doc, args.out / "lowbit_minilm.png")
    log(f"wrote {args.out}/lowbit_minilm.md in {(time.perf_counter() - started) / 60:.1f} min")


def rerun_recovery(args: argparse.Namespace) -> int:
    """``--only minilm-recovery``: the chosen rows recovered again with ``args.steps`` steps (one process per row, two
    at a time), their new figures stored over the old with the old kept in ``earlier``; every other figure kept."""
    src, doc = _kept_doc(args)
    keys = chosen_rows(doc, args.rows)
    settings = settings_for(args.quick, args.steps)
    kept_settings = {k: v for k, v in doc["minilm_settings"].items() if k not in ("test_sentences", "recovery_texts")}
    compare = not args.quick  # the quick run's subsets are not the kept run's protocol
    if compare and {**kept_settings, "steps": args.steps} != recovery_config(settings).to_dict():
        raise InputError(f"the recovery's settings differ from the kept run's {kept_settings} (besides the steps)")
    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    machine = {**machine_info(), "torch_threads": settings["threads"]}
    jobs = [{"model": "minilm-recovery", "row": key, "kept": doc["minilm"]["budgets"][key.split("/")[0]][
                key.split("/", 1)[1]], "compare": compare, "settings": settings, "threads": settings["threads"]}
            for key in keys]
    results = _run_minilm_jobs(args, settings, jobs)
    recovered = doc["minilm"]["recovered"]
    for r in results:
        old = recovered.get(r["row"])
        earlier = [] if old is None else [*old.pop("earlier", []),
                                          {**old, "steps": old.get("steps", doc["minilm_settings"]["steps"])}]
        recovered[r["row"]] = {**r["result"], "earlier": [e for e in earlier if e["steps"] != args.steps]}
    doc["minilm"].setdefault("reruns", []).append(
        {"date_utc": date, "wall_seconds": time.perf_counter() - started, "steps": args.steps, "rows": keys,
         "quick": args.quick, "git_commit": machine.get("git_commit"), "git_dirty": machine.get("git_dirty")})
    _write_minilm(args, src, doc, started)
    return 0


def recheck_refusals(args: argparse.Namespace) -> int:
    """``--only minilm-refusals``: every MiniLM budget row the kept run refused, asked again of the current code (one
    process); a row now stored takes its measured figures, one still refused its current reason; every other
    figure, and the recovery plan, kept."""
    src, doc = _kept_doc(args)
    rows = [f"{b}/{m}" for b, row in doc["minilm"]["budgets"].items() for m, r in row.items()
            if r.get("reached") is False]
    if not rows:
        raise InputError(f"{src} has no refused MiniLM row")
    settings = settings_for(args.quick, args.steps)
    if not args.quick and doc["minilm_settings"]["test_sentences"] != settings["test_limit"]:
        raise InputError(f"the kept run scored {doc['minilm_settings']['test_sentences']} sentences, this one would "
                         f"score {settings['test_limit']}")
    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    machine = {**machine_info(), "torch_threads": settings["threads"]}
    job = {"model": "minilm-refusals", "rows": rows, "settings": settings, "threads": 2}
    result = _run_minilm_jobs(args, settings, [job])[0]["result"]
    for key, rec in result.items():
        budget, method = key.split("/", 1)
        doc["minilm"]["budgets"][budget][method] = {**rec, "rechecked": date}
    doc["minilm"].setdefault("rechecks", []).append(
        {"date_utc": date, "wall_seconds": time.perf_counter() - started, "rows": rows, "quick": args.quick,
         "stored": [k for k, r in result.items() if r["reached"]], "git_commit": machine.get("git_commit"),
         "git_dirty": machine.get("git_dirty")})
    _write_minilm(args, src, doc, started)
    return 0


# --- pages -----------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pm(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _rel(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{100 * s['mean']:+.2f} %"


def _chosen(entry: dict[str, Any]) -> str:
    """What a budget made the method choose: rank, bits and group, subvector and centroids ..."""
    c, sc = entry.get("config") or {}, entry.get("storage_config") or {}
    parts = []
    for k, label in (("rank", "k"), ("subvector", "S"), ("centroids", "K"), ("bits", "bits")):
        if c.get(k) is not None:
            parts.append(f"{label} {c[k]}")
    if sc.get("bits") is not None and "bits" in sc:
        parts.append(f"{sc['bits']}-bit g{sc['group_size']}" + (" refined" if sc.get("refine") else "")
                     if "group_size" in sc else f"{sc['bits']}-bit")
    return ", ".join(parts) or "-"


def _header(doc: dict[str, Any], title: str) -> list[str]:
    m, ms = doc["machine"], doc["minilm_settings"]
    return [f"# {title}", "",
            f"Written by `{doc['script']}` from the JSON beside this page; do not edit by hand. "
            f"{doc['date_utc']} (UTC), {doc['wall_seconds'] / 60:.1f} min on {m['cpu_model']} "
            f"({m['logical_cpus']} logical CPUs shared with other work, {m['torch_threads']} torch thread per process, "
            f"two processes), torch {m['torch_version']}, commit `{(m.get('git_commit') or 'unknown')[:12]}`"
            + (" with uncommitted changes" if m.get("git_dirty") else "") + " at the start"
            + (" (this run continued an earlier one from its cache of measured points; the time is this run's)"
               if doc.get("resumed") else "") + "." + _kept_minilm(doc)
            + (" **Quick smoke run: the figures mean nothing.**" if doc["quick"] else ""), "",
            f"- all-MiniLM-L6-v2: cosine between each model's and the original's mean-pooled sentence embeddings of "
            f"the first {ms['test_sentences']} of the 1821 SST-2 test sentences (mean, worst, 5th percentile; the "
            "issue's own protocol: each evaluation of all 1821 took over a minute on the shared cores, too long for "
            "every point); bytes are the token "
            "table's stored bytes over its float32 bytes, and the whole model file. Token counts for the methods "
            "that use them: the SST-2 training sentences, counted with MiniLM's tokenizer.",
            f"- Label-free recovery: `distill.distill_model` toward the original on the {ms['recovery_texts']} SST-2 "
            f"training sentences (no labels), layer phase: the table and the first {ms['layers']} layer(s), "
            f"{ms['steps']} steps of {ms['batch_size']} texts, lr {ms['lr']:g}; the result saved and read back "
            "before scoring (a storage re-applied on save). A table kept in a storage alone (dense+lowbit, int8) "
            "has no trainable tensors: recovery then trains the layers only." + _reruns(doc) + _rechecks(doc),
            "- SST-2 classifiers: DAN-RAND and LSTM as `scripts/sst2_recovery.py` trains them, seeds "
            + _seeds(doc) + "; test accuracy % as mean ± std over seeds, and "
            "relative to the uncompressed model of the same seed. Fine-tuning: "
            + "; ".join(f"{v['label']} {v['finetune_epochs']} epochs at lr {v['finetune_lr']:g} (Adam + CALR)"
                        for v in doc["models"].values()) + ".", ""]


def _refusals(by_reason: dict[str, list[str]]) -> list[str]:
    """One bullet per refusal message, naming every point it stopped."""
    return [f"- {', '.join(points)}: {why}" for why, points in by_reason.items()]


def _seeds(doc: dict[str, Any]) -> str:
    """The seeds run (per model when the models' runs were cut at different seeds)."""
    planned = doc["settings"]["seeds"]
    ran = {doc["models"][n]["label"]: c["summary"]["seeds"] for n, c in doc["classifiers"].items()}
    counts = {tuple(r) for r in ran.values()} or {tuple(planned)}
    if len(counts) == 1:
        text = ", ".join(map(str, next(iter(counts))))
    else:
        text = "; ".join(f"{label} {', '.join(map(str, r))}" for label, r in ran.items())
    if min(map(len, counts)) < len(planned):
        text += f" (cut from {len(planned)} seeds to hold the whole run near 40 min on 2 shared cores)"
    return text


def _kept_minilm(doc: dict[str, Any]) -> str:
    """Where the MiniLM figures come from when this run measured the classifiers only."""
    run = doc.get("minilm_run")
    if not run:
        return ""
    return (f" This run measured the classifiers only: the all-MiniLM-L6-v2 figures are kept from the run of "
            f"{run['date_utc']} (UTC, {run['wall_seconds'] / 60:.1f} min"
            + (" continuing an earlier one" if run.get("resumed") else "")
            + f", commit `{(run.get('git_commit') or 'unknown')[:12]}`).")


def _reruns(doc: dict[str, Any]) -> str:
    """The rows whose recovery was run again with more steps (``--only minilm-recovery``), and those runs."""
    runs = doc["minilm"].get("reruns") or []
    return "".join(
        f" Recovered with {r['steps']} steps by `--only minilm-recovery` on {r['date_utc']} (UTC, "
        f"{r['wall_seconds'] / 60:.1f} min, one process per row, commit `{(r.get('git_commit') or 'unknown')[:12]}`"
        + (" with uncommitted changes" if r.get("git_dirty") else "") + "): "
        + ", ".join(f"{k.split('/', 1)[1]} at {float(k.split('/')[0]):g}" for k in r["rows"])
        + "; each encoded again as the full run encodes it (" + _remeasured(doc, r["rows"])
        + "), and its earlier recovery's figures, where it had one, kept in its row."
        + (" **Quick smoke run: the figures mean nothing.**" if r.get("quick") else "")
        for r in runs)


def _rechecks(doc: dict[str, Any]) -> str:
    """The refused rows asked again of later code (``--only minilm-refusals``), and what came of it."""
    return "".join(
        f" The {len(r['rows'])} rows this run refused were asked again by `--only minilm-refusals` on "
        f"{r['date_utc']} (UTC, {r['wall_seconds'] / 60:.1f} min, commit `{(r.get('git_commit') or 'unknown')[:12]}`"
        + (" with uncommitted changes" if r.get("git_dirty") else "") + "): "
        + (", ".join(f"{k.split('/', 1)[1]} at {float(k.split('/')[0]):g}" for k in r["stored"]) + " now stored "
           "and measured as the full run measures a row (not recovered: the recovery plan is the full run's); "
           if r["stored"] else "none is stored by that code; ")
        + "the refusals shown give that code's reasons."
        + (" **Quick smoke run: the figures mean nothing.**" if r.get("quick") else "")
        for r in doc["minilm"].get("rechecks") or [])


def _remeasured(doc: dict[str, Any], rows: list[str]) -> str:
    """How far the rows encoded again score from the table's no-training cosine."""
    mm = doc["minilm"]
    gaps = [abs(mm["recovered"][k]["before_remeasured"] - mm["budgets"][k.split("/")[0]][k.split("/", 1)[1]]["mean"])
            for k in rows if "before_remeasured" in mm["recovered"].get(k, {})]
    return (f"its no-training cosine re-measured at most {max(gaps):.1e} from the table's, checked to "
            f"{REMEASURE_TOLERANCE:g}" if gaps else "its no-training cosine not re-measured")


def _steps(doc: dict[str, Any], rec: dict[str, Any]) -> int:
    """The steps a recovered figure had (records before ``steps`` was stored have the run's)."""
    return rec.get("steps", doc["minilm_settings"]["steps"])


def _fixed_label(p: dict[str, Any]) -> str:
    if p["method"] == "lowbit":
        return f"{p['bits']}-bit, groups of {GROUP}, asym" + (", refined" if p["refine"] else "")
    return {"int8": "int8 per row", "fp16": "fp16"}.get(p["method"], p["method"])


def _minilm_row(label: str, e: dict[str, Any], rec: dict[str, Any] | None, chosen: str = "") -> str:
    after = "- | - | -"
    if rec:
        earlier = "".join(f"; {r['steps']} steps: {r['mean']:.4f} (worst {r['worst']:.4f}) in "
                          f"{r['recovery_seconds'] / 60:.1f} min" for r in rec.get("earlier", []))
        steps = f"{rec['steps']} steps, " if earlier else ""
        after = (f"{rec['mean']:.4f} | {rec['worst']:.4f} | {steps}{rec['recovery_seconds'] / 60:.1f} min, "
                 f"{rec['trains']}{earlier}")
    return (f"| {label} | {chosen} | {e['fraction']:.4f} | {e['file_bytes'] / 1e6:.1f} MB | {e['mean']:.4f} | "
            f"{e['worst']:.4f} | {e['p05']:.4f} | {after} |")


MINILM_HEAD = ["| method | chose | table (x float32) | model file | mean cosine | worst | 5th pct. | mean after "
               "recovery | worst after | recovery |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]


def within(doc: dict[str, Any], limit: float, recovery: bool) -> list[tuple[str, float, float]]:
    """The MiniLM points whose table takes at most ``limit`` of its float32 bytes (recovered ones too when
    ``recovery``), best mean cosine first: (label, cosine, fraction)."""
    mm = doc["minilm"]
    cands = [(_fixed_label(p), p["mean"], p["fraction"], f"fixed/{key}")
             for key, p in mm["fixed"].items() if p.get("reached")]
    cands += [(f"{method} at {float(budget):g}", e["mean"], e["fraction"], f"{budget}/{method}")
              for budget, row in mm["budgets"].items() for method, e in row.items() if e["reached"]]
    out = []
    for label, cos, frac, key in cands:
        if frac > limit:
            continue
        out.append((label, cos, frac))
        rec = mm["recovered"].get(key)
        if recovery and rec:
            out += [(f"{label} + {_steps(doc, r)} steps of recovery", r["mean"],
                     r["table_bytes"] / mm["original"]["table_float32_bytes"]) for r in [rec, *rec.get("earlier", [])]]
    return sorted(out, key=lambda t: -t[1])


def render_minilm(doc: dict[str, Any]) -> str:
    mm = doc["minilm"]
    orig = mm["original"]
    lines = _header(doc, "Every method under one byte budget: all-MiniLM-L6-v2 and the SST-2 classifiers")
    lines += ["![mean cosine against table bytes](lowbit_minilm.png)", "",
              "## all-MiniLM-L6-v2: storages at their own sizes", "",
              f"The original: table {orig['table_float32_bytes'] / 1e6:.2f} MB in float32, model file "
              f"{orig['file_bytes'] / 1e6:.1f} MB.", "", *MINILM_HEAD]
    for key, p in mm["fixed"].items():
        lines.append(_minilm_row(_fixed_label(p), p, mm["recovered"].get(f"fixed/{key}")) if p.get("reached") else
                     f"| {_fixed_label(p)} | {p['why']} |" + " - |" * 8)
    for budget, row in mm["budgets"].items():
        lines += ["", f"## all-MiniLM-L6-v2 at {float(budget):g} of the table's float32 bytes", "", *MINILM_HEAD]
        unreached: dict[str, list[str]] = {}
        for method, e in row.items():
            if not e["reached"]:
                unreached.setdefault(e["why"], []).append(method)
                continue
            lines.append(_minilm_row(method, e, mm["recovered"].get(f"{budget}/{method}"), _chosen(e)))
        if unreached:
            lines += ["", "Not stored at this budget:", "", *_refusals(unreached)]
    if mm.get("left_out"):
        lines += ["", "Combinations not run: " + "; ".join(f"{k}: {v}" for k, v in mm["left_out"].items()) + "."]
    lines += ["", "## SST-2 classifiers at 0.05 and 0.02 of the table's bytes", ""]
    for name, c in doc["classifiers"].items():
        s = c["summary"]
        label = doc["models"][name]["label"]
        lines += [f"### {label}", "",
                  f"Uncompressed: {_pm(s['dense'])} %. Fine-tuned: the first seed's best on dev before fine-tuning "
                  f"({', '.join(c['finetuned'])}), then the same in every seed: with the labels, and toward the "
                  "uncompressed model's predictions with the labels unread (`finetune --teacher`, label weight 0); "
                  "a pq point also with its codes re-assigned (`finetune --teacher --reassign-codes`, "
                  f"{REASSIGN['epochs']} epochs, lr {REASSIGN['lr']:g} {REASSIGN['schedule']}, label weight "
                  f"{REASSIGN['label_weight']:g}, the same bytes: of seven settings tried on the LSTM at 0.02 "
                  f"({REASSIGN_TRIED}), the best mean dev accuracy over the three seeds; test unseen).",
                  "",
                  "| point | chose | table (x float32) | test % | vs uncompressed | test % fine-tuned | "
                  "vs uncompressed | test % distilled, no labels | vs uncompressed | test % codes re-assigned | "
                  "vs uncompressed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        unreached: dict[str, list[str]] = {}
        for key, e in s["points"].items():
            if not e["reached"]:
                unreached.setdefault(e["why"], []).append(key)
                continue
            lines.append(f"| {key} | {_chosen(e)} | {e['fraction']:.4f} | {_pm(e.get('before'))} | "
                         f"{_rel(e.get('before_relative'))} | {_pm(e.get('after'))} | "
                         f"{_rel(e.get('after_relative'))} | {_pm(e.get('distilled'))} | "
                         f"{_rel(e.get('distilled_relative'))} | {_pm(e.get('reassigned'))} | "
                         f"{_rel(e.get('reassigned_relative'))} |")
        if unreached:
            lines += ["", "Not stored (refused by the method, or over the budget):", "", *_refusals(unreached)]
        if "dense_recipe" in s:
            lines += ["", _recipe_line(s)]
        lines.append("")
    lines += ["## Targets (issue 16)", ""]
    for t in MINILM_TARGETS:
        ranked = within(doc, t["budget"], t["recovery"])
        how = "recovery allowed" if t["recovery"] else "without training"
        if not ranked:
            lines.append(f"- MiniLM at <= {t['budget']:g}, {how}: >= {t['cosine']}: **missed** (no method measured "
                         "at that size).")
            continue
        label, cos, frac = ranked[0]
        met = cos >= t["cosine"]
        lines.append(f"- MiniLM at <= {t['budget']:g} of the table bytes, {how}: mean cosine >= {t['cosine']}: "
                     + (f"**met**: {label}, {cos:.4f} at {frac:.4f}." if met else
                        f"**missed** by {t['cosine'] - cos:.4f}: the best is {label}, {cos:.4f} at {frac:.4f}. "
                        + _why_missed(doc, t)) + _recovery_moves(doc, t))
    for name, c in doc["classifiers"].items():
        lines.append(_classifier_target(doc, name, c))
    lines += ["- Not measured here: the ONNX export of the whole model (`export --quantize int4`, "
              "docs/results/int4_minilm.md) and product quantization's speed and ONNX latency, stored and "
              "`--decode-at-load` (`bench/codebooks.py`, `bench/quantize.py`).", ""]
    return "\n".join(lines)


def _why_missed(doc: dict[str, Any], t: dict[str, Any]) -> str:
    """The measured reasons a MiniLM target is missed: what cannot reach the size, the runners-up, and what
    recovery gave in the steps it had."""
    mm = doc["minilm"]
    row = mm["budgets"].get(str(t["budget"])) or {}
    gone = [m for m, e in row.items() if e["reached"] is False]
    text = f"{', '.join(gone)} cannot be sized to {t['budget']:g}. " if gone else ""
    return text + "Next best: " + "; ".join(f"{label} {cos:.4f} at {frac:.4f}"
                                            for label, cos, frac in within(doc, t["budget"], t["recovery"])[1:4]) + "."


def _recovery_moves(doc: dict[str, Any], t: dict[str, Any]) -> str:
    """What recovery gave at a target's budget, for each number of steps it ran."""
    mm = doc["minilm"]
    row = mm["budgets"].get(str(t["budget"])) or {}
    gains = [(k.split("/", 1)[1], row[k.split("/", 1)[1]]["mean"], sorted([r, *r.get("earlier", [])],
                                                                         key=lambda x: _steps(doc, x)))
             for k, r in mm["recovered"].items() if k.startswith(f"{t['budget']}/")]
    if not t["recovery"] or not gains:
        return ""
    longer = any(len(rs) > 1 for _, _, rs in gains)
    return (" Recovery moved " + ", ".join(
        f"{m} from {a:.4f} to " + " and ".join(f"{r['mean']:.4f} in {_steps(doc, r)} steps "
                                              f"({r['recovery_seconds'] / 60:.1f} min)" for r in rs)
        for m, a, rs in gains)
        + ("." if longer else "; a longer recovery was not run (the whole run is held near 40 min on 2 shared "
                              "cores)."))


def _recipe_line(s: dict[str, Any]) -> str:
    """The uncompressed model fine-tuned with the code re-assignment's recipe, and each re-assigned point against
    it: how much of that point's gain the longer training alone would give."""
    against = [f"{key} {100 * e['reassigned_vs_recipe']['mean']:+.2f} % (seeds "
               + ", ".join(f"{100 * v:+.2f}" for v in e["reassigned_vs_recipe"]["values"]) + ")"
               for key, e in s["points"].items() if e.get("reassigned_vs_recipe")]
    return (f"The uncompressed model fine-tuned with the same recipe ({REASSIGN['epochs']} epochs, lr "
            f"{REASSIGN['lr']:g} {REASSIGN['schedule']}, itself as the teacher at label weight "
            f"{REASSIGN['label_weight']:g}): {_pm(s['dense_recipe'])} %; the codes re-assigned against it: "
            + "; ".join(against) + ".")


def _classifier_target(doc: dict[str, Any], name: str, c: dict[str, Any]) -> str:
    s, label = c["summary"], doc["models"][name]["label"]
    limit, bar = CLASSIFIER_TARGET["budget"], CLASSIFIER_TARGET["relative"]
    cands = []
    for key, e in s["points"].items():
        if e["reached"] and e["fraction"] <= limit:
            for stage in STAGES:
                if e.get(f"{stage}_relative"):
                    cands.append((e[f"{stage}_relative"]["mean"], key, stage, e))
    if not cands:
        return f"- {label} at <= {limit:g}: **missed** (nothing measured at that size)."
    rel, key, stage, e = max(cands, key=lambda x: x[0])
    how = STAGES[stage]
    what = f"{key} {how}: {_pm(e[stage])} % " \
           f"({100 * rel:+.2f} % relative) at {e['fraction']:.4f}"
    if stage == "reassigned" and e.get("reassigned_vs_recipe"):
        what += (" (per seed " + ", ".join(f"{100 * v:+.2f} %" for v in e["reassigned_relative"]["values"])
                 + "; against the uncompressed model fine-tuned with the same recipe, "
                 f"{100 * e['reassigned_vs_recipe']['mean']:+.2f} %)")
    if rel >= bar:
        return f"- {label} at <= {limit:g} of the table bytes, within 1 % relative accuracy: **met**: {what}."
    return (f"- {label} at <= {limit:g} of the table bytes, within 1 % relative accuracy: **missed** by "
            f"{100 * (bar - rel):.2f} points of relative accuracy: the best is {what}; fine-tuning ran "
            f"{REASSIGN['epochs'] if stage == 'reassigned' else doc['models'][name]['finetune_epochs']} epochs on "
            "the methods the first seed ranked best on dev.")


def render_lowbit(doc: dict[str, Any]) -> str:
    mm = doc["minilm"]
    lines = _header(doc, "Low-bit tables: all-MiniLM-L6-v2 and the SST-2 classifiers at 2, 3 and 4 bits")
    lines += ["![quality against table bytes](lowbit.png)", "",
              "## all-MiniLM-L6-v2", "", *MINILM_HEAD]
    for key, p in mm["fixed"].items():
        lines.append(_minilm_row(_fixed_label(p), p, mm["recovered"].get(f"fixed/{key}"),
                                 f"rel. error {p['rel_error']:.3f}") if p.get("reached") else
                     f"| {_fixed_label(p)} | {p['why']} |" + " - |" * 8)
    lines += ["", "## SST-2 classifiers (groups of 32, asymmetric, refined)", "",
              "| model | bits | table (x float32) | test % | vs uncompressed | test % fine-tuned | vs uncompressed |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, c in doc["classifiers"].items():
        s = c["summary"]
        label = doc["models"][name]["label"]
        lines.append(f"| {label} | 32 (uncompressed) | 1 | {_pm(s['dense'])} | - | - | - |")
        for key, e in s["points"].items():
            if not e["reached"]:
                lines.append(f"| {label} | {key[len('lowbit')]} | refused: {e['why']} | - | - | - | - |")
                continue
            lines.append(f"| {label} | {e['storage_config'].get('bits')} | {e['fraction']:.4f} | "
                         f"{_pm(e.get('before'))} "
                         f"| {_rel(e.get('before_relative'))} | {_pm(e.get('after'))} | "
                         f"{_rel(e.get('after_relative'))} |")
    lines += ["", "A table in a storage alone has no trainable tensors: fine-tuning (2 bits) trains the layers "
              "above it." + _padding(doc), "",
              "## Targets (issue 15) measured here", ""]
    two, two_r = mm["fixed"].get("lowbit2"), mm["fixed"].get("lowbit2r")
    if two:
        lines.append(f"- 2-bit table, groups of 32, fp16 scale and zero point, at <= 0.094 of its float32 bytes: "
                     f"{'**met**' if two['fraction'] <= 0.094 else '**missed**'} ({two['fraction']:.4f}).")
    if two and two_r:
        better = two_r["rel_error"] < two["rel_error"]
        lines.append(f"- With refinement, the 2-bit relative error on MiniLM's table below plain min/max's: "
                     f"{'**met**' if better else '**missed**'} ({two_r['rel_error']:.4f} against "
                     f"{two['rel_error']:.4f}).")
    lines += ["- The other targets (quantization time and memory, ONNX latency and parity, `export --quantize`) are "
              "benchmarks: `bench/quantize.py`, docs/benchmarks_quantize.md.", ""]
    return "\n".join(lines)


def _padding(doc: dict[str, Any]) -> str:
    """How the classifiers' tables were padded to whole groups (a dimension no group of GROUP divides); for pages
    written before the storage padded (their JSON has no table shapes), why their rows were refused."""
    if doc["classifiers"] and not any("shape" in c["summary"] for c in doc["classifiers"].values()):
        return (" The lowbit storage refuses a dimension no power-of-2 group of at least 16 divides (onnxruntime's "
                "GatherBlockQuantized rule; it does not pad): the 300-d DAN and 50-d LSTM tables are such, so their "
                "rows say so.")
    config = LowBitConfig(group_size=GROUP)
    padded = [(doc["models"][n]["label"], c["summary"]["shape"][1]) for n, c in doc["classifiers"].items()
              if c["summary"].get("shape") and c["summary"]["shape"][1] % GROUP]
    if not padded:
        return ""
    return (" " + "; ".join(f"{label}'s {d}-d rows are stored padded to {config.width(d)} values "
                            f"({config.groups(d)} groups)" for label, d in padded)
            + f": no group of {GROUP} divides them, so the last group of a row holds zeros after its real values "
            "(decoded and dropped exactly, never served), and the table's size counts the padded bytes.")


RENDER = {"lowbit": render_lowbit, "lowbit_minilm": render_minilm}


def _plot_minilm(ax: Any, doc: dict[str, Any], everything: bool) -> None:
    """1 - mean cosine against table bytes, both on log scales: the near-lossless and the broken points both show."""
    mm = doc["minilm"]
    floor = 1e-5
    fixed = [p for p in mm["fixed"].values() if p.get("reached")]
    ax.plot([p["fraction"] for p in fixed], [max(floor, 1 - p["mean"]) for p in fixed], "s", color="black",
            label="storage alone")
    if everything:
        for method in mm["methods"]:
            pts = [(e["fraction"], max(floor, 1 - e["mean"])) for row in mm["budgets"].values()
                   for m, e in row.items() if m == method and e["reached"]]
            if pts:
                ax.plot(*zip(*sorted(pts)), "o-", label=method, alpha=0.8)
    rec = [(r["table_bytes"] / mm["original"]["table_float32_bytes"], max(floor, 1 - r["mean"]))
           for k, r in mm["recovered"].items() if everything or k.startswith("fixed/")]
    if rec:
        ax.plot(*zip(*rec), "*", color="red", markersize=11, label="after recovery")
    for t in MINILM_TARGETS:
        ax.plot([t["budget"]], [1 - t["cosine"]], "x", color="gray", markersize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("table bytes / float32 bytes")
    ax.set_ylabel("1 - mean cosine to the original (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot(doc: dict[str, Any], path: Path, everything: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _plot_minilm(axes[0], doc, everything)
    axes[0].set_title("all-MiniLM-L6-v2 (x: the issue 16 targets)")
    drawn = False
    for name, c in doc["classifiers"].items():
        pts = sorted((e["fraction"], e["before"]["mean"]) for e in c["summary"]["points"].values()
                     if e.get("reached") and e.get("before"))
        ft = sorted((e["fraction"], e["after"]["mean"]) for e in c["summary"]["points"].values()
                    if e.get("reached") and e.get("after"))
        if not pts:
            continue
        drawn = True
        line = axes[1].plot(*zip(*pts), "o", label=f"{doc['models'][name]['label']}", alpha=0.7)[0]
        if ft:
            axes[1].plot(*zip(*ft), "*", color=line.get_color(), markersize=11,
                         label=f"{doc['models'][name]['label']} fine-tuned")
        axes[1].axhline(c["summary"]["dense"]["mean"], color=line.get_color(), linestyle=":", linewidth=1)
    if drawn:
        axes[1].set_xscale("log")
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "no point: the storage refused these tables", ha="center", transform=axes[1].transAxes)
    axes[1].set_xlabel("table bytes / float32 bytes")
    axes[1].set_ylabel("SST-2 test accuracy (mean over seeds; dotted: uncompressed)")
    axes[1].set_title("SST-2 classifiers")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOT = {"lowbit": lambda doc, path: _plot(doc, path, False),
        "lowbit_minilm": lambda doc, path: _plot(doc, path, True)}


if __name__ == "__main__":
    sys.exit(main())
