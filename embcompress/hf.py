"""Hugging Face models: load a (factorized) model folder as a transformers model, write it back, embed texts, export.

``transformers`` is the optional extra ``[hf]``; it is imported on demand and a missing install is a
``DependencyError`` naming the extra.

* ``load(FOLDER)`` returns the transformers model of a folder written by ``embcompress factorize`` (or fine-tuned,
  or quantized afterwards) with ``FactorizedEmbedding`` in place of each factorized table. Modules that shared the
  table's parameter share the new module: T5's ``encoder.embed_tokens`` / ``decoder.embed_tokens`` become the same
  ``FactorizedEmbedding`` as ``shared``, and a tied output layer (GPT-2's and T5's ``lm_head``, BERT's MLM decoder)
  becomes ``TiedFactorizedLinear``. A dense folder loads as transformers loads it.
* ``save(model, OUT, like=FOLDER)`` writes a folder that ``load`` (and ``inspect``, ``quantize``, ``export``) read:
  ``model.safetensors`` with the factors ``<table>_a``, ``<table>_b`` and the ``embcompress`` metadata, the config,
  and every other file of ``like`` (tokenizer, sentence-transformers pooling files).
* ``factorize_model`` / ``densify`` swap tables in memory (the dense model rebuilt from W_a W_b is ``densify``'s).
* ``embed`` gives mean-pooled sentence embeddings (the all-MiniLM / sentence-transformers pooling);
  ``similarity`` compares two models' embeddings text by text.
* The ONNX export of an encoder lives in ``embcompress.export`` (``export.transformers``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    META_KEY,
    atomic_path,
    check_output,
    copy_folder_files,
    load_checkpoint,
    save_safetensors,
)
from .errors import CheckpointError, DataError, DependencyError, InputError, TableError
from . import core, record
from .record import COUNTED_METHODS, METHODS
from .data import read_texts  # noqa: F401  (hf.read_texts: the texts every encoder command reads)
from .groupreduce import DEFAULT_BLOCKS, DEFAULT_ROUNDS, group_reduce
from .modules import FACTORIZED, FactorizedEmbedding, GroupedFactorizedEmbedding, TiedFactorizedLinear
from .quant import dequantized_state_dict
from .rank import choose_rank
from .svd import factorize_weighted
from .tables import is_embedding_candidate
from .methods.weighted import DEFAULT_SMOOTHING

MISSING = "transformers is not installed: pip install 'embcompress[hf]' (transformers and tokenizers)"
TASKS = ("auto", "base", "sequence-classification")
DEFAULT_MAX_LENGTH = 128
HF_META_KEY = "embcompress.hf"  # what fine-tuning / distillation did, carried in the safetensors metadata
# a factor tensor's key minus its suffix gives its module: x.weight_a, x.weight_b.3, x.weight_groups -> x
_FACTOR_KEY = re.compile(r"\.weight_(a|b)(\.\d+)?$|\.weight_groups$")


# --- the optional dependency ----------------------------------------------------------------------------------

def import_transformers() -> ModuleType:
    """The ``transformers`` module, or DependencyError naming the ``[hf]`` extra."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise DependencyError(MISSING) from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' logging, warnings and progress bars (the CLI prints its own lines)."""
    tf = import_transformers()
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a Hugging Face folder, or None when ``folder`` is not one."""
    p = Path(folder)
    cfg = p / "config.json"
    if not p.is_dir() or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_folder(path: str | os.PathLike[str] | None) -> bool:
    """True for a folder with a ``config.json`` naming a ``model_type`` (a transformers model folder)."""
    if path is None:
        return False
    cfg = read_config(path)
    return bool(cfg and cfg.get("model_type"))


# --- loading --------------------------------------------------------------------------------------------------


def _model_class(tf: ModuleType, config: Any, task: str) -> Any:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if task == "base":
        return tf.AutoModel
    if task == "sequence-classification":
        return tf.AutoModelForSequenceClassification
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None:
            return cls
    return tf.AutoModel


def _align(name: str, model_names: set[str], prefix: str) -> str | None:
    """A checkpoint tensor name as the model names it (adding or removing the base-model prefix)."""
    if name in model_names:
        return name
    if prefix and f"{prefix}.{name}" in model_names:
        return f"{prefix}.{name}"
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in model_names:
        return name[len(prefix) + 1 :]
    return None


def load(
    folder: str | os.PathLike[str],
    *,
    task: str = "auto",
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """The transformers model of a folder, with ``FactorizedEmbedding`` in place of each factorized table.

    ``task``: ``auto`` builds the folder's own architecture (``config.architectures``), ``base`` the bare model
    (``AutoModel``), ``sequence-classification`` adds a classification head (``num_labels`` / ``id2label``; a
    head the folder does not hold starts at random). A folder quantized by ``embcompress quantize`` loads
    dequantized (float32). The model is returned in eval mode.
    """
    tf = import_transformers()
    src = Path(folder)
    if not is_hf_folder(src):
        raise CheckpointError(f"{src}: not a Hugging Face model folder (no config.json with a model_type)")
    with quiet():
        try:
            config = tf.AutoConfig.from_pretrained(str(src))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{src}: transformers cannot read its config ({_first_line(e)})") from None
        if num_labels is not None:
            config.num_labels = num_labels
        if id2label is not None:
            config.id2label = {int(k): str(v) for k, v in id2label.items()}
            config.label2id = {v: k for k, v in config.id2label.items()}
        cls = _model_class(tf, config, task)
        if getattr(cls, "_model_mapping", None) is not None:  # an Auto class: the concrete class for this config
            try:
                cls = cls._model_mapping[type(config)]
            except KeyError:
                raise InputError(f"{src}: task {task!r} is not available for a {config.model_type} model") from None
        with load_checkpoint(src) as ckpt:
            meta = ckpt.embcompress_meta or {}
            tables = meta.get("tables") or {}
            state = dequantized_state_dict(ckpt)
        factors: dict[str, nn.Module] = core.placeholder_state(state, tables, str(src))
        for name, entry in tables.items():
            if name in factors:
                continue
            factors[name] = _table_module(src, name, entry, state)
            with torch.no_grad():  # the dense table, replaced by the factors below
                state[name] = factors[name].dense_weight()
        try:
            model = cls.from_pretrained(None, config=config, state_dict=state)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{src}: transformers cannot load it ({_first_line(e)})") from None
    if factors:
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for name, module in factors.items():
            target = _align(name, params, prefix)
            if target is None or not target.endswith(".weight"):
                raise CheckpointError(f"{src}: the model {cls.__name__} has no table {name!r}")
            swap_table(model, target.removesuffix(".weight"), module)
        _record_factorization(model, meta, prefix)
    return model.to(device).eval()


def _table_module(src: Path, name: str, entry: dict[str, Any],
                  state: dict[str, torch.Tensor]) -> FactorizedEmbedding | GroupedFactorizedEmbedding:
    """The factorized module of one recorded table, its tensors taken out of ``state``."""
    blocks = entry.get("blocks")
    names = list(entry.get("factors") or (f"{name}_a", f"{name}_b"))
    if blocks:
        names.append(blocks.get("groups") or f"{name}_groups")
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"{src}: the factors of {name!r} ({', '.join(missing[:3])}) are missing")
    tensors = [state.pop(n) for n in names]
    if not blocks:
        return FactorizedEmbedding.from_factors(tensors[0], tensors[1])
    C = len(blocks["ranks"])
    try:
        return GroupedFactorizedEmbedding.from_factors(tensors[:C], tensors[C:2 * C], tensors[2 * C])
    except (TableError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{src}: the blocks of {name!r} do not fit together ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a model folder (``AutoTokenizer``)."""
    tf = import_transformers()
    with quiet():
        try:
            return tf.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder}: no usable tokenizer ({_first_line(e)})") from None


