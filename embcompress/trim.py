"""Vocabulary trimming: keep only the tokens a corpus uses, and remap the tokenizer so nothing else changes.

The corpus is tokenized once with the model's own tokenizer and counted (``weighting.count_ids``). The rows kept
are the tokens it uses (``min_count`` times or more, at most the ``keep_top`` most frequent), every special token,
and the pieces the tokenizer needs to cut the corpus the same way. Every other row of the vocabulary table goes,
from the table itself (or from W_a, ``<name>_a``, of a factorized table) and from every tensor tied to it or indexed
by token (an untied output layer, its bias). The kept rows keep their order; token i becomes the i-th kept one.

The model's family (:mod:`embcompress.families`) reads its tokenizer and rewrites it to the new ids:

* an embcompress classifier: the vocabulary in its ``embcompress.model`` metadata (and ``vocab_size``);
* a Hugging Face folder: ``tokenizer.json`` (WordPiece, BPE with its merges, Unigram or WordLevel; added tokens,
  post-processor and padding ids), ``vocab.txt``, ``vocab.json`` / ``merges.txt``, ``added_tokens.json``,
  ``tokenizer_config.json``'s ``added_tokens_decoder``, and ``config.json`` / ``generation_config.json``
  (``vocab_size`` and every ``*_token_id``). A sentencepiece ``*.model`` file cannot be rewritten: it is left out,
  and a ``tokenizer.json`` written from the loaded tokenizer takes its place.

Before anything is written the new tokenizer is run over the corpus: every text whose tokens were all kept must give
the same tokens as before, under their new ids (so the model's outputs for it are identical), or nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import families, hf
from ._version import __version__
from .checkpoint import META_KEY, Checkpoint, check_finite, check_output, default_output, load_checkpoint
from .errors import CheckpointError, DataError, InputError
from .quant import quant_meta
from .record import history

from .weighting import count_ids

TRIM_META_KEY = "embcompress.trim"
# Tensors indexed by token besides the table and its ties: output layers and their biases (rows = vocabulary).
_ROW_TENSORS = ("lm_head.weight", "lm_head.bias", "output.weight", "output.bias", "predictions.bias",
                "predictions.decoder.weight", "predictions.decoder.bias", "decoder.weight", "decoder.bias")
_LAST_AXIS_TENSORS = ("final_logits_bias",)


@dataclass
class TrimmedTensor:
    """One tensor whose token rows were cut."""

    name: str
    role: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    bytes_before: int
    bytes_after: int


@dataclass
class TrimResult:
    """What ``trim`` did: rows and bytes before and after, and where the kept tokens come from."""

    input: str
    output: str
    kind: str
    tokenizer: str
    corpus: str
    texts: int
    tokens_counted: int
    rows_before: int
    rows_after: int
    corpus_tokens: int
    special_tokens: int
    structural_tokens: int
    dropped_corpus_tokens: int
    coverage: float
    texts_changed: int
    tensors: list[TrimmedTensor]
    bytes_before: int
    bytes_after: int
    file_bytes_before: int
    file_bytes_after: int
    files_rewritten: list[str]
    files_dropped: list[str]
    keep_top: int | None
    min_count: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_kept(self) -> int:
        """Tokens in the new vocabulary (= rows of the trimmed table)."""
        return self.rows_after

    @property
    def row_ratio(self) -> float:
        return self.rows_after / self.rows_before if self.rows_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_kept"] = self.tokens_kept
        d["row_ratio"] = self.row_ratio
        return d


# --- the tensors indexed by token -------------------------------------------------------------------------------


def _row_tensors(ckpt: Checkpoint, tokens: int,
                 family: families.Family) -> tuple[int, dict[str, tuple[str, int]], dict[str, Any] | None]:
    """The vocabulary's row count and the tensors to cut: ``{name: (role, axis)}``; and the factorization record.

    The vocabulary table is the first of the family's default tables with at least ``tokens`` rows (a classifier's
    is always ``embedding.weight``); the other tables of that row count are cut with it."""
    meta = ckpt.embcompress_meta
    factorized = (meta or {}).get("tables") or {}
    cut: dict[str, tuple[str, int]] = {}
    if factorized:
        rows = set()
        for name, entry in factorized.items():
            if entry.get("blocks"):
                raise InputError(f"{ckpt.path}: {name!r} is stored in GroupReduce blocks, which trim cannot cut; "
                                 "trim the original model, then factorize the trimmed one")
            a_name = (entry.get("factors") or [f"{name}_a"])[0]
            if a_name not in ckpt.infos:
                raise CheckpointError(f"{ckpt.path}: the factor {a_name!r} of {name!r} is missing")
            rows.add(ckpt.infos[a_name].shape[0])
            cut[a_name] = ("W_a", 0)
        if len(rows) != 1:
            raise InputError(f"{ckpt.path}: the factorized tables have different row counts {sorted(rows)}")
        (V,) = rows
    else:
        tables = family.default_tables(ckpt)
        found = [t for t in tables if t.rows >= tokens] or tables
        V = found[0].rows
        for table in found:
            if table.rows != V:
                continue
            cut[table.name] = ("table", 0)
            cut.update({t: ("tied", 0) for t in table.tied if t in ckpt.infos})
    for name, info in ckpt.infos.items():
        if name in cut or not info.shape:
            continue
        if any(name == s or name.endswith("." + s) for s in _ROW_TENSORS) and info.shape[0] == V:
            cut[name] = ("output layer" if name.endswith("weight") else "output bias", 0)
        elif any(name == s or name.endswith("." + s) for s in _LAST_AXIS_TENSORS) and info.shape[-1] == V:
            cut[name] = ("output bias", len(info.shape) - 1)
    return V, cut, meta


# --- choosing the rows ------------------------------------------------------------------------------------------


def _choose(counts: np.ndarray, special: set[int], keep_top: int | None, min_count: int) -> tuple[list[int], int]:
    """Ids of the corpus tokens kept (by count, then id) and how many used tokens were left out."""
    used = [i for i in np.flatnonzero(counts) if int(i) not in special]
    eligible = sorted((int(i) for i in used if counts[i] >= min_count), key=lambda i: (-counts[i], i))
    kept = eligible[:keep_top] if keep_top is not None else eligible
    return kept, len(used) - len(kept)


# --- the command ------------------------------------------------------------------------------------------------


def trim(
    path: str | os.PathLike[str],
    corpus: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    keep_top: int | None = None,
    min_count: int = 1,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> TrimResult:
    """Keep only the vocabulary rows ``corpus`` uses (plus special tokens), remap the tokenizer, write ``output``.

    ``min_count``: a corpus token is kept when it occurs at least this often; ``keep_top``: at most this many of the
    most frequent corpus tokens are kept (specials and the pieces the tokenizer needs come on top). ``output``
    defaults to ``model.trim.safetensors`` (or ``<folder>-trim``) beside the input. Refuses a quantized checkpoint
    (trim first, then quantize) and a checkpoint whose tokenizer it cannot find.
    """
    start = time.perf_counter()
    if min_count < 1:
        raise InputError(f"--min-count must be at least 1, got {min_count}")
    if keep_top is not None and keep_top < 1:
        raise InputError(f"--keep-top must be at least 1, got {keep_top}")
    src, corpus_path = Path(path), Path(corpus)
    if not corpus_path.is_file():
        raise DataError(f"{corpus_path}: no such corpus file")
    out = Path(output) if output is not None else default_output(src, "trim")
    with load_checkpoint(src) as ckpt:
        quantized = quant_meta(ckpt)
        if quantized is not None:
            raise InputError(f"{src}: the checkpoint is quantized ({quantized.get('bits')}-bit); trim before "
                             "quantizing (trim the float model, then quantize the result)")
        check_output(out, [src, corpus_path], force=force)
        family = families.detect(src, ckpt)
        tok = family.trim_vocabulary(src, ckpt)
        V, cut, fact_meta = _row_tensors(ckpt, tok.size, family)
        if tok.size > V:
            raise InputError(f"{src}: the tokenizer has {tok.size} tokens but the table only {V} rows")
        if progress:
            progress(f"counting {corpus_path} with the model's tokenizer")
        texts = hf.read_texts(corpus_path)
        old_ids = tok.encode(texts)  # tokenized once: counted here, compared with the new tokenizer's ids below
        counts = count_ids(old_ids, V, str(corpus_path))
        special = {i for i in tok.special if i < V}
        corpus_kept, dropped = _choose(counts.counts, special, keep_top, min_count)
        if not corpus_kept:
            unused = "no token of the corpus is in the vocabulary" if dropped == 0 else \
                f"no corpus token passes --min-count {min_count}"
            raise DataError(f"{corpus_path}: {unused}; nothing to keep")
        base = special | set(corpus_kept)
        structural = {i for i in tok.structural(base, texts) if i < V} - base
        keep = sorted(base | structural)
        remap = {old: new for new, old in enumerate(keep)}
        index = torch.tensor(keep, dtype=torch.long)
        tensors: dict[str, torch.Tensor] = {}
        trimmed: list[TrimmedTensor] = []
        for name in ckpt.names:
            t = ckpt.tensor(name)
            check_finite(name, t, what="tensor", action="trim it")
            if name in cut:
                role, axis = cut[name]
                t = t.index_select(axis, index).contiguous()
                info = ckpt.infos[name]
                trimmed.append(TrimmedTensor(name, role, info.shape, tuple(t.shape), info.nbytes,
                                             t.numel() * t.element_size()))
            tensors[name] = t
        seen = float(counts.counts.sum())
        coverage = float(counts.counts[keep].sum()) / seen if seen else 1.0
        record = {"tool": f"embcompress {__version__}", "corpus": corpus_path.name, "rows_before": V,
                  "rows_after": len(keep), "keep_top": keep_top, "min_count": min_count,
                  "tokens_counted": counts.tokens_counted}
        metadata = {TRIM_META_KEY: json.dumps(record)}
        if fact_meta is not None:
            fact_meta = json.loads(json.dumps(fact_meta))
            for entry in (fact_meta.get("tables") or {}).values():
                if entry.get("shape"):
                    entry["shape"][0] = len(keep)
            fact_meta["history"] = history(fact_meta, "trim", {"corpus": corpus_path.name, "keep_top": keep_top,
                                                               "min_count": min_count, "rows_after": len(keep)})
            metadata[META_KEY] = json.dumps(fact_meta)
        if progress:
            progress(f"writing {out}")
        changed, rewritten, left_out = tok.write(ckpt, tensors, out, keep, remap, V, metadata, old_ids, texts,
                                                 str(corpus_path))
        file_after = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*.safetensors")))
        notes = []
        if fact_meta is not None:
            notes.append("factorized checkpoint: rows of W_a were cut, W_b is unchanged")
        return TrimResult(
            input=str(src), output=str(out), kind=tok.kind, tokenizer=tok.describe, corpus=str(corpus_path),
            texts=len(texts), tokens_counted=counts.tokens_counted, rows_before=V, rows_after=len(keep),
            corpus_tokens=len(corpus_kept), special_tokens=len(special), structural_tokens=len(structural),
            dropped_corpus_tokens=dropped, coverage=coverage, texts_changed=changed, tensors=trimmed,
            bytes_before=ckpt.total_bytes, bytes_after=sum(t.numel() * t.element_size() for t in tensors.values()),
            file_bytes_before=ckpt.file_bytes, file_bytes_after=file_after, files_rewritten=rewritten,
            files_dropped=left_out, keep_top=keep_top, min_count=min_count, seconds=time.perf_counter() - start,
            notes=notes,
        )


