"""Finding the embedding tables of a checkpoint, and the tensors tied to them.

A table is a 2-D floating tensor chosen either by name (a component such as ``word_embeddings``, ``wte``,
``tok_embeddings``, ``embed_tokens`` or ``shared``, with many more rows than columns) or, when no name matches, by
shape alone (a tall table of at least 1024 rows). Each table carries the reason it was chosen.

Ties (an output layer sharing the table) are found three ways: the same storage in a torch state dict, identical
bytes in the file, or ``tie_word_embeddings`` in ``config.json`` for an output layer the file does not store. The
last is reported (as tied by the config, not stored) only when the file holds the model with its head: the table
sits under a base-model prefix (``transformer.wte``, ``model.embed_tokens``), another tensor of the head is stored
(``cls.predictions.bias``, ``lm_head.dense.weight``), or an encoder-decoder stores its decoder (T5). A bare encoder
saved with its pre-training config (sentence-transformers keep ``MPNetForMaskedLM``) has no output layer to tie.
A tied group is factorized once.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, TensorInfo
from .errors import TableError

# Name components that mark a token-embedding table, in order of preference when several tensors are tied.
NAME_PATTERNS: tuple[str, ...] = (
    "shared",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "embed_tokens",
    "token_embedding",
    "token_embeddings",
    "word_emb",
    "embeddings",
    "embedding",
    "embed",
    "emb",
    "lookup",
)
# Components that mark embeddings that are not of tokens (positions, segments) and are left alone.
EXCLUDE_PATTERNS: tuple[str, ...] = ("position", "pos_emb", "wpe", "token_type", "segment", "norm", "rotary")
MIN_ROWS_PER_COLUMN = 2  # a name-matched table must have at least this many rows per column
SHAPE_ONLY_ROWS_PER_COLUMN = 16  # without a name match: this much taller than wide ...
SHAPE_ONLY_MIN_ROWS = 1024  # ... and at least this many rows
OUTPUT_LAYER_NAMES = ("lm_head.weight", "output.weight", "cls.predictions.decoder.weight", "decoder.weight")
_HEAD_ARCHS = re.compile(r"(LMHead|ForCausalLM|ForMaskedLM|ForConditionalGeneration|ForPreTraining)")
# Modules of output heads (BERT, RoBERTa/MPNet/GPT-2/T5, ALBERT, DistilBERT, ELECTRA): a stored tensor under one
# of them shows the file holds the head.
HEAD_MODULES = ("cls", "lm_head", "predictions", "vocab_projector", "vocab_transform", "generator_lm_head",
                "generator_predictions")
CONFIG_TIE = "tied by the config, not stored in the file"


@dataclass
class EmbeddingTable:
    """A table chosen for factorization."""

    name: str
    shape: tuple[int, int]
    dtype: str
    reason: str
    tied: list[str] = field(default_factory=list)
    tie_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _components(name: str) -> list[str]:
    parts = name.split(".")
    if parts and parts[-1] in ("weight", "weight_a", "weight_b"):
        parts = parts[:-1]
    return parts


def _name_match(name: str) -> str | None:
    parts = [p.lower() for p in _components(name)]
    for part in parts:
        if any(x in part for x in EXCLUDE_PATTERNS):
            return None
    for pattern in NAME_PATTERNS:
        if any(part == pattern or part.endswith("_" + pattern) or part.startswith(pattern) for part in parts):
            return pattern
    return None


def is_embedding_candidate(name: str, shape: tuple[int, ...]) -> tuple[bool, str]:
    """Whether a 2-D tensor of this name and shape looks like a token-embedding table, and why (or why not)."""
    if len(shape) != 2:
        return False, f"{len(shape)}-D"
    V, d = shape
    pattern = _name_match(name)
    if pattern is not None:
        if V >= MIN_ROWS_PER_COLUMN * d:
            return True, f"name contains '{pattern}'; {V} rows >= {MIN_ROWS_PER_COLUMN} x {d} columns"
        return False, f"name contains '{pattern}' but only {V} rows for {d} columns"
    if V >= SHAPE_ONLY_ROWS_PER_COLUMN * d and V >= SHAPE_ONLY_MIN_ROWS:
        return True, f"shape only: {V} rows >= {SHAPE_ONLY_ROWS_PER_COLUMN} x {d} columns (no name match)"
    return False, "name and shape do not match a token table"


def _priority(name: str) -> int:
    pattern = _name_match(name)
    return NAME_PATTERNS.index(pattern) if pattern in NAME_PATTERNS else len(NAME_PATTERNS)


def _factor_names(ckpt: Checkpoint) -> set[str]:
    meta = ckpt.embcompress_meta or {}
    names: set[str] = set()
    for entry in (meta.get("tables") or {}).values():
        names.update(entry.get("factors", []))
    return names


def _identical(ckpt: Checkpoint, a: TensorInfo, b: TensorInfo) -> str | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return None
    if ckpt.same_storage(a.name, b.name):
        return "same storage"
    if ckpt.tensor(a.name).equal(ckpt.tensor(b.name)):
        return "identical bytes"
    return None


def _config_ties(ckpt: Checkpoint) -> bool:
    config = ckpt.config or {}
    archs = config.get("architectures") or []
    has_head = any(_HEAD_ARCHS.search(str(a)) for a in archs)
    if "tie_word_embeddings" in config:
        # transformers writes tie_word_embeddings: true for every model; a bare encoder (BertModel) has no head
        return bool(config["tie_word_embeddings"]) and (has_head or not archs)
    return has_head


def _head_name(ckpt: Checkpoint) -> str:
    """The output layer a config tie refers to: BERT's MLM decoder, RoBERTa/MPNet's ``lm_head.decoder``, else
    ``lm_head`` (GPT-2, T5, Llama ...)."""
    config = ckpt.config or {}
    if any(str(a).startswith("Bert") and ("MaskedLM" in str(a) or "PreTraining" in str(a))
           for a in config.get("architectures") or []):
        return "cls.predictions.decoder.weight"
    if any(name.startswith("lm_head.dense.") for name in ckpt.infos):
        return "lm_head.decoder.weight"
    return "lm_head.weight"


def _holds_head(ckpt: Checkpoint, table: str) -> bool:
    """Whether the file is of the model with its output head (see the module docstring), so that a config tie
    names a layer of this model rather than of the pre-training model the config was copied from."""
    if any(name.split(".")[0] in HEAD_MODULES for name in ckpt.infos):
        return True
    first = table.split(".")[0]
    if "." in table.removesuffix(".weight") and _name_match(first) is None:
        return True  # transformer.wte.weight, model.embed_tokens.weight: a base model inside a head model
    archs = (ckpt.config or {}).get("architectures") or []
    return (any("ForConditionalGeneration" in str(a) for a in archs)
            and any(name.split(".")[0] == "decoder" for name in ckpt.infos))


def tie_label(name: str, how: str) -> str:
    """A tied tensor's name as shown to the user: ``lm_head.weight (tied by the config, not stored in the file)``
    when only the config ties it, else the name."""
    return f"{name} ({how})" if how == CONFIG_TIE else name


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name == f"{pattern}.weight"


def find_embeddings(ckpt: Checkpoint, tables: list[str] | None = None) -> list[EmbeddingTable]:
    """The embedding tables of a checkpoint, each with its reason and ties.

    ``tables`` (names or globs) overrides the search: each must match at least one 2-D floating tensor.
    Raises TableError when nothing is found or a name matches nothing usable.
    """
    factors = _factor_names(ckpt)
    candidates: list[tuple[TensorInfo, str]] = []
    if tables:
        for pattern in tables:
            hits = [info for info in ckpt.infos.values() if _matches(info.name, pattern)]
            if not hits:
                raise TableError(f"--tables {pattern!r}: no tensor of that name (see 'embcompress inspect')")
            usable = [info for info in hits if len(info.shape) == 2 and info.is_floating]
            if not usable:
                info = hits[0]
                raise TableError(
                    f"--tables {pattern!r}: {info.name} is {len(info.shape)}-D {info.dtype}, not a 2-D floating table"
                )
            for info in usable:
                if info.name in factors:
                    raise TableError(f"--tables {pattern!r}: {info.name} is already a factor of a factorized table")
                if all(c.name != info.name for c, _ in candidates):
                    candidates.append((info, f"named by --tables {pattern!r}"))
    else:
        shape_only: list[tuple[TensorInfo, str]] = []
        small: list[tuple[TensorInfo, str]] = []  # named like a table, too few rows to gain from factorizing
        for info in ckpt.infos.values():
            if len(info.shape) != 2 or not info.is_floating or info.name in factors:
                continue
            ok, reason = is_embedding_candidate(info.name, info.shape)
            if ok:
                (shape_only if reason.startswith("shape only") else candidates).append((info, reason))
            elif _name_match(info.name) is not None:
                small.append((info, reason))
        if not candidates and small:
            # a tall tensor with another name (an MLP weight, say) is not the table when the table is there
            info, reason = small[0]
            raise TableError(f"{ckpt.path}: the embedding table {info.name} ({reason}) is too small to gain from "
                             "factorizing; name a tensor with --tables to factorize it anyway")
        if not candidates:
            candidates = shape_only
    if not candidates:
        already = " (it is already factorized)" if factors else ""
        raise TableError(f"{ckpt.path}: no embedding table found{already}; name one with --tables")

    # Group tied tensors: a candidate identical to a better-named one is its tie, not a table of its own.
    candidates.sort(key=lambda c: (_priority(c[0].name), c[0].name))
    chosen: list[EmbeddingTable] = []
    claimed: set[str] = set()
    for info, reason in candidates:
        if info.name in claimed:
            continue
        table = EmbeddingTable(info.name, (info.shape[0], info.shape[1]), info.dtype, reason)
        for other in ckpt.infos.values():
            if other.name == info.name or other.name in claimed or other.name in factors:
                continue
            how = _identical(ckpt, info, other)
            if how:
                table.tied.append(other.name)
                table.tie_reasons[other.name] = how
                claimed.add(other.name)
        claimed.add(info.name)
        chosen.append(table)
    if (_config_ties(ckpt) and chosen and not chosen[0].tied and _holds_head(ckpt, chosen[0].name)
            and not any(n in ckpt.infos for n in (*OUTPUT_LAYER_NAMES, _head_name(ckpt)))):
        head = _head_name(ckpt)
        chosen[0].tied.append(head)
        chosen[0].tie_reasons[head] = CONFIG_TIE
    order = {name: i for i, name in enumerate(ckpt.infos)}
    chosen.sort(key=lambda t: order[t.name])
    return chosen


def group_name(tensor_name: str) -> str:
    """``encoder.layer.3.attention.self.query.weight`` -> ``encoder.layer.*``; ``embeddings.x`` -> ``embeddings``."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[:i] + ["*"])
    return parts[0] if len(parts) > 1 else tensor_name
