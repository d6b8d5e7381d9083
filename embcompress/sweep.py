"""Every registered method at every byte budget, measured on the user's texts: the rows ``compare`` and
``compress --method auto`` share.

For one model (a Hugging Face encoder folder or an embcompress classifier) and a budget list (fractions of the
tables' float32 bytes, or sizes), each candidate (every structure alone, every storage alone, every structure with
every storage: ``svd+int8``, ``groupreduce+lowbit`` ...) is sized with :func:`core.spec_for_budget`, encoded in memory
on a copy of the loaded model (:func:`core.compress_`) and scored: for an encoder the cosine of its mean-pooled
sentence embeddings to the original's (mean, worst, 5th percentile) and, when the texts carry labels, the accuracy
of a linear probe (logistic regression on the embeddings, a seeded train/test split of the texts) beside the
original's; for a classifier its accuracy. A candidate that cannot be sized or encoded at a budget is a row that
says why, not an error. Bytes: the tables' stored tensors and the whole file's tensors (the safetensors header
excluded), computed from the tensors the file would hold, without writing. Recovery (``recover`` steps, opt-in):
label-free distillation toward the original (:mod:`embcompress.distill`) for encoders, fine-tuning on ``train``
for classifiers; tables kept in a storage are sent through it again afterwards, so the scored model is what a file
would hold. The original's sentence embeddings are cached in ``cache_dir`` under the hash of the model's files,
the texts' file and the settings, so ``compare`` and ``auto`` embed the original once; each measured row is
cached there too (:class:`RowCache`: its encoded tables and its figures, keyed by the model, the texts, the token
counts, the method's resolved configuration, the budget and the tool), so ``compress --method auto`` after
``compare`` neither encodes nor measures again, and writes the chosen row's tables as they were measured.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import core, families, hf
from .families import CLASSIFIER, ENCODER
from ._version import __version__
from .checkpoint import check_finite_tensors, load_checkpoint, save_safetensors, temporary_folder
from .classifier import load_classifier
from .data import read_jsonl
from .distill import DistillConfig, distill_model
from .errors import DataError, DependencyError, EmbcompressError, InputError
from .export.onnx import folds_at_load
from .methods.base import STORAGE, STRUCTURE, Table, registered
from .ops.compress import parse_budget
from .tables import find_embeddings
from .train.loop import TrainConfig, evaluate, fit
from .train.run import FINETUNE_DEFAULTS
from .weighting import load_counts
from .workspace import sha256_of

UNCOMPRESSED = "uncompressed"
DEFAULT_BUDGETS = (0.25, 0.1, 0.05, 0.03)
CACHE_NAME = ".embcompress-cache"
PROBE_TRAIN = 0.7  # the share of labelled texts the linear probe is fitted on; the rest scores it
# label-free recovery of an encoder: the layer phase through the first block (the cheapest per step), as the demo
RECOVERY = {"layers": 1, "lr": 4e-3}


def cache_folder(out: Path | None) -> Path:
    """Where compare and ``compress --method auto`` keep their cache (the original's embeddings, measured rows):
    beside their output (the current folder without one), so that one reuses what the other measured."""
    return (out.resolve().parent if out is not None else Path.cwd()) / CACHE_NAME


@dataclass
class Row:
    """One representation, measured. ``quality`` is the mean cosine to the original (encoders) or the accuracy
    (classifiers); ``fits`` is False when the method cannot be sized to the budget (``note`` says why)."""

    method: str
    budget: float | None = None  # the budget's fraction of the tables' float32 bytes
    table_bytes: int | None = None
    file_bytes: int | None = None
    quality: float | None = None
    quality_stderr: float | None = None
    recovered: bool = False
    pareto: bool = False
    fits: bool = True
    cosine: dict[str, float] | None = None
    probe: float | None = None
    accuracy: float | None = None
    relative_change: float | None = None
    reduction: float | None = None
    latency_ms: dict[int, float | None] = field(default_factory=dict)
    # the same export with --decode-at-load, for a row whose tables onnxruntime can decode when it loads the graph
    latency_decoded_ms: dict[int, float | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    onnx: str | None = None
    note: str = ""
    seconds: float = 0.0
    budget_bytes: int | None = None  # the budget the row was sized to
    cached: bool = False  # read from the cache (not encoded nor measured by this run)
    cache_key: str | None = None  # its entry in the cache (RowCache), when there is one

    @property
    def size_bytes(self) -> int:
        """The whole file's bytes (the name the classifier protocol's rows used)."""
        return self.file_bytes or 0

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "latency_ms": {str(k): v for k, v in self.latency_ms.items()},
               "latency_decoded_ms": {str(k): v for k, v in self.latency_decoded_ms.items()}}
        out.pop("cache_key")
        return out


@dataclass
class SweepResult:
    """All rows of one model on one text file."""

    model: str
    data: str
    family: str
    quality: str  # what ``quality`` measures
    float32_bytes: int  # the compressed tables' float32 bytes
    rows: list[Row]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cache: RowCache | None = field(default=None, repr=False)  # where the rows' tables can be read back

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "family": self.family, "quality": self.quality,
                "float32_bytes": self.float32_bytes, "rows": [r.to_dict() for r in self.rows],
                "settings": self.settings, "seconds": self.seconds}

    def front(self) -> list[Row]:
        """The rows on the Pareto front, smallest first."""
        return sorted((r for r in self.rows if r.pareto), key=lambda r: (r.table_bytes or 0, -(r.quality or 0)))


# --- inputs ---------------------------------------------------------------------------------------------------


def parse_budgets(text: str | Iterable[float | str] | None) -> list[str]:
    """``"0.25,0.1"`` or ``[0.05, "2MB"]`` -> budget strings (checked against a model by :func:`budget_bytes`)."""
    if text is None:
        return [str(b) for b in DEFAULT_BUDGETS]
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [str(b).strip() for b in items if str(b).strip()]
    if not out:
        raise InputError("--budgets: give at least one budget (0.05 or 2MB)")
    return out


def budget_bytes(budgets: list[str], float32_bytes: int) -> dict[str, int]:
    """Each budget in bytes; a fraction outside (0, 1) or a size at/above the float32 bytes is refused."""
    return {b: int(parse_budget(b, float32_bytes) or 0) for b in budgets}


def fraction_of(budget: str, size: int, float32_bytes: int) -> float:
    """The budget as a fraction of the float32 bytes: as given (``0.05``), or a size's share."""
    try:
        value = float(budget)
    except ValueError:
        value = 1.0
    return value if 0 < value < 1 else size / float32_bytes


