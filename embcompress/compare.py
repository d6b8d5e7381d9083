"""One run, one table: what each way of shrinking a classifier costs in size, accuracy and latency.

Rows (the paper's Tables 2 and 4): the uncompressed model; ``quant16`` and ``quant8`` (``quantize``); ``svd``
(factorized, not retrained); ``proposed`` (factorized, then fine-tuned with CALR: the paper's method);
``proposed+int8`` (that model quantized to int8: low rank and fixed point combined); ``groupreduce`` (asked for
by name: GroupReduce blocks from the token counts of ``--train`` instead of the plain SVD, then the same
fine-tuning as proposed); ``offline``
(the paper's baseline 2: the initial embedding compressed before training, the SVD of the ``--init-vectors`` or a
random low-rank table for DAN-RAND, then trained with the same epoch budget as uncompressed training plus
fine-tuning). Each row is scored on the same data, its checkpoint measured on disk, and its ONNX graph timed in
onnxruntime at batch 1 and 64 (median of repeated runs).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import check_finite_tensors
from .classifier import load_classifier
from .data import collate, read_jsonl
from .errors import DependencyError, InputError
from .export import export_onnx, make_session
from .factorize import factorize
from .quant import quantize
from .rank import rank_for_reduction
from .train.loop import TrainConfig, evaluate, resolve_device
from .train.run import FINETUNE_DEFAULTS, finetune_classifier, train_classifier
from .weighting import count_corpus

DEFAULT_BASELINES = ("quant8", "quant16", "offline", "svd", "proposed+int8")
BASELINES = (*DEFAULT_BASELINES, "groupreduce")  # groupreduce costs one more fine-tuning per R: asked for by name
LATENCY_BATCHES = (1, 64)


@dataclass
class Row:
    """One way of shrinking the model, measured."""

    method: str
    reduction: float | None
    size_bytes: int
    accuracy: float
    relative_change: float
    latency_ms: dict[int, float | None]
    checkpoint: str
    onnx: str | None = None
    note: str = ""


@dataclass
class CompareResult:
    model: str
    data: str
    baseline_accuracy: float
    rows: list[Row]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_baselines(text: str | list[str] | None) -> list[str]:
    """``"quant8,quant16"`` -> ``["quant8", "quant16"]``, refusing unknown names."""
    if not text:
        return list(DEFAULT_BASELINES)
    names = [b.strip() for part in ([text] if isinstance(text, str) else text) for b in part.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise InputError(f"--baselines: unknown {', '.join(bad)} (known: {', '.join(BASELINES)})")
    return names


def parse_reductions(text: str | list[float] | None) -> list[float]:
    """``"0.5,0.9"`` -> ``[0.5, 0.9]``, each in (0, 1)."""
    if text is None:
        return [0.5, 0.9]
    values = [float(x) for x in text.split(",") if x.strip()] if isinstance(text, str) else list(text)
    for r in values:
        if not 0.0 < r < 1.0:
            raise InputError(f"--reductions: each must be strictly between 0 and 1, got {r}")
    return values


def measure_latency(onnx_path: Path, batches: dict[int, dict[str, np.ndarray]], *, repeats: int = 20,
                    threads: int | None = None) -> dict[int, float]:
    """Median milliseconds per batch of an onnxruntime session, after warm-up, for each batch size."""
    session = make_session(onnx_path, device="cpu", threads=threads)
    out = {}
    for size, feeds in batches.items():
        for _ in range(3):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[size] = 1000 * statistics.median(times)
    return out


def _latency_batches(model_path: Path, data: Path, sizes: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    clf = load_classifier(model_path)
    ds = clf.encode(read_jsonl(data))
    batches = {}
    for size in sizes:
        items = [ds[i % len(ds)] for i in range(size)]
        batch = collate(items)
        batches[size] = {"input_ids": batch.ids.numpy()}  # the graph derives lengths from the padding
    return batches


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def compare(
    model_path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str],
    train: str | os.PathLike[str] | None = None,
    dev: str | os.PathLike[str] | None = None,
    baselines: list[str] | None = None,
    reductions: list[float] | None = None,
    finetune_epochs: int | None = None,
    finetune_lr: float | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    reuse: dict[float, Path] | None = None,
    latency: bool = True,
    repeats: int = 20,
    threads: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Build and measure every row. ``finetune_epochs`` and ``finetune_lr`` (CALR's peak) set the proposed rows'
    fine-tuning (defaults: ``FINETUNE_DEFAULTS``); the offline rows train for the uncompressed model's epochs plus
    ``finetune_epochs``, so both get the same budget. ``reuse`` maps a reduction to an already fine-tuned model (the proposed row)
    so it is not trained again. Artifacts go to ``work_dir`` (default ``<model>.compare/`` beside the model)."""
    started = time.perf_counter()
    say = progress or (lambda _m: None)
    src, data = Path(model_path), Path(data)
    baselines = parse_baselines(baselines)
    reductions = parse_reductions(reductions)
    reuse = dict(reuse or {})
    ft_epochs = finetune_epochs or FINETUNE_DEFAULTS["epochs"]
    ft_lr = finetune_lr or FINETUNE_DEFAULTS["lr"]
    if ft_epochs < 1 or ft_lr <= 0:
        raise InputError(f"fine-tuning needs at least one epoch and a positive rate, got {ft_epochs} and {ft_lr:g}")
    base = load_classifier(src)
    if base.is_factorized:
        raise InputError(f"{src}: already factorized; compare starts from the uncompressed classifier")
    check_finite_tensors(base.model.state_dict().items(), action="compare it")
    needs_training = bool({"offline", "groupreduce"} & set(baselines)) or any(r not in reuse for r in reductions)
    if needs_training and train is None:
        raise InputError("compare needs --train (training examples) for the proposed and offline rows")
    test_ds = base.encode(read_jsonl(data))  # every input is read and checked before the work folder exists
    for extra in (train, dev):
        if extra is not None:
            base.encode(read_jsonl(extra))
    work = Path(work_dir) if work_dir is not None else src.with_name(src.name.removesuffix(src.suffix) + ".compare")
    work.mkdir(parents=True, exist_ok=True)
    dev_device = resolve_device(device)
    train_cfg = base.train or {}
    train_epochs = int(train_cfg.get("epochs") or TrainConfig.epochs)
    batches = _latency_batches(src, data, LATENCY_BATCHES) if latency else {}

    def accuracy(path: Path) -> float:
        clf = load_classifier(path)
        return evaluate(clf.model.to(dev_device), test_ds, dev_device).accuracy

    def timed(path: Path, name: str, quantized: str | None = None) -> tuple[dict[int, float | None], str | None]:
        if not latency:
            return {b: None for b in LATENCY_BATCHES}, None
        onnx_path = work / f"{name}.onnx"
        say(f"{name}: exporting to ONNX and timing")
        export_onnx(path, onnx_path, quantize=quantized, data=data, device="cpu", force=True, threads=threads)
        return measure_latency(onnx_path, batches, repeats=repeats, threads=threads), str(onnx_path)

    rows: list[Row] = []
    say("uncompressed: scoring")
    base_acc = accuracy(src)

    def add(method: str, reduction: float | None, checkpoint: Path, quantized: str | None = None,
            note: str = "") -> None:
        acc = base_acc if checkpoint == src else accuracy(checkpoint)
        lat, onnx_path = timed(checkpoint, checkpoint.name.removesuffix(".safetensors"), quantized)
        rows.append(Row(method, reduction, _size(checkpoint), acc, (acc - base_acc) / base_acc if base_acc else 0.0,
                        lat, str(checkpoint), onnx_path, note))

    add("uncompressed", None, src)
    for bits, name in ((16, "quant16"), (8, "quant8")):
        if name in baselines:
            say(f"{name}: quantizing")
            out = work / f"{name}.safetensors"
            quantize(src, bits, out, force=True)
            add(name, None, out, "fp16" if bits == 16 else "int8")
    V, d = base.model.embedding.weight.shape
    for r in reductions:
        k = rank_for_reduction(V, d, r)
        tag = f"r{round(r * 100)}"
        say(f"svd {tag}: factorizing")
        factorized = Path(factorize(src, reduction=r, output=work / f"svd.{tag}.safetensors", force=True).output)
        if "svd" in baselines:
            add("svd", r, factorized)
        if r in reuse:
            add("proposed", r, Path(reuse[r]), note="reused from the workspace record")
        else:
            say(f"proposed {tag}: fine-tuning {ft_epochs} epochs with CALR")
            out = work / f"proposed.{tag}.safetensors"
            finetune_classifier(factorized, train, dev, out, force=True,
                                config=TrainConfig(epochs=ft_epochs, lr=ft_lr, seed=seed,
                                                   device=device))
            add("proposed", r, out, note=f"{ft_epochs} fine-tuning epochs, peak lr {ft_lr:g}")
        if "proposed+int8" in baselines:
            say(f"proposed+int8 {tag}: quantizing the proposed model")
            proposed = Path(reuse[r]) if r in reuse else work / f"proposed.{tag}.safetensors"
            q = work / f"proposed.{tag}.int8.safetensors"
            quantize(proposed, 8, q, force=True)
            add("proposed+int8", r, q, "int8", note="the proposed model, then int8 (factors included)")
        if "groupreduce" in baselines:
            say(f"groupreduce {tag}: factorizing by blocks, fine-tuning {ft_epochs} epochs with CALR")
            counts = count_corpus(src, train, V)
            grouped = factorize(src, reduction=r, method="groupreduce", counts=counts,
                                output=work / f"groupreduce.{tag}.safetensors", force=True)
            out = work / f"groupreduce.{tag}.ft.safetensors"
            finetune_classifier(Path(grouped.output), train, dev, out, force=True,
                                config=TrainConfig(epochs=ft_epochs, lr=ft_lr, seed=seed, device=device))
            ranks = grouped.tables[0].blocks["ranks"]
            add("groupreduce", r, out, note=f"{len(ranks)} blocks, ranks {ranks}; then as proposed")
        if "offline" in baselines:
            say(f"offline {tag}: training a rank-{k} table from the start")
            out = work / f"offline.{tag}.safetensors"
            epochs = train_epochs + ft_epochs
            cfg = base.model.config
            train_classifier(train, dev, out, arch=cfg["arch"], embed_dim=d, hidden_dim=cfg.get("hidden_dim", 150),
                             dropout=cfg.get("dropout", 0.4), min_count=int(train_cfg.get("min_count") or 1),
                             init_vectors=train_cfg.get("init_vectors"), initial_rank=k, force=True,
                             config=TrainConfig(epochs=epochs, lr=float(train_cfg.get("lr") or TrainConfig.lr),
                                                seed=seed, device=device))
            init = "SVD of the initial vectors" if train_cfg.get("init_vectors") else "random low-rank table"
            add("offline", r, out, note=f"{init}, {epochs} epochs")
    settings = {"baselines": baselines, "reductions": reductions, "finetune_epochs": ft_epochs, "finetune_lr": ft_lr,
                "train_epochs": train_epochs, "train": str(train) if train else None, "dev": str(dev) if dev else None,
                "latency_batches": list(LATENCY_BATCHES), "latency_tokens": {b: list(f["input_ids"].shape)
                                                                             for b, f in batches.items()},
                "repeats": repeats, "threads": threads, "work_dir": str(work), "seed": seed}
    return CompareResult(str(src), str(data), base_acc, rows, settings, time.perf_counter() - started)


