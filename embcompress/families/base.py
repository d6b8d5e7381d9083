"""A model family: everything that differs between a state-dict file, a project classifier and a transformers folder.

A family is one :class:`Family` subclass, registered with :func:`register_family`. It detects its own inputs and
answers every question the rest of the package would otherwise ask with an ``if`` on the kind of model: how to load
and save the model (like its input), its tokenizer (token ids for ``--corpus`` counts, the vocabulary, the tokenizer
trimming rewrites), its default tables, its ONNX graph, how to score it on labelled data, and what ``compare``
measures on it. Code outside ``families/`` calls ``detect(path)`` and then the family's methods; it never tests
which family it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint
from ..errors import InputError
from ..tables import EmbeddingTable, find_embeddings

ENCODER, CLASSIFIER = "encoder", "classifier"  # what compare measures: cosine to the original, or accuracy


@dataclass
class TrimVocabulary:
    """The model's tokenizer as ``trim`` sees it: its size, the ids it must keep, how it encodes texts, which
    pieces it needs to cut a corpus as before, and how the trimmed model is written with its remapped vocabulary.

    ``write(ckpt, tensors, out, keep, remap, metadata, old_ids, texts, where)`` writes the trimmed model (like its
    input) after checking the new tokenizer on the corpus; it returns (texts that lost a token, what was rewritten,
    what was left out)."""

    kind: str
    describe: str
    size: int
    special: set[int]
    encode: Callable[[list[str]], list[list[int]]]
    structural: Callable[[set[int], list[str]], set[int]]
    write: Callable[..., tuple[int, list[str], list[str]]]


def check_same_tokens(old: list[list[int]], new: list[list[int]], remap: dict[int, int], where: str) -> int:
    """Texts whose tokens were all kept must encode to the same tokens under the new ids; return how many texts
    lost a token (refused with one line when a kept text tokenizes differently)."""
    changed = 0
    for lineno, (before, after) in enumerate(zip(old, new), 1):
        if any(i not in remap for i in before):
            changed += 1
            continue
        if [remap[i] for i in before] != list(after):
            raise InputError(f"{where}: text {lineno} tokenizes differently after trimming; nothing was written")
    return changed


class Family:
    """One model family. Subclasses set the class attributes and override what their models can do; the base
    answers with one clear line for what the family cannot do."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: what ``compare`` measures on it (``ENCODER``: cosine to the original's sentence embeddings; ``CLASSIFIER``:
    #: accuracy), or None when it cannot run the model
    measures: ClassVar[str | None] = None
    #: the paper's training protocol applies (train the uncompressed model, baselines at equal epochs)
    protocol: ClassVar[bool] = False

    def detect(self, path: Path, ckpt: Checkpoint | None) -> bool:
        """True when ``path`` (opened as ``ckpt`` when it is a checkpoint) is one of this family's models."""
        raise NotImplementedError

    # --- tokenizer --------------------------------------------------------------------------------------------

    def vocabulary(self, path: Path) -> list[str] | None:
        """The tokens in id order, where the model carries them; None otherwise."""
        return None

    def token_ids(self, path: Path, texts: list[str]) -> list[list[int]]:
        """The texts tokenized with the model's own tokenizer (for ``--corpus`` token counts)."""
        raise InputError(f"{path}: --corpus needs the model's tokenizer: an embcompress classifier or a Hugging Face "
                         "folder with its tokenizer; give --counts for other checkpoints")

    def trim_vocabulary(self, path: Path, ckpt: Checkpoint) -> TrimVocabulary:
        """The tokenizer trimming rewrites (see :class:`TrimVocabulary`)."""
        raise InputError(f"{path}: its tokenizer is unknown (no vocabulary in the file and no Hugging Face tokenizer "
                         "beside it); trim needs an embcompress classifier or a Hugging Face folder with its "
                         "tokenizer")

    # --- tables, model, graph ---------------------------------------------------------------------------------

    def default_tables(self, ckpt: Checkpoint) -> list[EmbeddingTable]:
        """The tables a command compresses when none is named: the embedding tables found by shape and name."""
        return find_embeddings(ckpt)

    def load_model(self, path: Path) -> nn.Module:
        """The model, ready to run (compressed tables rebuilt from the record)."""
        raise InputError(f"{path}: not an embcompress classifier nor a Hugging Face folder; a bare state dict cannot "
                         "be run")

    def save_model(self, model: nn.Module, out: Path, *, like: Path, force: bool = False) -> None:
        """Write ``model`` in the form of its input ``like``."""
        raise InputError(f"{like}: a bare state dict cannot be written from a model")

    def export_onnx(self, path: Path, output: Path | None, **options: Any) -> Any:
        """Export to ONNX (the family's graph, each table's own lowering), checked against torch."""
        raise InputError(f"{path}: not an embcompress classifier nor a Hugging Face folder; ONNX export needs a model "
                         "it can run")

    def evaluate_labels(self, path: Path, data: Path, *, batch_size: int, device: str) -> Any:
        """Accuracy on labelled examples (``evaluate MODEL --data test.jsonl``)."""
        raise InputError(f"{path}: not an embcompress classifier nor a Hugging Face folder; evaluate needs a model it "
                         "can run (and --similarity-to ORIGINAL for an encoder)")


_FAMILIES: list[Family] = []


def register_family(family: Family, *, first: bool = True) -> Family:
    """Add a family; detection asks the families registered last first (the state-dict family, registered with
    ``first=False``, is the fallback)."""
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered")
    if first:
        _FAMILIES.insert(0, family)
    else:
        _FAMILIES.append(family)
    return family


def families() -> list[Family]:
    """The registered families, in the order detection asks them."""
    return list(_FAMILIES)


def detect(path: str | os.PathLike[str], ckpt: Checkpoint | None = None) -> Family:
    """The family of the model at ``path`` (a folder or a checkpoint file; ``ckpt`` when it is already open)."""
    src = Path(path)
    if ckpt is None and not src.is_dir():  # a file (a missing one gets the checkpoint reader's one-line error)
        with load_checkpoint(src) as opened:
            return _ask(src, opened)
    return _ask(src, ckpt)


def _ask(src: Path, ckpt: Checkpoint | None) -> Family:
    for family in _FAMILIES:
        if family.detect(src, ckpt):
            return family
    raise InputError(f"{src}: no model family recognises it")