# --- swapping tables in memory ------------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_table(model: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Put ``new`` in place of the ``nn.Embedding`` ``name`` and of every module sharing its weight (``core.swap``)."""
    return core.swap(model, name, new)


@dataclass
class Swap:
    """One table factorized in memory."""

    name: str
    shape: tuple[int, int]
    rank: int
    rel_error: float | None
    tied: list[str]


def tables_of(model: nn.Module) -> list[str]:
    """The module names of the token tables ``factorize_model`` picks: ``get_input_embeddings()`` when the model
    has it, else every ``nn.Embedding`` whose name and shape pass the rules of ``tables.find_embeddings``."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, (nn.Embedding, FactorizedEmbedding)):
        for n, m in model.named_modules():
            if m is emb:
                return [n]
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and is_embedding_candidate(f"{n}.weight", tuple(m.weight.shape))[0]]


def factorize_model(
    model: nn.Module,
    *,
    reduction: float | None = None,
    rank: int | None = None,
    tables: list[str] | None = None,
    method: str = "exact",
    counts: Any = None,  # weighting.Counts
    smoothing: float = DEFAULT_SMOOTHING,
    weight_power: float = 1.0,
    blocks: int = DEFAULT_BLOCKS,
    rounds: int = DEFAULT_ROUNDS,
    force: bool = False,
) -> list[Swap]:
    """Factorize a transformers model's token table(s) in place, keeping every tie.

    ``method`` is a truncated SVD (``exact``, ``randomized``) or, with token ``counts`` (``embcompress.weighting``:
    ``count_corpus`` or ``count_ids``), the frequency-weighted SVD (``weighted``) or GroupReduce (``groupreduce``,
    ``blocks`` blocks in the plain SVD's budget), with row weights (count + ``smoothing``) ** ``weight_power``, as
    in ``embcompress.factorize``."""
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if (method in COUNTED_METHODS) != (counts is not None):
        raise InputError("token counts go with method='weighted' or 'groupreduce', and those need them")
    weights = counts.weights(smoothing, weight_power) if counts is not None else None
    swaps = []
    for name in tables or tables_of(model):
        old = model.get_submodule(name)
        if not isinstance(old, nn.Embedding):
            raise InputError(f"{name!r} is not an nn.Embedding")
        W = old.weight.detach()
        V, d = W.shape
        k = choose_rank(V, d, reduction=reduction, rank=rank, force=force, table=name)
        if weights is not None and weights.numel() != V:
            raise InputError(f"{name}: {weights.numel()} token counts for a table of {V} rows")
        new: FactorizedEmbedding | GroupedFactorizedEmbedding
        if method == "groupreduce":
            g = group_reduce(W.cpu(), weights, budget=k * (V + d), blocks=blocks, rounds=rounds)
            new = GroupedFactorizedEmbedding.from_factors([a.to(W.device) for a in g.a], [b.to(W.device) for b in g.b],
                                                          g.groups.to(W.device))
            new.rel_error = g.rel_error
        elif method == "weighted":
            f = factorize_weighted(W, k, weights.to(W.device))
            new = FactorizedEmbedding.from_factors(f.a.to(W.dtype), f.b.to(W.dtype))
            new.rel_error = f.rel_error
        else:
            new = FactorizedEmbedding.from_dense(W, k, method=method)
        tied = swap_table(model, name, new)
        swaps.append(Swap(name, (V, d), new.rank, new.rel_error, tied))
    return swaps


def densify(model: nn.Module) -> nn.Module:
    """Replace each ``FactorizedEmbedding`` by a dense ``nn.Embedding`` holding W_a W_b (and each
    ``TiedFactorizedLinear`` by an ``nn.Linear`` sharing that weight): the dense model rebuilt from the factors."""
    dense: dict[int, nn.Embedding] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, FACTORIZED):
            if id(mod) not in dense:
                p = next(mod.parameters())
                emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, device=p.device,
                                   dtype=p.dtype)
                with torch.no_grad():
                    emb.weight.copy_(mod.dense_weight())
                dense[id(mod)] = emb
            _set_module(model, name, dense[id(mod)])
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, TiedFactorizedLinear):
            emb = dense.get(id(mod.tied_to))
            if emb is None:
                continue
            lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=mod.bias is not None,
                            device=emb.weight.device, dtype=emb.weight.dtype)
            lin.weight = emb.weight
            if mod.bias is not None:
                lin.bias = mod.bias
            _set_module(model, name, lin)
    return model


def factorized_tables(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per factorized table of the model (under its first name): shape, rank and the names tied to it."""
    first: dict[int, str] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, FACTORIZED):
            if id(mod) not in first:
                first[id(mod)] = name
                out[name] = {"module": mod, "shape": (mod.num_embeddings, mod.embedding_dim), "rank": mod.rank,
                             "tied": {}}
            else:
                out[first[id(mod)]]["tied"][f"{name}.weight"] = "the same module in the model"
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, TiedFactorizedLinear) and id(mod.tied_to) in first:
            out[first[id(mod.tied_to)]]["tied"][f"{name}.weight"] = "output layer tied to the table"
    return out