def to_csv(result: CompareResult) -> str:
    """The table as CSV (one row per method)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "R", "size_MB", "accuracy", "relative_change", "latency_ms_b1", "latency_ms_b64",
                     "note"])
    for row in result.rows:
        writer.writerow([row.method, row.reduction, f"{row.size_bytes / 1e6:.4f}", f"{row.accuracy:.4f}",
                         f"{row.relative_change:.4f}", _ms(row.latency_ms.get(1)), _ms(row.latency_ms.get(64)),
                         row.note])
    return buf.getvalue()


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def to_markdown(result: CompareResult) -> str:
    """The table as a Markdown page section."""
    lines = [f"Model `{result.model}`, scored on `{result.data}`.", "",
             "| method | R | size (MB) | accuracy | relative change | latency b=1 (ms) | latency b=64 (ms) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result.rows:
        r = f"{100 * row.reduction:.0f} %" if row.reduction is not None else "-"
        lines.append(f"| {row.method} | {r} | {row.size_bytes / 1e6:.2f} | {100 * row.accuracy:.2f} % | "
                     f"{100 * row.relative_change:+.2f} % | {_ms(row.latency_ms.get(1)) or '-'} | "
                     f"{_ms(row.latency_ms.get(64)) or '-'} | {row.note} |")
    return "\n".join(lines) + "\n"


def plot(result: CompareResult, path: Path) -> None:
    """Accuracy against size on disk, one marker per row."""
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("--plot needs matplotlib: pip install matplotlib (it is in the [dev] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in result.rows:
        label = row.method + (f" R={100 * row.reduction:.0f}%" if row.reduction is not None else "")
        ax.scatter(row.size_bytes / 1e6, 100 * row.accuracy, label=label)
        ax.annotate(label, (row.size_bytes / 1e6, 100 * row.accuracy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(Path(result.model).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
