"""Token frequencies for frequency-weighted factorization (``factorize --method weighted``).

Plain SVD minimises sum_i ||w_i - w^_i||^2 over all rows alike, so a token seen once costs as much rank as "the".
The weighted SVD minimises sum_i f_i ||w_i - w^_i||^2 instead (GroupReduce, Chen et al. 2018): scale row i by
sqrt(f_i), take the truncated SVD, scale back. The weights are counts plus a smoothing term (default 1, so that a
token absent from the counts still gets a reconstruction rather than a zero row), optionally raised to a power
below 1 to soften the dominance of the most frequent tokens.

Counts come from a file (``read_counts``) or are counted on a corpus with the model's own tokenizer
(``count_corpus``): the vocabulary of an embcompress classifier, or the tokenizer of a Hugging Face model folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import families, hf
from .errors import DataError, InputError

DEFAULT_SMOOTHING = 1.0


@dataclass(frozen=True)
class Counts:
    """How often each row (token id) of a table occurs, and where the counts came from."""

    counts: np.ndarray
    source: str
    tokens_counted: int
    unmatched: int = 0

    def weights(self, smoothing: float = DEFAULT_SMOOTHING, power: float = 1.0) -> torch.Tensor:
        """Row weights f_i = (count_i + smoothing) ** power (float64), the weights of the weighted SVD.

        ``power`` below 1 flattens Zipf's law: 0.5 weights by the square root of the count, 0 is plain SVD.
        """
        if not smoothing > 0 or not np.isfinite(smoothing):
            raise InputError(f"--smoothing must be a positive number, got {smoothing}")
        if not 0 <= power <= 4:
            raise InputError(f"--weight-power must be in [0, 4], got {power}")
        return torch.from_numpy((self.counts.astype(np.float64) + smoothing) ** power)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "tokens_counted": self.tokens_counted, "rows": int(self.counts.size),
                "rows_seen": int((self.counts > 0).sum()), "unmatched": self.unmatched}


def read_counts(path: str | os.PathLike[str], rows: int, tokens: Sequence[str] | None = None) -> Counts:
    """Counts from a file: a JSON list (count of row i at index i) or object (token or id -> count), or text lines
    of ``COUNT`` (line i = row i) or ``KEY COUNT`` (KEY a token of ``tokens`` or a row id). Keys not in the
    vocabulary are counted as unmatched and skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such counts file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stoi = {t: i for i, t in enumerate(tokens)} if tokens is not None else {}
    counts = np.zeros(rows, dtype=np.float64)
    unmatched = 0

    def add(key: str | int, value: object, where: str) -> None:
        nonlocal unmatched
        try:
            n = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(f"{p}{where}: a count must be a number, got {value!r}") from None
        if not np.isfinite(n) or n < 0:
            raise DataError(f"{p}{where}: a count must be finite and non-negative, got {value!r}")
        if isinstance(key, str) and key in stoi:
            idx: int | None = stoi[key]
        elif isinstance(key, int) or (isinstance(key, str) and key.isdigit() and not stoi):
            idx = int(key)
            if idx >= rows:
                raise DataError(f"{p}{where}: row id {idx} is beyond the table's {rows} rows")
        else:
            idx = None
        if idx is None:
            unmatched += 1
        else:
            counts[idx] += n

    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, list):
            if len(data) != rows:
                raise DataError(f"{p}: {len(data)} counts for a table of {rows} rows")
            for i, v in enumerate(data):
                add(i, v, f" (index {i})")
        elif isinstance(data, dict):
            for k, v in data.items():
                add(k, v, f" (key {k!r})")
        else:
            raise DataError(f"{p}: expected a JSON list of counts or an object of token -> count")
    else:
        lines = [(n, ln.split()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if lines and all(len(f) == 1 for _, f in lines):
            if len(lines) != rows:
                raise DataError(f"{p}: {len(lines)} counts (one a line) for a table of {rows} rows")
            for i, (n, f) in enumerate(lines):
                add(i, f[0], f":{n}")
        else:
            for n, f in lines:
                if len(f) != 2:
                    raise DataError(f"{p}:{n}: expected 'COUNT' or 'TOKEN COUNT', got {len(f)} fields")
                add(f[0], f[1], f":{n}")
    if not counts.any():
        raise DataError(f"{p}: no count matched a row of the table ({unmatched} keys not in the vocabulary)")
    return Counts(counts, str(p), int(counts.sum()), unmatched)


def count_ids(ids: Sequence[Sequence[int]] | np.ndarray, rows: int, source: str) -> Counts:
    """Counts of token ids (lists of ids, one per text) in a table of ``rows`` rows."""
    flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= rows):
        raise DataError(f"{source}: token ids fall outside the table's {rows} rows")
    counts = np.bincount(flat, minlength=rows).astype(np.float64)
    if not counts.any():
        raise DataError(f"{source}: the corpus holds no tokens")
    return Counts(counts, source, int(flat.size))


def count_corpus(model: str | os.PathLike[str], corpus: str | os.PathLike[str], rows: int) -> Counts:
    """Count the tokens of a corpus (``.txt`` one text a line, or ``.jsonl`` with ``text``) with the model's own
    tokenizer (its family's: an embcompress classifier's vocabulary, a Hugging Face folder's tokenizer)."""
    src = Path(model)
    return count_ids(families.detect(src).token_ids(src, hf.read_texts(corpus)), rows, str(corpus))


def vocabulary_of(model: str | os.PathLike[str]) -> list[str] | None:
    """The tokens of a model in id order, where the checkpoint carries them (embcompress classifiers, HF folders
    with a tokenizer); None otherwise."""
    src = Path(model)
    return families.detect(src).vocabulary(src)


def load_counts(model: str | os.PathLike[str], tables: list[str] | None, counts: str | os.PathLike[str] | None,
                corpus: str | os.PathLike[str] | None) -> Counts | None:
    """The counts ``factorize --counts FILE`` or ``--corpus TEXTS`` asks for, sized to the model's table rows
    (the tables ``tables`` picks, all of the same row count); None when neither is given."""
    if counts is None and corpus is None:
        return None
    if counts is not None and corpus is not None:
        raise InputError("give --counts or --corpus, not both")
    from .checkpoint import load_checkpoint
    from .tables import find_embeddings

    with load_checkpoint(model) as ckpt:
        found = find_embeddings(ckpt, tables=tables)
    rows = {t.shape[0] for t in found}
    if len(rows) != 1:
        raise InputError(f"the chosen tables have different row counts ({', '.join(map(str, sorted(rows)))}); "
                         "pick the tables of one vocabulary with --tables")
    (n,) = rows
    if corpus is not None:
        return count_corpus(model, corpus, n)
    return read_counts(counts, n, vocabulary_of(model))  # type: ignore[arg-type]
