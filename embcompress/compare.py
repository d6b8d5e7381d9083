"""``compare``: every way of shrinking a model's tables, measured on the user's texts, with its Pareto front.

:func:`compare_model` is the command: for every model family (a Hugging Face encoder folder or an embcompress
classifier) the rows of :func:`embcompress.sweep.sweep` (every registered method and combination at each byte
budget, in memory, scored on ``--data``), and for a classifier given ``--train`` also the rows of the paper's
protocol, :func:`compare` (Tables 2 and 4): ``quant16`` and ``quant8`` (``quantize``); ``svd`` (factorized, not
retrained); ``proposed`` (factorized, then fine-tuned with CALR: the paper's method); ``proposed+int8`` (that model
quantized to int8); ``groupreduce`` (asked for by name: GroupReduce blocks from the token counts of ``--train``,
then the same fine-tuning); ``offline`` (the paper's baseline 2: the initial embedding compressed before training,
the SVD of the ``--init-vectors`` or a random low-rank table for DAN-RAND, trained for the uncompressed model's
epochs plus the fine-tuning's); and ``fair`` (the uncompressed model trained for those same epochs, so that a
compressed row that beats the original is not credited with what the extra epochs bought). Each protocol row is
written to the work folder, scored on the same data, measured on disk and, unless ``latency`` is off, timed in
onnxruntime at batch 1 and 64. The Pareto front is marked over all rows; the outputs (Markdown, CSV, JSON, PNG and
a ``compare.log`` of the progress) go to one folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import families, sweep
from .checkpoint import atomic_path, check_finite_tensors, check_output, load_checkpoint, save_text
from .classifier import load_classifier
from .data import collate, read_jsonl
from .errors import InputError
from .export import measure_latency
from .ops.export import export_onnx
from .factorize import factorize
from .quant import quantize
from .rank import rank_for_reduction
from .sweep import Row, SweepResult
from .train.loop import TrainConfig, evaluate, resolve_device
from .train.run import FINETUNE_DEFAULTS, finetune_classifier, train_classifier
from .weighting import count_corpus

DEFAULT_BASELINES = ("quant8", "quant16", "offline", "svd", "proposed+int8", "fair")
BASELINES = (*DEFAULT_BASELINES, "groupreduce")  # groupreduce costs one more fine-tuning per R: asked for by name
LATENCY_BATCHES = (1, 64)


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
    needs_training = bool({"offline", "groupreduce", "fair"} & set(baselines)) or any(r not in reuse for r in reductions)
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

    table_f32 = 4 * base.model.embedding.weight.numel()

    def add(method: str, reduction: float | None, checkpoint: Path, quantized: str | None = None,
            note: str = "") -> None:
        acc = base_acc if checkpoint == src else accuracy(checkpoint)
        lat, onnx_path = timed(checkpoint, checkpoint.name.removesuffix(".safetensors"), quantized)
        table = _table_bytes(checkpoint)
        rows.append(Row(method, table / table_f32, table, _size(checkpoint), acc,
                        math.sqrt(max(acc * (1 - acc), 0.0) / max(1, len(test_ds))),
                        recovered=method in TRAINED, accuracy=acc,
                        relative_change=(acc - base_acc) / base_acc if base_acc else 0.0, reduction=reduction,
                        latency_ms=lat, checkpoint=str(checkpoint), onnx=onnx_path, note=note))

    add("uncompressed", None, src)
    if "fair" in baselines:
        say(f"fair: training the uncompressed model {train_epochs + ft_epochs} epochs")
        out = work / "fair.safetensors"
        _retrain(base, train, dev, out, train_epochs + ft_epochs, seed, device)
        add("fair", None, out, note=f"the uncompressed model trained {train_epochs} + {ft_epochs} epochs, as the "
                                    "compressed rows")
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
            _retrain(base, train, dev, out, epochs, seed, device, initial_rank=k)
            init = "SVD of the initial vectors" if train_cfg.get("init_vectors") else "random low-rank table"
            add("offline", r, out, note=f"{init}, {epochs} epochs")
    settings = {"baselines": baselines, "reductions": reductions, "finetune_epochs": ft_epochs, "finetune_lr": ft_lr,
                "train_epochs": train_epochs, "train": str(train) if train else None, "dev": str(dev) if dev else None,
                "latency_batches": list(LATENCY_BATCHES), "latency_tokens": {b: list(f["input_ids"].shape)
                                                                             for b, f in batches.items()},
                "repeats": repeats, "threads": threads, "work_dir": str(work), "seed": seed}
    return CompareResult(str(src), str(data), base_acc, rows, settings, time.perf_counter() - started)


TRAINED = ("proposed", "proposed+int8", "groupreduce", "offline", "fair")  # rows trained beyond the original


def _retrain(base: Any, train: Any, dev: Any, out: Path, epochs: int, seed: int, device: str,
             initial_rank: int | None = None) -> None:
    """Train the base classifier's architecture again from the start, as it was trained, for ``epochs``."""
    cfg, train_cfg = base.model.config, base.train or {}
    train_classifier(train, dev, out, arch=cfg["arch"], embed_dim=cfg["embed_dim"],
                     hidden_dim=cfg.get("hidden_dim", 150), dropout=cfg.get("dropout", 0.4),
                     min_count=int(train_cfg.get("min_count") or 1), init_vectors=train_cfg.get("init_vectors"),
                     initial_rank=initial_rank, force=True,
                     config=TrainConfig(epochs=epochs, lr=float(train_cfg.get("lr") or TrainConfig.lr), seed=seed,
                                        device=device))


