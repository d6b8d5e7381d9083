"""Text-classification data: JSON Lines examples, tokenizer, vocabulary, labels, batches and word vectors.

The pipeline is ``read_jsonl`` -> ``Vocab.build`` / ``LabelSet.from_examples`` on the training split ->
``EncodedDataset.from_examples`` per split -> batches from ``collate``. ``load_vectors`` fills an embedding table
from a GloVe text file. ``read_texts`` reads unlabelled texts (``.txt`` or ``.jsonl``) for the commands that need
no labels (distillation, calibration, token counts). Every error a data file can cause is a ``DataError`` whose
message starts with ``FILE:LINE:`` (or ``FILE:`` when no single line is to blame), so a user can jump straight to
the culprit.

Vocabulary and label set serialise to plain JSON (``to_dict``/``from_dict``) because they travel inside checkpoint
metadata: a model is useless without the exact token -> row mapping it was trained with.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch.utils.data import Dataset

from .checkpoint import special_kind
from .errors import DataError, InputError

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # read as JSON Lines; anything else is plain text

Label = int | str


@dataclass(frozen=True)
class Example:
    """One labelled text. ``source`` ("FILE:LINE") lets later errors point back at the input line."""

    text: str
    label: Label
    source: str | None = field(default=None, compare=False)


def _is_label(value: object) -> bool:
    # bool is an int subclass, but true/false as a class label is almost surely a mistake in the file
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _open_binary(path: Path, what: str) -> BinaryIO:
    """Open a data file for reading, turning OS errors into ``DataError`` naming it."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not {what}")
    kind = special_kind(path)
    if kind is not None:  # a FIFO would block the read forever, a device would never end
        raise DataError(f"{path}: is {kind}, not {what}; refusing to read it")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _decoded_lines(handle: BinaryIO, path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, UTF-8 text) pairs; a BOM is dropped; bad bytes raise DataError naming the line."""
    for lineno, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _type_word(label: Label) -> str:
    return "a string" if isinstance(label, str) else "an integer"


def _mixed_labels(first: Example, conflict: Example) -> str:
    return (f"{conflict.source}: label {conflict.label!r} is {_type_word(conflict.label)}, but {first.source} has "
            f"label {first.label!r}, {_type_word(first.label)}; the labels of a file must be all integers or all "
            "strings (0 and \"0\" would be two classes)")


def read_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"text": str, "label": int|str}`` objects, one per line; blank lines are skipped, extra keys ignored.

    Raises ``DataError`` naming the file and 1-based line for bad JSON (nested too deeply included), a non-object,
    a missing key, a value of the wrong type or a label whose type differs from an earlier line's (``0`` and
    ``"0"``), and naming the file when it is missing, not a regular file, unreadable, not UTF-8 or holds no example.
    """
    path = Path(path)
    examples: list[Example] = []
    first_of_type: dict[type, Example] = {}
    with _open_binary(path, "a JSON Lines file") as handle:
        for lineno, line in _decoded_lines(handle, path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with 'text' and 'label', got {type(obj).__name__}")
            for key in ("text", "label"):
                if key not in obj:
                    raise DataError(f"{where}: missing key {key!r}")
            text, label = obj["text"], obj["label"]
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            if not _is_label(label):
                raise DataError(f"{where}: 'label' must be an integer or a string, got {type(label).__name__}")
            example = Example(text, label, where)
            other = next((ex for t, ex in first_of_type.items() if t is not type(label)), None)
            if other is not None:
                raise DataError(_mixed_labels(other, example))
            first_of_type.setdefault(type(label), example)
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: holds no examples (an empty file or only blank lines)")
    return examples


# Tokenizer. Alternatives are tried left to right at each position, so order matters.
def read_texts(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Texts from ``.jsonl`` (a ``text`` field a line; a label or other keys are ignored) or any other file (one
    text a line); blank lines are skipped, at most ``limit`` texts are read."""
    p = Path(path)
    jsonl = p.suffix in JSONL_SUFFIXES
    texts: list[str] = []
    with _open_binary(p, "a text file") as handle:
        for lineno, line in _decoded_lines(handle, p):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{p}:{lineno}: expected a JSON object with a string 'text'")
                line = obj["text"]
            texts.append(line)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise DataError(f"{p}: holds no texts (an empty file or only blank lines)")
    return texts


_TOKEN_RE = re.compile(
    r"""
      -(?:lrb|rrb|lsb|rsb|lcb|rcb)-            # PTB bracket tokens, as in SST: -lrb- -rrb-
    | \w+(?=n't(?!\w))                         # "do" of don't (the n't is split off, PTB style)
    | n't(?!\w)                                # the negation clitic itself
    | '(?:s|re|ve|ll|d|m|t|em)(?!\w)           # clitics: it's -> it 's
    | '\d\ds(?!\w)                             # decades: '70s
    | (?:\w\.){2,}                             # dotted abbreviations: u.s. e.t. d.c.
    | (?<!\w)(?:mrs?|ms|dr|st|vs|jr|sr|etc|inc|bros|ltd|prof|mt|al)\.(?!\w)
                                               # common title/abbreviation words keep their dot: mr. etc.
    | (?<![\w.])[^\W\d_]\.(?=\s+\S)             # an initial inside a sentence: j. k. rowling
    | \w+(?:(?:-|\\?/|\.|,(?=\d)|'(?!(?:s|re|ve|ll|d|m|t|em)(?!\w)))\w+)*
                                               # words, joined by - / \/ . and non-clitic ' (o'brien), 3,000
    | \.\.\.|--|``|''|\\[/*]                   # multi-character punctuation, PTB-escaped \/ and \*
    | [^\w\s]                                  # any other punctuation mark is a token of its own
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[str]:
    """Lower-case and split into words and punctuation, PTB style.

    Punctuation marks become their own tokens; words keep inner hyphens, slashes, dots and digit commas
    (``re-imagining``, ``writer\\/director``, ``u.s.``, ``3,000``); common abbreviations (``mr.``, ``etc.``) and
    initials inside a sentence (``j. k.``) keep their dot. Contractions are split as the Penn Treebank
    does (``don't`` -> ``do n't``, ``it's`` -> ``it 's``), which is also how SST-2 is already written, so
    tokenizing SST-2 text gives back its own tokens and they match the keys of the SST GloVe file.
    """
    return _TOKEN_RE.findall(text.lower())


class Vocab:
    """Token <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1; unknown tokens encode to 1."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise InputError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {tokens[:2]!r}")
        self._itos = tokens
        self._stoi = {t: i for i, t in enumerate(tokens)}
        if len(self._stoi) != len(tokens):
            dupes = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise InputError(f"a vocabulary holds duplicate tokens: {dupes[:5]!r}")

    @classmethod
    def build(
        cls, texts: Iterable[str | Sequence[str]], min_count: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Count tokens (a string is run through ``tokenize``, a list is used as is) and keep the frequent ones.

        Order is by count, descending, then by token, so the same data always gives the same ids. ``max_size``
        caps the number of real tokens (the two specials come on top).
        """
        if min_count < 1:
            raise InputError(f"min_count must be at least 1, got {min_count}")
        if max_size is not None and max_size < 0:
            raise InputError(f"max_size must be 0 or more, got {max_size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text) if isinstance(text, str) else text)
        for special in (PAD, UNK):
            counts.pop(special, None)
        kept = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size]
        return cls([PAD, UNK, *kept])

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of the tokens; tokens not in the vocabulary map to ``<unk>`` (1)."""
        get = self._stoi.get
        return [get(t, UNK_ID) for t in tokens]

    def index(self, token: str) -> int:
        """Id of one token (``<unk>``'s id when absent)."""
        return self._stoi.get(token, UNK_ID)

    def token(self, index: int) -> str:
        """The token of an id."""
        return self._itos[index]

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order (a copy)."""
        return list(self._itos)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._itos == other._itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def to_dict(self) -> dict:
        """JSON-serialisable form: ``{"tokens": [...]}`` in id order (specials included)."""
        return {"tokens": list(self._itos)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        """Inverse of ``to_dict``; a malformed dict raises ``InputError``."""
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise InputError("vocabulary metadata must be {'tokens': [str, ...]}")
        return cls(tokens)


class LabelSet:
    """The ordered class labels of the training data; class index i is ``labels[i]``.

    Sorted so that the order does not depend on the file's order: integers numerically (so 0/1 labels keep their
    meaning as indices), strings alphabetically. Integers and strings are never mixed (``0`` and ``"0"`` would be two
    classes the user meant as one).
    """

    def __init__(self, labels: Sequence[Label]) -> None:
        labels = list(labels)
        if not labels:
            raise InputError("a label set needs at least one label")
        if not all(_is_label(x) for x in labels):
            raise InputError(f"labels must be integers or strings, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise InputError(f"duplicate labels in {labels!r}")
        self._labels = labels
        self._index = {x: i for i, x in enumerate(labels)}

    @classmethod
    def build(cls, labels: Iterable[Label]) -> LabelSet:
        """The distinct labels, sorted deterministically; integers and strings mixed are refused."""
        distinct = set(labels)
        if len({isinstance(x, str) for x in distinct}) > 1:
            raise InputError(f"labels mix integers and strings ({sorted(map(repr, distinct))[:6]}); use one type")
        return cls(sorted(distinct, key=lambda x: (isinstance(x, str), x)))

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> LabelSet:
        """The labels that occur in ``examples`` (the training split); a mix of integer and string labels raises
        ``DataError`` naming the first example whose type differs from an earlier one's."""
        examples = list(examples)
        first = examples[0] if examples else None
        for ex in examples:
            if first is not None and isinstance(ex.label, str) != isinstance(first.label, str):
                raise DataError(_mixed_labels(first, ex))
        return cls.build(ex.label for ex in examples)

    def index(self, label: Label, where: str | None = None) -> int:
        """Class index of ``label``; a label unseen in training raises ``DataError`` naming ``where`` (FILE:LINE)."""
        try:
            return self._index[label]
        except (KeyError, TypeError):
            prefix = f"{where}: " if where else ""
            known = ", ".join(repr(x) for x in self._labels[:10]) + (", ..." if len(self._labels) > 10 else "")
            raise DataError(f"{prefix}label {label!r} does not occur in the training data (known: {known})") from None

    @property
    def labels(self) -> list[Label]:
        """The labels in class-index order (a copy)."""
        return list(self._labels)

    def __getitem__(self, index: int) -> Label:
        return self._labels[index]

    def __len__(self) -> int:
        return len(self._labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self._labels == other._labels

    def __repr__(self) -> str:
        return f"LabelSet({self._labels!r})"

    def to_dict(self) -> dict:
        """JSON-serialisable form: ``{"labels": [...]}`` in class-index order."""
        return {"labels": list(self._labels)}

    @classmethod
    def from_dict(cls, data: dict) -> LabelSet:
        """Inverse of ``to_dict``; a malformed dict raises ``InputError``."""
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list):
            raise InputError("label metadata must be {'labels': [int|str, ...]}")
        return cls(labels)


@dataclass
class Batch:
    """A padded batch: ``ids`` (B x T, padded with 0), ``lengths`` (B, on the CPU) and ``labels`` (B)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move ``ids`` and ``labels``; ``lengths`` stays on the CPU, where ``pack_padded_sequence`` wants it."""
        return Batch(
            self.ids.to(device, non_blocking=non_blocking),
            self.lengths,
            self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this) for faster host-to-GPU copies."""
        return Batch(self.ids.pin_memory(), self.lengths, self.labels.pin_memory())

    def __len__(self) -> int:
        return self.ids.shape[0]


class EncodedDataset(Dataset):
    """Token-id sequences and class indices, ready for ``collate``; item i is ``(ids LongTensor, label int)``."""

    def __init__(
        self, sequences: Sequence[torch.Tensor], labels: Sequence[int], label_set: LabelSet | None = None
    ) -> None:
        if len(sequences) != len(labels):
            raise InputError(f"{len(sequences)} sequences but {len(labels)} labels")
        self.sequences = list(sequences)
        self.labels = [int(x) for x in labels]
        self.label_set = label_set

    @classmethod
    def from_examples(
        cls, examples: Sequence[Example], vocab: Vocab, label_set: LabelSet, *, max_len: int | None = None
    ) -> EncodedDataset:
        """Tokenize, encode and index every example; see ``encode_examples``."""
        return encode_examples(examples, vocab, label_set, max_len=max_len)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sequences[index], self.labels[index]


def encode_examples(
    examples: Sequence[Example], vocab: Vocab, label_set: LabelSet, *, max_len: int | None = None
) -> EncodedDataset:
    """Turn examples into an ``EncodedDataset``.

    ``max_len`` keeps the first ``max_len`` tokens. A text with no token becomes the single token ``<unk>``, so
    every sequence has length >= 1 (an LSTM cannot pack an empty sequence, and a mean over nothing is undefined).
    A label unseen in training raises ``DataError`` naming the example's file and line.
    """
    sequences = encode_texts([ex.text for ex in examples], vocab, max_len=max_len)
    labels = [label_set.index(ex.label, ex.source) for ex in examples]
    return EncodedDataset(sequences, labels, label_set)


def encode_texts(texts: Sequence[str], vocab: Vocab, *, max_len: int | None = None) -> list[torch.Tensor]:
    """Token ids of each text (the first ``max_len``; a text with no token becomes ``<unk>``), without labels."""
    if max_len is not None and max_len < 1:
        raise InputError(f"max_len must be at least 1, got {max_len}")
    return [torch.tensor(vocab.encode(tokenize(text))[:max_len] or [UNK_ID], dtype=torch.long) for text in texts]


def collate(
    items: Sequence[tuple[torch.Tensor, int]], max_len: int | None = None, pad_id: int = PAD_ID
) -> Batch:
    """Pad a list of ``(ids, label)`` items to the longest (capped at ``max_len``) into a ``Batch``."""
    if not items:
        raise InputError("cannot collate an empty batch")
    seqs = [s if max_len is None else s[:max_len] for s, _ in items]
    lengths = torch.tensor([max(len(s), 1) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    return Batch(ids, lengths, labels)


def iter_batches(dataset: EncodedDataset, batch_size: int, *, max_len: int | None = None) -> Iterable[Batch]:
    """The dataset in order, ``batch_size`` examples at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], max_len)


def load_vectors(
    path: str | Path, vocab: Vocab, dim: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """Build a ``len(vocab) x d`` float32 table from a GloVe text file; return it and how many tokens were found.

    Each line is ``word v1 ... vd`` separated by spaces; a word2vec-style header line ``COUNT DIM`` is skipped.
    ``dim`` defaults to the first line's; with ``dim`` given, a line with extra fields takes the leading ones as a
    word containing spaces (glove.840B has a few). A file word matches a vocabulary token exactly, or else after
    lower-casing (an exact match beats a lower-cased one; otherwise the first line wins).

    Tokens the file lacks (``<unk>`` included) are drawn from a normal distribution with the per-dimension mean and
    standard deviation of the found vectors, so they sit on the same scale as the pretrained rows (N(0, 1), as in
    ``nn.Embedding``, when fewer than two are found); ``seed`` makes them reproducible. The ``<pad>`` row is zero.
    Floats are parsed only for lines whose word is in the vocabulary; every line's field count is checked.
    """
    path = Path(path)
    rows: dict[int, torch.Tensor] = {}
    exact: set[int] = set()
    if dim is not None and dim < 1:
        raise InputError(f"dim must be at least 1, got {dim}")
    explicit_dim = dim is not None
    n_lines = 0
    with _open_binary(path, "a vectors file") as handle:
        for lineno, line in _decoded_lines(handle, path):
            parts = line.rstrip("\r\n").rstrip(" ").split(" ")
            if parts == [""]:
                continue
            if n_lines == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                header_dim = int(parts[1])
                if dim is not None and header_dim != dim:
                    raise DataError(f"{path}:{lineno}: header says dimension {header_dim}, expected {dim}")
                dim = header_dim
                n_lines += 1
                continue
            n_lines += 1
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise DataError(f"{path}:{lineno}: expected a word followed by numbers, got {line.strip()!r:.60}")
            if len(parts) != dim + 1 and not (explicit_dim and len(parts) > dim + 1):
                raise DataError(
                    f"{path}:{lineno}: {len(parts) - 1} values after the word, expected {dim} "
                    "(inconsistent dimension or a malformed line)"
                )
            word = " ".join(parts[:-dim])
            is_exact = word in vocab
            if not is_exact and word.lower() not in vocab:
                continue
            row = vocab.index(word if is_exact else word.lower())
            if row == PAD_ID or row in exact or (row in rows and not is_exact):
                continue
            if is_exact:
                exact.add(row)
            try:
                rows[row] = torch.tensor([float(v) for v in parts[-dim:]], dtype=torch.float32)
            except ValueError:
                raise DataError(f"{path}:{lineno}: a vector value is not a number") from None
            if not torch.isfinite(rows[row]).all():
                raise DataError(f"{path}:{lineno}: a vector value is not finite")
    if dim is None:
        raise DataError(f"{path}: holds no vectors (an empty file)")
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.zeros(dim), torch.ones(dim)
    if len(rows) > 1:
        found = torch.stack(list(rows.values()))
        mean, std = found.mean(0), found.std(0, unbiased=False)
    table = torch.randn(len(vocab), dim, generator=generator) * std + mean
    for row, vec in rows.items():
        table[row] = vec
    table[PAD_ID] = 0.0
    return table, len(rows)


def coverage(vocab: Vocab, found: int) -> float:
    """Share of the real (non-special) tokens that got a pretrained vector."""
    real = len(vocab) - 2
    return found / real if real > 0 else math.nan
