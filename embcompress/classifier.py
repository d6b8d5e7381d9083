"""A whole text classifier in one ``.safetensors`` file: weights, vocabulary, labels, architecture and history.

``train`` writes such a file; ``factorize`` turns its table into W_a, W_b (keeping this metadata); ``finetune``,
``evaluate`` and ``export`` need nothing else to use it. The metadata key ``embcompress.model`` holds JSON:
``{"config": {...architecture...}, "vocab": {...}, "labels": {...}, "train": {...}, "history": [...]}``.
A factorized table is recognised by its ``<module>.weight_a`` / ``<module>.weight_b`` tensors, whose shapes give
the rank, so a factorized and fine-tuned model loads without any other file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import core, record
from .checkpoint import META_KEY, check_output, load_checkpoint, save_safetensors
from .data import EncodedDataset, Example, LabelSet, Vocab, encode_examples
from .errors import CheckpointError
from .models import build_model, model_config
from .modules import factor_specs, factorized_shapes
from .quant import dequantized_state_dict

MODEL_META_KEY = "embcompress.model"


@dataclass
class Classifier:
    """A model with everything needed to feed it text and name its predictions."""

    model: nn.Module
    vocab: Vocab
    labels: LabelSet
    train: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    factorization: str | None = None  # the raw ``embcompress`` metadata of a factorized file, carried forward

    def encode(self, examples: list[Example], max_len: int | None = None) -> EncodedDataset:
        """Examples as token ids and class indices (a label unseen in training is a DataError naming its line)."""
        return encode_examples(examples, self.vocab, self.labels, max_len=max_len)

    @property
    def is_factorized(self) -> bool:
        return bool(factor_specs({n: tuple(t.shape) for n, t in self.model.state_dict().items()}))


def load_classifier(path: str | os.PathLike[str]) -> Classifier:
    """Read a classifier written by ``save_classifier`` (dense, factorized, or fine-tuned after factorizing), or
    by ``quantize`` from one (dequantized: the model is float32)."""
    with load_checkpoint(path) as ckpt:
        raw = ckpt.metadata.get(MODEL_META_KEY)
        if raw is None:
            raise CheckpointError(
                f"{path}: not an embcompress classifier (no '{MODEL_META_KEY}' metadata; train one with "
                "'embcompress train')"
            )
        try:
            meta = json.loads(raw)
            model = build_model(meta["config"])
            vocab = Vocab.from_dict(meta["vocab"])
            labels = LabelSet.from_dict(meta["labels"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the '{MODEL_META_KEY}' metadata is damaged ({e})") from None
        state = dequantized_state_dict(ckpt)  # a quantized file (embcompress quantize) loads as float
        factorization = ckpt.metadata.get(META_KEY)
        entries = (ckpt.embcompress_meta or {}).get("tables") or {}
        if any(core.is_v2_entry(e) for e in entries.values()):
            core.attach(model, state, entries, str(path))
        else:
            ranks = factor_specs({n: tuple(i.shape) for n, i in ckpt.infos.items()})
            if ranks:
                factorized_shapes(model, ranks)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture ({first[-1].strip()})") from None
    return Classifier(model, vocab, labels, meta.get("train") or {}, meta.get("history") or [], factorization)


def save_classifier(
    clf: Classifier, out: Path, *, inputs: list[Path] | None = None, force: bool = False, op: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Write the classifier atomically as one safetensors file (refusing to overwrite an input or, without
    ``force``, an existing file). A model with compressed tables carries the ``embcompress`` record (format 2,
    factorized tables with 0.1's fields too); ``op`` (``finetune``) and its ``options`` are added to its history."""
    check_output(out, inputs or [], force=force)
    meta = {
        "format": "pt",
        MODEL_META_KEY: json.dumps(
            {
                "config": model_config(clf.model),
                "vocab": clf.vocab.to_dict(),
                "labels": clf.labels.to_dict(),
                "train": clf.train,
                "history": clf.history,
            }
        ),
    }
    model = getattr(clf.model, "module", clf.model)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if core.tables_of(model):
        previous = json.loads(clf.factorization) if clf.factorization else {}
        state, entries = record.model_entries(model, previous.get("tables"), trained=op == "finetune")
        meta[META_KEY] = json.dumps(record.file_record(previous, entries, op=op, options=options,
                                                       **({"file": previous["file"]} if "file" in previous else {})))
    save_safetensors(state, out, meta)


def num_parameters(model: nn.Module) -> int:
    """Parameters of a model (a tied table counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, as written to disk (without the header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