def _table_bytes(path: Path, module: str = "embedding") -> int:
    """Bytes of a classifier file's table tensors (factors, groups, scales included)."""
    with load_checkpoint(path) as ckpt:
        return sum(i.nbytes for n, i in ckpt.infos.items() if n.split(".")[0] == module)


OUTPUTS = {"markdown": "compare.md", "csv": "compare.csv", "json": "compare.json", "plot": "compare.png"}
LOG_NAME = "compare.log"


def default_output(model: Path) -> Path:
    """``<model name>.compare`` in the current folder."""
    return Path.cwd() / f"{model.name.removesuffix(model.suffix) if model.is_file() else model.name}.compare"


def compare_model(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    budgets: list[str] | None = None,
    methods: str | list[str] | None = None,
    recover: int = 0,
    limit: int | None = None,
    train: str | os.PathLike[str] | None = None,
    dev: str | os.PathLike[str] | None = None,
    baselines: list[str] | None = None,
    reductions: list[float] | None = None,
    finetune_epochs: int | None = None,
    finetune_lr: float | None = None,
    reuse: dict[float, Path] | None = None,
    latency: bool = True,
    repeats: int = 20,
    threads: int | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """The whole ``compare``: the sweep's rows and, for a classifier with ``train`` (or ``reuse``), the protocol's;
    the front over all of them; the outputs written to ``output`` (a folder; ``OUTPUTS`` and ``LOG_NAME``). Every
    input is checked before the folder is created; an existing folder is replaced only with ``force``."""
    started = time.perf_counter()
    src = Path(model_path)
    out = Path(output) if output is not None else default_output(src)
    check_output(out, [src, Path(data)] + [Path(p) for p in (train, dev) if p is not None], force=force)
    protocol = families.detect(src).protocol and (train is not None or baselines is not None)
    if protocol:
        baselines = parse_baselines(baselines)
        reductions = parse_reductions(reductions)
    log: list[TextIO] = []

    def say(message: str) -> None:
        if log:
            log[0].write(f"{time.strftime('%H:%M:%S')} {message}\n")
            log[0].flush()
        if progress:
            progress(message)

    def ready() -> None:
        out.mkdir(parents=True, exist_ok=True)
        log.append(open(out / LOG_NAME, "w", encoding="utf-8"))

    try:
        result = sweep.sweep(src, data, budgets=budgets, methods=methods, recover=recover, train=train, dev=dev,
                             limit=limit, latency=latency, threads=threads, cache_dir=sweep.cache_folder(out),
                             device=device, seed=seed, progress=say, ready=ready)
        if protocol:
            say("the paper's protocol rows")
            old = compare(src, data=data, train=train, dev=dev, baselines=baselines, reductions=reductions,
                          finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, work_dir=out / "work",
                          reuse=reuse, latency=latency, repeats=repeats, threads=threads, device=device, seed=seed,
                          progress=say)
            result.rows += [r for r in old.rows if r.method != sweep.UNCOMPRESSED]
            result.settings["protocol"] = {k: v for k, v in old.settings.items() if k != "latency_tokens"}
            sweep.mark_front(result.rows)
        result.seconds = time.perf_counter() - started
        say(f"writing {out}")
        write_outputs(result, out)
    finally:
        if log:
            log[0].close()
    return result


def write_outputs(result: SweepResult, out: Path, *, title: str | None = None) -> dict[str, Path]:
    """Markdown, CSV, JSON and the plot into the folder ``out`` (each file atomically)."""
    paths = {k: out / v for k, v in OUTPUTS.items()}
    save_text(sweep.to_markdown(result, title=title), paths["markdown"])
    save_text(sweep.to_csv(result), paths["csv"])
    save_text(json.dumps(result.to_dict(), indent=1) + "\n", paths["json"])
    with atomic_path(paths["plot"]) as tmp:
        sweep.plot(result, tmp, title=title)
    return paths