def _record_factorization(model: nn.Module, meta: dict[str, Any], prefix: str) -> None:
    """Keep the file's ``embcompress`` record on the model (``save`` carries it forward)."""
    model._embcompress_meta = meta  # noqa: SLF001 - a plain attribute on the loaded model
    model._embcompress_tables = {n: e for n, e in (meta.get("tables") or {}).items() if core.is_v2_entry(e)}
    model._embcompress_prefix = prefix  # noqa: SLF001


# --- saving ---------------------------------------------------------------------------------------------------


_TRAINING_OPS = {"finetuned": "finetune", "distilled": "distill"}  # extra_meta's key -> the history's op


def _metadata(model: nn.Module, params_before: int | None, extra: dict[str, Any] | None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the record (format 2) of a model with compressed tables: each table's entry from the
    registry (``core.model_state``), a factorized one with the fields 0.1 wrote, the figures it was loaded with
    (the SVD's error, marked ``trained`` after fine-tuning or distillation), and one more operation in the history
    when ``extra`` says the model was trained."""
    previous = getattr(model, "_embcompress_meta", None) or {}
    kind = next((k for k in _TRAINING_OPS if k in (extra or {})), None)
    state, entries = record.model_entries(model, previous.get("tables"), trained=kind is not None)
    state = _drop_dense_ties(state)
    params_after = sum(t.numel() for t in state.values())
    before = params_before or (previous.get("file") or {}).get("params_before") or params_after
    options = {k: v for k, v in (extra or {}).get(kind, {}).items() if k not in ("history", "phases", "notes")} \
        if kind else None
    meta = record.file_record(previous, entries, op=_TRAINING_OPS.get(kind or ""), options=options,
                              file={"params_before": before, "params_after": params_after,
                                    "reduction_achieved": 1.0 - params_after / before if before else 0.0})
    if extra:
        meta.update(extra)
    return state, meta


def _drop_dense_ties(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once: a dense tie (the same parameter under two names) keeps its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    for key, t in state.items():
        mark = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and mark in seen:
            continue
        seen.add(mark)
        out[key] = t
    return out


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors ``save`` writes: each parameter and persistent buffer once (an alias of a table, a tied output
    layer's copy, is dropped), factors under ``<table>_a`` / ``<table>_b``; and the factorized tables."""
    tables = factorized_tables(model)
    aliases = {t for info in tables.values() for t in info["tied"]}
    alias_modules = {a.removesuffix(".weight") for a in aliases}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        module = _FACTOR_KEY.sub("", key)
        if module != key and module in alias_modules:
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ptr in seen and t.numel():  # a dense tie (the same parameter under two names): keep the first
            continue
        seen.add(ptr)
        state[key] = t.detach().to("cpu").contiguous()
    return state, tables


def save(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str] | None = None,
    inputs: list[Path] | None = None,
    force: bool = False,
    extra_meta: dict[str, Any] | None = None,
    params_before: int | None = None,
) -> Path:
    """Write a transformers model (factorized or not) as a folder ``load`` reads back, atomically.

    The folder holds ``model.safetensors`` (factors as ``<table>_a`` / ``<table>_b`` and the ``embcompress``
    metadata), ``config.json`` (the original's when the architecture is unchanged, else the model's) and every
    other file of ``like`` (tokenizer, pooling). ``extra_meta`` is merged into the ``embcompress`` record.
    """
    out = Path(out)
    src = Path(like) if like is not None else None
    check_output(out, [p for p in [src, *(inputs or [])] if p is not None], force=force)
    meta = {"format": "pt"}
    if core.tables_of(model):
        state, rec = _metadata(model, params_before, extra_meta)
        meta[META_KEY] = json.dumps(rec)
    else:
        state, _ = model_state(model)
        if extra_meta:
            meta[HF_META_KEY] = json.dumps(extra_meta)
    config = copy.deepcopy(getattr(model, "config", None))
    if config is not None:
        config.architectures = [type(model).__name__]
    with atomic_path(out, directory=True) as tmp:
        if src is not None and src.is_dir():
            copy_folder_files(src, tmp, skip={p.name for p in src.glob("model-*.safetensors")}
                              | {p.name for p in src.glob("pytorch_model-*.bin")})
        if config is not None and not _config_unchanged(src, config):
            with quiet():
                config.to_json_file(str(tmp / "config.json"))
        save_safetensors(state, tmp / "model.safetensors", meta)
    return out


def _config_unchanged(src: Path | None, config: Any) -> bool:
    if src is None:
        return False
    original = read_config(src)
    if original is None:
        return False
    archs = list(getattr(config, "architectures", None) or [])
    same_arch = not archs or archs == list(original.get("architectures") or [])
    labels = getattr(config, "num_labels", None)
    orig_labels = len(original.get("id2label") or {}) or None
    return same_arch and (orig_labels is None or labels == orig_labels)


# --- sentence embeddings -------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states where ``mask`` is 1 (the all-MiniLM / sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encoder_of(model: nn.Module) -> nn.Module:
    """The module that maps (input_ids, attention_mask) to token states: the encoder of an encoder-decoder, the
    base model of a model with a head, or the model itself."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return model.get_encoder()
    return getattr(model, "base_model", model)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states (batch x seq x d) of a transformers model for a batch."""
    return encoder_of(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tokenize(tokenizer: Any, texts: list[str], max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """A padded batch (``input_ids``, ``attention_mask``) of texts, truncated to ``max_length`` tokens. A tokenizer
    without a padding token (GPT-2's) is padded on the right with its end-of-text token, or id 0: the attention
    mask hides the padding, so its id never counts."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rows = tokenizer(list(texts), padding=False, truncation=True, max_length=max_length)["input_ids"]
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def embed(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N x d, float32, on the CPU) of texts; batches are sorted by length."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), 0)
    parts: list[tuple[list[int], torch.Tensor]] = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        parts.append((idx, mean_pool(hidden_states(model, ids, mask), mask).float().cpu()))
    if parts:
        out = torch.empty(len(texts), parts[0][1].shape[1])
        for idx, emb in parts:
            out[idx] = emb
    model.train(was_training)
    return out


@dataclass
class Similarity:
    """Cosine similarity between two models' sentence embeddings, text by text."""

    mean: float
    worst: float
    p05: float
    median: float
    count: int
    worst_text: str
    per_text: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, per_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not per_text:
            d.pop("per_text")
        return d


def cosine_report(a: torch.Tensor, b: torch.Tensor, texts: list[str]) -> Similarity:
    """Mean, worst, 5th percentile and median of the row-wise cosine between two embedding matrices."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    i = int(cos.argmin())
    return Similarity(float(cos.mean()), float(cos.min()), float(torch.quantile(cos, 0.05)), float(cos.median()),
                      len(texts), texts[i], [round(float(c), 6) for c in cos])


def similarity(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Similarity:
    """Cosine between the student's and the teacher's mean-pooled embeddings of each text."""
    s = embed(student, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    t = embed(teacher, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return cosine_report(s, t, texts)
