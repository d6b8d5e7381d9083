"""The project's classifiers (DAN, LSTM): one safetensors file whose ``embcompress.model`` metadata holds the
architecture, the vocabulary and the labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint, save_checkpoint
from ..classifier import MODEL_META_KEY, Classifier, load_classifier, save_classifier
from ..data import PAD_ID, UNK_ID, Vocab, tokenize
from ..errors import CheckpointError, InputError
from ..export.classifier import export_classifier
from ..tables import EmbeddingTable, find_embeddings
from ..train.run import evaluate_classifier
from .base import CLASSIFIER, Family, TrimVocabulary, check_same_tokens, register_family

TABLE = "embedding.weight"  # the vocabulary table of every classifier the project builds


class ClassifierFamily(Family):
    name = "classifier"
    description = "an embcompress classifier (DAN or LSTM): one .safetensors file with its vocabulary and labels"
    measures = CLASSIFIER
    protocol = True

    def detect(self, path: Path, ckpt: Checkpoint | None) -> bool:
        return ckpt is not None and MODEL_META_KEY in ckpt.metadata

    def vocabulary(self, path: Path) -> list[str] | None:
        return load_classifier(path).vocab.tokens

    def token_ids(self, path: Path, texts: list[str]) -> list[list[int]]:
        vocab = load_classifier(path).vocab
        return [vocab.encode(tokenize(t)) for t in texts]

    def trim_vocabulary(self, path: Path, ckpt: Checkpoint) -> TrimVocabulary:
        try:
            meta = json.loads(ckpt.metadata[MODEL_META_KEY])
            vocab = Vocab.from_dict(meta["vocab"])
        except (json.JSONDecodeError, KeyError, TypeError, InputError) as e:
            raise CheckpointError(f"{ckpt.path}: the '{MODEL_META_KEY}' metadata is damaged ({e})") from None

        def write(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], out: Path, keep: list[int],
                  remap: dict[int, int], rows_before: int, metadata: dict[str, str], old_ids: list[list[int]],
                  texts: list[str], where: str) -> tuple[int, list[str], list[str]]:
            new_vocab = Vocab([vocab.tokens[i] for i in keep])
            changed = check_same_tokens(old_ids, [new_vocab.encode(tokenize(t)) for t in texts], remap, where)
            new_meta = {**meta, "vocab": new_vocab.to_dict(), "config": {**meta["config"], "vocab_size": len(keep)}}
            save_checkpoint(tensors, out, like=ckpt, metadata={**metadata, MODEL_META_KEY: json.dumps(new_meta)})
            return changed, [f"{MODEL_META_KEY} metadata"], []

        return TrimVocabulary("classifier", "embcompress vocabulary", len(vocab), {PAD_ID, UNK_ID},
                              lambda texts: [vocab.encode(tokenize(t)) for t in texts], lambda keep, texts: set(),
                              write)

    def default_tables(self, ckpt: Checkpoint) -> list[EmbeddingTable]:
        info = ckpt.infos.get(TABLE)
        if info is None or len(info.shape) != 2:
            return find_embeddings(ckpt)
        return [EmbeddingTable(info.name, (info.shape[0], info.shape[1]), info.dtype, "classifier table")]

    def load_model(self, path: Path) -> nn.Module:
        return load_classifier(path).model

    def save_model(self, model: nn.Module, out: Path, *, like: Path, force: bool = False) -> None:
        base = load_classifier(like)
        save_classifier(Classifier(model, base.vocab, base.labels, base.train, base.history, base.factorization),
                        out, inputs=[like], force=force)

    def export_onnx(self, path: Path, output: Path | None, **options: Any) -> Any:
        keys = ("quantize", "opset", "data", "device", "force", "threads", "fold_projection", "block_size",
                "decode_at_load", "progress")
        if options.get("calibration") is not None:
            raise InputError("--calibration is for the int4 export of a Hugging Face encoder (GPTQ calibration "
                             "texts); a classifier's int4 weights are rounded without calibration")
        if options.get("tune"):
            raise InputError("--tune is for the int4 export of a Hugging Face encoder (its layers' scales); a "
                             "classifier's int4 weights are rounded without tuning")
        return export_classifier(path, output, latency=bool(options.get("latency")),
                                 **{k: options[k] for k in keys if k in options})

    def evaluate_labels(self, path: Path, data: Path, *, batch_size: int, device: str) -> Any:
        return evaluate_classifier(path, data, device=device, batch_size=batch_size)


FAMILY = register_family(ClassifierFamily())