def candidates(methods: str | Iterable[str] | None = None) -> list[str]:
    """The method names to try: those given (each checked against the registry), else every registered structure,
    every storage, and every structure+storage."""
    if methods:
        names = [m.strip() for part in ([methods] if isinstance(methods, str) else methods)
                 for m in part.split(",") if m.strip()]
        for name in names:
            core.parse_method(name)
        return list(dict.fromkeys(names))
    structures = registered(STRUCTURE)
    storages = [m.name for m in registered(STORAGE)]
    return ([m.name for m in structures] + storages
            + [f"{s.name}+{t}" for s in structures if s.takes_storage for t in storages])


@dataclass
class Texts:
    """The texts a sweep scores on, with their labels when every line carries one."""

    path: Path
    texts: list[str]
    labels: list[Any] | None
    total: int  # lines in the file (before any subsample)


def read_texts(path: str | os.PathLike[str], limit: int | None = None, seed: int = 0) -> Texts:
    """Texts of ``.txt`` (one a line) or ``.jsonl`` (``text`` and an optional ``label``); ``limit`` keeps a seeded
    random subsample (in file order). Labels are kept only when every line has one, and must be of one type."""
    p = Path(path)
    texts = hf.read_texts(p)
    labels: list[Any] | None = None
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        found = []
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    found.append(obj.get("label"))
        if found and all(v is not None for v in found):
            kinds = {type(v).__name__ for v in found}
            if len(kinds) > 1 or not kinds <= {"int", "str"}:
                raise DataError(f"{p}: labels of mixed or unusable types ({', '.join(sorted(kinds))}); the probe needs "
                                "labels of one type (all int or all str)")
            labels = found
    total = len(texts)
    if limit is not None and limit < total:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        keep = sorted(random.Random(seed).sample(range(total), limit))
        texts = [texts[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    return Texts(p, texts, labels, total)


# --- measuring ------------------------------------------------------------------------------------------------


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a file of this model holds (each storage once; registry tables in their stored form)."""
    if core.tables_of(model):
        state, _ = core.model_state(model)
        return sum(t.numel() * t.element_size() for t in state.values())
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ptr not in seen:
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


def probe_accuracy(features: torch.Tensor, labels: list[Any], *, seed: int = 0, iterations: int = 100) -> float:
    """Test accuracy of a multinomial logistic regression fitted on a seeded ``PROBE_TRAIN`` share of the rows
    (features standardized on that share, L2 1e-3, L-BFGS); the same split for every call with the same labels."""
    classes = sorted(set(labels), key=str)
    y = torch.tensor([classes.index(v) for v in labels])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(len(labels) - 1, int(PROBE_TRAIN * len(labels))))
    tr, te = order[:n_train], order[n_train:]
    x = features.double()
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp(min=1e-8)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[tr] @ w + b, y[tr]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((x[te] @ w + b).argmax(1) == y[te]).double().mean())


def mark_front(rows: list[Row]) -> None:
    """Set ``pareto`` on the measured rows no other row beats on both bytes and quality."""
    measured = [r for r in rows if r.fits and r.quality is not None and r.table_bytes is not None]
    for r in rows:
        r.pareto = False
    for r in measured:
        r.pareto = not any(o is not r and o.table_bytes <= r.table_bytes and o.quality >= r.quality  # type: ignore
                           and (o.table_bytes < r.table_bytes or o.quality > r.quality) for o in measured)  # type: ignore


class _Family:
    """What a model family gives the sweep: a fresh copy, its tables, how it is scored and recovered."""

    kind: str
    quality_name: str
    model: nn.Module

    src: Path
    tensor_names: dict[str, str]  # a table's module name in the model -> its tensor's name in the file

    def tables(self) -> list[tuple[str, int, int]]:
        """The tables ``compress`` picks in the file (``tables.find_embeddings``), by module name in the model."""
        with load_checkpoint(self.src) as ckpt:
            found = [t.name for t in find_embeddings(ckpt)]
        modules = {n for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)}
        out = []
        self.tensor_names = {}
        for tensor in found:
            name = tensor.removesuffix(".weight")
            module = name if name in modules else name.partition(".")[2]  # a base model drops the head's prefix
            if module not in modules:
                raise InputError(f"{self.src}: the table {name!r} is not an nn.Embedding of the loaded model")
            V, d = self.model.get_submodule(module).weight.shape
            out.append((module, int(V), int(d)))
            self.tensor_names[module] = tensor
        return out

    def data_key(self) -> str:
        """What every row's figures depend on besides the method: the model's files, the scored texts, settings."""
        raise NotImplementedError

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def score(self, model: nn.Module, row: Row) -> None:
        raise NotImplementedError

    def recover(self, model: nn.Module, steps: int) -> str:
        raise NotImplementedError

    saved_as = "model"  # the name of the model written for the latency export, in its family's form

    def export_options(self) -> dict[str, Any]:
        """The parity inputs of the latency export."""
        raise NotImplementedError

    def latency(self, model: nn.Module, work: Path, threads: int | None) -> tuple[dict[int, float | None],
                                                                                   dict[int, float | None]]:
        """onnxruntime latency of ``model``, written as its family writes it and exported by its family's graph: as
        ``export`` writes it, and, when some table of it can be decoded when the graph loads, as ``export
        --decode-at-load`` writes it (else an empty dict)."""
        adapter = families.detect(self.src)
        path = work / self.saved_as
        adapter.save_model(model, path, like=self.src, force=True)

        def timed(name: str, **options: Any) -> dict[int, float | None]:
            report = adapter.export_onnx(path, work / name, threads=threads, device="cpu", force=True, latency=True,
                                         **self.export_options(), **options)
            by_batch = getattr(report, "latency_batch_ms", None) or report.latency_ms
            return dict(by_batch) if isinstance(by_batch, dict) else {1: by_batch}

        folds = any(folds_at_load(t) for t in core.tables_of(model).values())
        return timed("model.onnx"), timed("decoded.onnx", decode_at_load=True) if folds else {}


class _Encoder(_Family):
    kind, quality_name = ENCODER, "mean cosine to the original's sentence embeddings"

    def __init__(self, src: Path, texts: Texts, *, cache_dir: Path | None, recovery_texts: list[str] | None,
                 max_length: int, batch_size: int, device: str, seed: int, say: Callable[[str], None]) -> None:
        self.src, self.texts, self.max_length, self.batch_size = src, texts, max_length, batch_size
        self.device, self.seed, self.say = device, seed, say
        self.recovery_texts = recovery_texts or texts.texts
        self.model = hf.load(src, task="base")
        check_finite_tensors(self.model.named_parameters(), action="compare it")
        self.tokenizer = hf.load_tokenizer(src)
        self.cache_dir = cache_dir
        self.cache_hit = False
        self._data_key: str | None = None
        self.reference: torch.Tensor | None = None
        self.reference_probe: float | None = None

    def prepare(self) -> None:
        self.reference = self._reference()
        if self.texts.labels is not None:
            self.reference_probe = probe_accuracy(self.reference, self.texts.labels, seed=self.seed)

    def data_key(self) -> str:
        if self._data_key is None:
            self._data_key = embedding_key(self.src, self.texts, self.max_length)
        return self._data_key

    def _reference(self) -> torch.Tensor:
        key = self.data_key()
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                with load_checkpoint(path) as ckpt:
                    emb = ckpt.tensor("embeddings")
                if emb.shape[0] == len(self.texts.texts):
                    self.cache_hit = True
                    self.say(f"original's embeddings of {len(self.texts.texts)} texts read from the cache {path}")
                    return emb
            except EmbcompressError:
                pass  # a damaged cache entry is computed again and replaced
        self.say(f"embedding {len(self.texts.texts)} texts with the original")
        emb = self.embed(self.model)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors({"embeddings": emb.contiguous()}, path, {"embcompress.cache": json.dumps(
                {"model": str(self.src), "texts": str(self.texts.path), "count": len(self.texts.texts),
                 "max_length": self.max_length, "tool": __version__})})
        return emb

    def embed(self, model: nn.Module) -> torch.Tensor:
        return hf.embed(model, self.tokenizer, self.texts.texts, batch_size=self.batch_size,
                        max_length=self.max_length)

    def score(self, model: nn.Module, row: Row) -> None:
        assert self.reference is not None
        emb = self.embed(model)
        sim = hf.cosine_report(emb, self.reference, self.texts.texts)
        row.cosine = {"mean": sim.mean, "worst": sim.worst, "p05": sim.p05}
        row.quality = sim.mean
        row.quality_stderr = statistics.pstdev(sim.per_text) / math.sqrt(len(sim.per_text)) if sim.per_text else None
        if self.texts.labels is not None:
            row.probe = probe_accuracy(emb, self.texts.labels, seed=self.seed)

    def recover(self, model: nn.Module, steps: int) -> str:
        config = DistillConfig(steps=steps, seed=self.seed, device=self.device, max_length=self.max_length,
                               **RECOVERY)  # type: ignore[arg-type]
        distill_model(model, self.model, self.tokenizer, self.recovery_texts, config)
        model.cpu().eval()
        return f"{steps} steps of label-free distillation (layer phase, {RECOVERY['layers']} block)"

    def export_options(self) -> dict[str, Any]:
        return {"texts": self.texts.texts[:8]}


class _Classifier(_Family):
    kind, quality_name = CLASSIFIER, "accuracy"

    def __init__(self, src: Path, data: Path, *, train: Path | None, dev: Path | None, device: str, seed: int,
                 say: Callable[[str], None]) -> None:
        self.src, self.data, self.train_path, self.dev_path = src, data, train, dev
        self.device, self.seed, self.say = device, seed, say
        self.clf = load_classifier(src)
        if self.clf.is_factorized or core.tables_of(self.clf.model):
            raise InputError(f"{src}: already compressed; compare starts from the uncompressed classifier")
        check_finite_tensors(self.clf.model.state_dict().items(), action="compare it")
        self.model = self.clf.model
        self.test = self.clf.encode(read_jsonl(data))
        self.train_ds = self.clf.encode(read_jsonl(train)) if train is not None else None
        self.dev_ds = self.clf.encode(read_jsonl(dev)) if dev is not None else None

    def prepare(self) -> None:
        pass

    def data_key(self) -> str:
        return hashlib.sha256((sha256_of(self.src) + sha256_of(self.data)).encode()).hexdigest()[:32]

    def score(self, model: nn.Module, row: Row) -> None:
        acc = evaluate(model, self.test, "cpu").accuracy
        row.accuracy = row.quality = acc
        row.quality_stderr = math.sqrt(max(acc * (1 - acc), 0.0) / max(1, len(self.test)))

    def recover(self, model: nn.Module, steps: int) -> str:
        if self.train_ds is None:
            raise InputError("--recover on a classifier fine-tunes it: give --train (labelled examples)")
        config = TrainConfig(epochs=1, lr=FINETUNE_DEFAULTS["lr"], seed=self.seed, device=self.device)
        per_epoch = max(1, math.ceil(len(self.train_ds) / config.batch_size))
        config.epochs = max(1, math.ceil(steps / per_epoch))
        start = evaluate(model, self.dev_ds, "cpu").accuracy if self.dev_ds is not None else None
        fit(model, self.train_ds, self.dev_ds, config, start_dev_accuracy=start)
        model.cpu().eval()
        return f"{config.epochs} epochs of fine-tuning ({steps} steps asked, {per_epoch} a pass)"

    saved_as = "model.safetensors"

    def export_options(self) -> dict[str, Any]:
        return {"data": self.data}


def embedding_key(src: Path, texts: Texts, max_length: int) -> str:
    """The cache key of the original's embeddings: the model's files, the texts' file, the texts kept, the
    tokenizer's length limit."""
    h = sha256_of(src) + sha256_of(texts.path)
    h += json.dumps({"count": len(texts.texts), "total": texts.total, "max_length": max_length,
                     "first": texts.texts[:3], "last": texts.texts[-3:]}, sort_keys=True)
    return hashlib.sha256(h.encode()).hexdigest()[:32]


def restore_storage(model: nn.Module) -> None:
    """Send every table kept in a storage through it again (after recovery trained its float copies)."""
    for table in core.tables_of(model).values():
        storage = getattr(table, "storage", None)
        if storage is not None and not isinstance(table, core.StoredTable):
            core.store_(table, storage, table.storage_config)


def _options(tables: Iterable[Table]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tables:
        opts = {k: v for k, v in {**t.config().to_dict(), **(t.storage_config.to_dict()
                                                             if getattr(t, "storage", None) else {})}.items()
                if v is not None and k not in ("force", "seed", "algorithm")}
        out.update(opts)
    return out


ROWS_FOLDER = "rows"  # in the cache folder: one safetensors file a measured row
ROW_META = "embcompress.row"
# what a measured row keeps of its figures (the rest is this run's: front, recovery, latency, time)
_ROW_FIGURES = ("table_bytes", "file_bytes", "quality", "quality_stderr", "fits", "cosine", "probe", "accuracy",
                "options", "note")
_DAMAGED = (EmbcompressError, OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError)


@functools.lru_cache(maxsize=1)
def tool_key() -> str:
    """The tool a row was measured with: its version, torch's, and a hash of the package's source files (a
    development checkout changes its code without changing its version)."""
    h = hashlib.sha256(f"{__version__} torch {torch.__version__}".encode())
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def _counts_key(counts: torch.Tensor | None) -> str | None:
    if counts is None:
        return None
    return hashlib.sha256(counts.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


class RowCache:
    """The measured rows of a sweep, kept in ``folder/rows`` between runs: each row's encoded tables (their file
    form: ``core.table_tensors`` under the module's name, ``core.table_entry`` in the metadata) and its figures,
    keyed by what they depend on (:meth:`key`: ``base``, what every row of the sweep shares, and the row's own).
    An entry that cannot be read is measured again and replaced; every write is atomic. ``read``, ``written`` and
    ``damaged`` count this run's entries. Without a folder it keeps nothing (every key is None)."""

    def __init__(self, folder: Path | None, base: dict[str, Any] | None,
                 say: Callable[[str], None] = lambda _m: None) -> None:
        self.folder = Path(folder) / ROWS_FOLDER if folder is not None else None
        self.base, self.say = base or {}, say
        self.read = self.written = self.damaged = 0

    def key(self, method: str, specs: list[core.Spec], budget_bytes: int | None, counts: str | None) -> str | None:
        """The entry of ``method`` sized to ``specs`` (one a table) within ``budget_bytes``, on these token counts
        (None for a method that does not read them), for this sweep's model, texts, settings and tool."""
        if self.folder is None:
            return None
        what = {**self.base, "method": method, "specs": [spec.to_dict() for spec in specs],
                "budget_bytes": budget_bytes, "counts": counts}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        """The entry's file."""
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def _open(self, key: str) -> tuple[dict[str, Any], dict[str, Table]]:
        """The entry's record and its tables rebuilt by module name; an ``EmbcompressError`` (or another of
        ``_DAMAGED``) when it is damaged."""
        with load_checkpoint(self.path(key)) as ckpt:
            meta = json.loads(ckpt.metadata[ROW_META])
            if meta["key"] != key:
                raise ValueError("the entry holds another key")
            tables = {}
            for module, item in meta["tables"].items():
                tensors = {n[len(module) + 1:]: ckpt.tensor(n) for n in ckpt.names if n.startswith(module + ".")}
                table = core.table_from_tensors(item["entry"], tensors, str(self.path(key)))
                table._info = dict(item["entry"].get("info") or {})
                tables[module] = table
        return meta, tables

    def get(self, key: str | None, row: Row) -> bool:
        """Fill ``row`` with the entry's figures when it holds a readable one (its tables included)."""
        if key is None or not self.path(key).is_file():
            return False
        try:
            meta, _ = self._open(key)
            figures = {k: meta["row"][k] for k in _ROW_FIGURES}
        except _DAMAGED:
            self.damaged += 1
            return False
        for k, v in figures.items():
            setattr(row, k, v)
        row.cached, row.cache_key = True, key
        self.read += 1
        return True

    def tables(self, key: str) -> dict[str, tuple[Table, dict[str, Any], str]]:
        """The entry's tables by module name: (table, its record entry, its tensor's name in the file)."""
        meta, tables = self._open(key)
        return {m: (t, meta["tables"][m]["entry"], meta["tables"][m]["tensor"]) for m, t in tables.items()}

    def put(self, key: str | None, row: Row, model: nn.Module | None, tensor_names: dict[str, str]) -> None:
        """Keep ``row`` and ``model``'s tables (None: the original, or a row that could not be encoded within its
        budget) under ``key``."""
        if key is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        tables: dict[str, Any] = {}
        records = getattr(model, "_embcompress_tables", None) or {}
        for module, table in (core.tables_of(model) if model is not None else {}).items():
            tensors.update({f"{module}.{k}": v for k, v in core.table_tensors(table).items()})
            tables[module] = {"tensor": tensor_names.get(module, f"{module}.weight"),
                              "entry": records.get(f"{module}.weight") or core.table_entry(table)}
        meta = {"key": key, "tool": __version__, "row": {k: getattr(row, k) for k in ("method", *_ROW_FIGURES)},
                "tables": tables}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, self.path(key), {ROW_META: json.dumps(meta, default=str)})
        except (EmbcompressError, OSError) as e:  # the cache saves time; a run does not fail for want of it
            self.say(f"the row was not cached: {str(e).splitlines()[0]}")
            return
        row.cache_key = key
        self.written += 1

    def rebuilt(self, row: Row, family: _Family) -> nn.Module | None:
        """A fresh copy of the family's model with the row's tables swapped in, as ``build`` leaves it; None when
        the row has no entry or it cannot be read."""
        if row.cache_key is None:
            return None
        try:
            entry = self.tables(row.cache_key)
        except _DAMAGED:
            return None
        model = family.fresh()
        for module, (table, _, _) in entry.items():
            core.swap(model, module, table)
        model._embcompress_tables = {f"{module}.weight": record for module, (_, record, _) in entry.items()}
        return model

    def counters(self) -> dict[str, Any]:
        """What this run read, wrote and found damaged, and where."""
        return {"folder": str(self.folder) if self.folder else None, "read": self.read, "written": self.written,
                "damaged": self.damaged}


def cached_tables(result: SweepResult, row: Row) -> dict[str, Table] | None:
    """The row's encoded tables as the sweep measured them, by tensor name in the model's file, or None when the
    sweep kept no cache or the entry is gone or damaged (then the caller encodes again)."""
    if result.cache is None or row.cache_key is None:
        return None
    try:
        return {tensor: table for table, _, tensor in result.cache.tables(row.cache_key).values()}
    except _DAMAGED:
        return None


def rebuild(cache: RowCache | None, row: Row, family: _Family, tables: list[tuple[str, int, int]],
            counts: torch.Tensor | None) -> nn.Module:
    """The row's model: its tables read back from the cache, else encoded again."""
    model = cache.rebuilt(row, family) if cache is not None else None
    if model is None:
        model = family.fresh()
        if row.method != UNCOMPRESSED and row.budget_bytes is not None:
            build(model, row.method, row.budget_bytes, tables, counts)
    return model


def sweep(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    budgets: list[str] | None = None,
    methods: str | Iterable[str] | None = None,
    recover: int = 0,
    train: str | os.PathLike[str] | None = None,
    dev: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    latency: bool = False,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    max_length: int = hf.DEFAULT_MAX_LENGTH,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> SweepResult:
    """Measure every candidate at every budget (see the module's docstring). Every input is checked before
    ``ready()`` is called and before anything is written (the cache included). ``latency`` times the rows of the
    Pareto front in onnxruntime (each written to a scratch folder beside ``cache_dir`` and exported)."""
    started = time.perf_counter()
    say = progress or (lambda _m: None)
    src, data = Path(model_path), Path(data)
    if recover < 0:
        raise InputError(f"--recover takes a number of steps (0 or more), got {recover}")
    names = candidates(methods)
    budget_list = parse_budgets(budgets)
    for b in budget_list:  # the form now; the size against the model's tables once it is loaded
        parse_budget(b, 1 << 62)
    family: _Encoder | _Classifier
    measures = families.detect(src).measures  # what compare measures on this model family
    if measures is None:
        raise InputError(f"{src}: not an embcompress classifier nor a Hugging Face folder; compare needs a model it "
                         "can run")
    if measures == ENCODER:
        texts = read_texts(data, limit=limit, seed=seed)
        recovery_texts = hf.read_texts(train) if train is not None else None
        family = _Encoder(src, texts, cache_dir=Path(cache_dir) if cache_dir else None, recovery_texts=recovery_texts,
                          max_length=max_length, batch_size=batch_size, device=device, seed=seed, say=say)
        count = len(texts.texts)
    else:
        family = _Classifier(src, data, train=Path(train) if train else None, dev=Path(dev) if dev else None,
                             device=device, seed=seed, say=say)
        count = len(family.test)
        texts = None
    if recover and family.kind == CLASSIFIER and train is None:
        raise InputError("--recover on a classifier fine-tunes it: give --train (labelled examples)")
    tables = family.tables()
    float32 = sum(4 * V * d for _, V, d in tables)
    sizes = budget_bytes(budget_list, float32)
    needs_counts = any(_counted(name) for name in names)
    counts = None
    if needs_counts:  # as `compress --corpus` counts them, so `auto` writes what was measured
        got = load_counts(src, None, None, train or data)
        counts = torch.from_numpy(got.counts).to(torch.float64) if got is not None else None
    if ready:
        ready()
    family.prepare()
    cache = RowCache(None, None) if cache_dir is None else RowCache(Path(cache_dir), {
        "data": family.data_key(), "family": family.kind, "seed": seed, "max_length": max_length,
        "batch_size": batch_size, "device": device, "tool": tool_key()}, say)
    counts_key = _counts_key(counts)
    base = Row(UNCOMPRESSED, None, float32, state_bytes(family.model), None, fits=True)
    base_key = cache.key(UNCOMPRESSED, [], None, None)
    if not cache.get(base_key, base):
        family.score(family.model, base)
        cache.put(base_key, base, None, family.tensor_names)
    base.note = "the original"
    rows = [base]
    if family.kind == CLASSIFIER:
        base.relative_change = 0.0
    if isinstance(family, _Encoder) and family.reference_probe is not None:
        base.probe = family.reference_probe
    total = len(sizes) * len(names)
    done = 0
    for budget, size in sizes.items():
        for name in names:
            done += 1
            t0 = time.perf_counter()
            frac = fraction_of(budget, size, float32)
            row = Row(name, frac, budget_bytes=size)
            say(f"[{done}/{total}] {name} at {budget} ({size:,} bytes)")
            model = None
            try:  # a budget the method cannot reach is refused here, before any copy
                specs = specs_for(name, size, tables)
            except InputError as e:
                specs = None
                _cannot_fit(row, e)
            if specs is not None:
                key = cache.key(name, specs, size, counts_key if _counted(name) else None)
                if not cache.get(key, row):
                    model = _measure(family, row, name, size, specs, tables, counts)
                    cache.put(key, row, model, family.tensor_names)
            row.seconds = time.perf_counter() - t0
            rows.append(row)
            if not row.fits:
                say(f"[{done}/{total}] {name} at {budget}: {row.note}")
                continue
            if row.accuracy is not None and base.accuracy:
                row.relative_change = (row.accuracy - base.accuracy) / base.accuracy
            say(f"[{done}/{total}] {name} at {budget}: {family.quality_name.split(' ')[0]} {row.quality:.4f}, "
                f"{row.table_bytes:,} table bytes, {row.seconds:.1f} s" + (" (from the cache)" if row.cached else ""))
            if recover:
                t0 = time.perf_counter()
                say(f"[{done}/{total}] {name} at {budget}: recovering ({recover} steps)")
                if model is None:
                    model = rebuild(cache, row, family, tables, counts)
                note = family.recover(model, recover)
                restore_storage(model)
                rec = Row(name, frac, row.table_bytes, state_bytes(model), recovered=True, options=row.options,
                          note=note, budget_bytes=size)
                family.score(model, rec)
                if rec.accuracy is not None and base.accuracy:
                    rec.relative_change = (rec.accuracy - base.accuracy) / base.accuracy
                rec.seconds = time.perf_counter() - t0
                rows.append(rec)
                say(f"[{done}/{total}] {name} at {budget} recovered: {rec.quality:.4f}")
    mark_front(rows)
    settings = {"budgets": budget_list, "budget_bytes": sizes, "methods": names, "recover": recover,
                "texts": count, "max_length": max_length, "device": device, "seed": seed,
                "tables": [{"name": n, "shape": [V, d]} for n, V, d in tables],
                "counts_from": str(train or data) if needs_counts else None,
                "train": str(train) if train else None, "dev": str(dev) if dev else None,
                "row_cache": cache.counters()}
    if texts is not None:
        settings.update(texts_total=texts.total, subsample=texts.total != len(texts.texts),
                        labels=texts.labels is not None, cache_hit=family.cache_hit,  # type: ignore[union-attr]
                        probe_train_share=PROBE_TRAIN if texts.labels is not None else None)
    result = SweepResult(str(src), str(data), family.kind, family.quality_name, float32, rows, settings,
                         cache=cache)
    if latency:
        time_front(result, family, Path(cache_dir) if cache_dir else src.parent, threads, tables, counts, say)
    result.seconds = time.perf_counter() - started
    return result


def specs_for(method: str, size: int, tables: list[tuple[str, int, int]]) -> list[core.Spec]:
    """``method`` sized for each table: ``size`` bytes in all, each table its share of the float32 bytes (as
    ``compress --budget`` shares it); a budget the method cannot reach is an ``InputError``."""
    float32 = sum(4 * V * d for _, V, d in tables)
    return [core.spec_for_budget(method, V, d, int(size * (4 * V * d) / float32)) for _, V, d in tables]


def build(model: nn.Module, method: str, size: int, tables: list[tuple[str, int, int]],
          counts: torch.Tensor | None, specs: list[core.Spec] | None = None) -> None:
    """Compress the model's tables in place with ``method`` sized to ``size`` bytes in all (``specs_for``)."""
    for (name, _, _), spec in zip(tables, specs or specs_for(method, size, tables)):
        core.compress_(model, spec, [name], counts=counts)


def _counted(method: str) -> bool:
    """Whether the method reads token counts."""
    return any("counts" in m.needs for m in core.parse_method(method) if m is not None)


def _cannot_fit(row: Row, error: InputError) -> None:
    row.fits = False
    note = str(error).splitlines()[0]
    row.note = note if note.startswith("over the budget") else f"cannot fit: {note}"


def _measure(family: _Family, row: Row, method: str, size: int, specs: list[core.Spec],
             tables: list[tuple[str, int, int]], counts: torch.Tensor | None) -> nn.Module | None:
    """Encode a fresh copy of the model with ``specs`` and score it into ``row``; the model, or None when the
    method could not encode within the budget (the row then says why)."""
    try:
        model = family.fresh()
        build(model, method, size, tables, counts, specs)
        row.table_bytes = sum(e["bytes"] for e in model._embcompress_tables.values())
        if row.table_bytes > size:  # the method's own sizing missed: listed, never chosen
            raise InputError(f"over the budget: sized to {size:,} bytes, stores {row.table_bytes:,}")
    except InputError as e:
        _cannot_fit(row, e)
        return None
    row.file_bytes = state_bytes(model)
    row.options = _options(core.tables_of(model).values())
    family.score(model, row)
    return model


def time_front(result: SweepResult, family: _Family, near: Path, threads: int | None,
               tables: list[tuple[str, int, int]], counts: torch.Tensor | None, say: Callable[[str], None]) -> None:
    """onnxruntime latency of the front's rows that were not recovered (each rebuilt, written to a scratch folder and
    exported); a row whose export fails keeps no latency and says why."""
    near.mkdir(parents=True, exist_ok=True)
    for row in result.front():
        if row.recovered:
            continue
        say(f"latency: exporting {row.method} to ONNX")
        model = rebuild(result.cache, row, family, tables, counts)
        try:
            with temporary_folder(near / "latency") as work:
                row.latency_ms, row.latency_decoded_ms = family.latency(model, Path(work), threads)
        except (EmbcompressError, DependencyError) as e:
            row.note = (row.note + "; " if row.note else "") + f"no ONNX latency: {str(e).splitlines()[0]}"


# --- rendering ------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("method", "budget", "table_bytes", "file_bytes", "quality", "quality_stderr", "cosine_worst",
               "cosine_p05", "probe", "recovered", "pareto", "fits", "latency_ms_b1", "latency_ms_b64",
               "latency_decoded_ms_b1", "latency_decoded_ms_b64", "options", "note")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def to_csv(result: SweepResult) -> str:
    """One line per row."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in result.rows:
        cos = r.cosine or {}
        w.writerow([r.method, _fmt(r.budget), r.table_bytes or "", r.file_bytes or "", _fmt(r.quality, 6),
                    _fmt(r.quality_stderr, 6), _fmt(cos.get("worst"), 6), _fmt(cos.get("p05"), 6),
                    _fmt(r.probe), r.recovered, r.pareto, r.fits, _fmt(r.latency_ms.get(1), 3),
                    _fmt(r.latency_ms.get(64), 3), _fmt(r.latency_decoded_ms.get(1), 3),
                    _fmt(r.latency_decoded_ms.get(64), 3), json.dumps(r.options, sort_keys=True), r.note])
    return buf.getvalue()


def rows_json(result: SweepResult) -> list[dict[str, Any]]:
    """The rows as ``--json`` prints them."""
    return [r.to_dict() for r in result.rows]


def to_markdown(result: SweepResult, *, title: str | None = None) -> str:
    """A Markdown section: the settings, the front, then every row by budget."""
    enc = result.family == ENCODER
    s = result.settings
    lines = [f"## {title}" if title else f"## {Path(result.model).name} on {Path(result.data).name}", ""]
    sub = f" (a seeded subsample of {s['texts']} of its {s.get('texts_total')} texts)" if s.get("subsample") else ""
    lines.append(f"Model `{result.model}`, scored on `{result.data}`{sub}: {result.quality}. Tables: "
                 + ", ".join(f"`{t['name']}` {t['shape'][0]} x {t['shape'][1]}" for t in s["tables"])
                 + f" ({result.float32_bytes:,} bytes in float32). Budgets: {', '.join(s['budgets'])}; "
                 f"{len(s['methods'])} methods; recovery: {s['recover'] or 'none'}; {result.seconds:.0f} s.")
    lines.append("")
    base = result.rows[0]
    head = ["method", "budget", "table bytes", "x float32", "file bytes", "mean cosine" if enc else "accuracy"]
    if enc:
        head += ["worst", "5th pct."]
        if base.probe is not None:
            head += ["probe acc."]
    else:
        head += ["vs original"]
    timed = any(r.latency_ms for r in result.rows)
    decoded = any(r.latency_decoded_ms for r in result.rows)
    head += (["ms b=1"] if timed else []) + (["ms b=1, decoded at load"] if decoded else []) + ["front",
                                                                                               "options / note"]

    def cells(r: Row) -> list[str]:
        if not r.fits:
            return [r.method + (" (recovered)" if r.recovered else ""), _fmt(r.budget, 3)] + ["-"] * (len(head) - 3) \
                + [r.note]
        c = [r.method + (" (recovered)" if r.recovered else ""), _fmt(r.budget, 3) or "-", f"{r.table_bytes:,}",
             f"{(r.table_bytes or 0) / result.float32_bytes:.4f}", f"{r.file_bytes:,}", _fmt(r.quality)]
        if enc:
            c += [_fmt((r.cosine or {}).get("worst")), _fmt((r.cosine or {}).get("p05"))]
            if base.probe is not None:
                c += [_fmt(r.probe)]
        else:
            c += [f"{100 * (r.relative_change or 0):+.2f} %"]
        if timed:
            c += [_fmt(r.latency_ms.get(1), 2) or "-"]
        if decoded:
            c += [_fmt(r.latency_decoded_ms.get(1), 2) or "-"]
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items())
        return c + ["**yes**" if r.pareto else "", "; ".join(x for x in (opts, r.note) if x)]

    lines += ["### The Pareto front (no other row is both smaller and better)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result.front()]
    lines += ["", "### Every row", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result.rows]
    if enc:
        se = [r.quality_stderr for r in result.rows if r.quality_stderr]
        lines += ["", f"Mean cosine over {s['texts']} texts; its standard error is at most {max(se or [0]):.4f} "
                  "(the noise of the measurement)." + (" Probe: logistic regression on the embeddings, fitted on a "
                                                       f"seeded {round(100 * PROBE_TRAIN)} % of the labelled texts, "
                                                       "scored on the rest." if base.probe is not None else "")]
    return "\n".join(lines) + "\n"


def plot(result: SweepResult, path: Path, *, title: str | None = None) -> None:
    """Quality against table bytes (log x), one curve per method (recovered ones dashed), the front drawn."""
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("the plot needs matplotlib: pip install matplotlib (it is in the [dev] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple[str, bool], list[Row]] = {}
    for r in result.rows:
        if r.fits and r.quality is not None and r.method != UNCOMPRESSED and r.table_bytes:
            groups.setdefault((r.method, r.recovered), []).append(r)
    cmap = plt.get_cmap("tab20")
    for i, ((method, rec), rs) in enumerate(sorted(groups.items())):
        rs.sort(key=lambda r: r.table_bytes or 0)
        ax.plot([r.table_bytes / 1e6 for r in rs], [r.quality for r in rs], marker="o", ms=3, lw=1,  # type: ignore
                ls="--" if rec else "-", color=cmap(i % 20), label=method + (" (recovered)" if rec else ""))
    front = [r for r in result.front() if r.table_bytes]
    ax.step([r.table_bytes / 1e6 for r in front], [r.quality for r in front], where="post", color="black",  # type: ignore
            lw=2, alpha=0.5, label="Pareto front")
    base = result.rows[0]
    ax.axhline(base.quality or 0, color="grey", lw=0.8, ls=":", label="original")
    ax.set_xscale("log")
    ax.set_xlabel("table bytes (MB, log scale)")
    ax.set_ylabel(result.quality if len(result.quality) < 30 else "mean cosine to the original")
    qs = [r.quality for r in front if r.quality is not None]
    if qs:
        ax.set_ylim(max(min(qs) - 0.05, min(r.quality for rs in groups.values() for r in rs)) - 0.01,  # type: ignore
                    (base.quality or 1) + 0.01)
    ax.set_title(title or Path(result.model).name)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
