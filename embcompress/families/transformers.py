"""Hugging Face transformers models: a folder with ``config.json`` (naming a ``model_type``), the weights in
safetensors and the tokenizer files; loaded with :mod:`embcompress.hf` (the ``[hf]`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import hf
from ..checkpoint import Checkpoint
from ..distill import evaluate_labelled
from ..errors import CheckpointError, DependencyError, InputError
from ..export.transformers import export_encoder
from . import _hf_vocab
from .base import ENCODER, Family, TrimVocabulary, register_family

# files a Hugging Face folder keeps its tokenizer in (transformers builds an empty tokenizer without them)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class TransformersFamily(Family):
    name = "transformers"
    description = "a Hugging Face transformers model folder (config.json, weights, tokenizer)"
    measures = ENCODER

    def detect(self, path: Path, ckpt: Checkpoint | None) -> bool:
        return hf.is_hf_folder(path)

    def vocabulary(self, path: Path) -> list[str] | None:
        try:
            vocab = hf.load_tokenizer(path).get_vocab()
        except (CheckpointError, DependencyError):  # no tokenizer, or no transformers: keys must be row ids
            return None
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        return tokens

    def token_ids(self, path: Path, texts: list[str]) -> list[list[int]]:
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise InputError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to count --corpus "
                             "with; give --counts")
        return hf.load_tokenizer(path)(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def trim_vocabulary(self, path: Path, ckpt: Checkpoint) -> TrimVocabulary:
        return _hf_vocab.trim_vocabulary(path, ckpt.config)

    def load_model(self, path: Path) -> nn.Module:
        return hf.load(path, task="base")

    def save_model(self, model: nn.Module, out: Path, *, like: Path, force: bool = False) -> None:
        hf.save(model, out, like=like, force=force)

    def export_onnx(self, path: Path, output: Path | None, **options: Any) -> Any:
        keys = ("opset", "quantize", "texts", "data", "device", "force", "threads", "tolerance", "block_size",
                "decode_at_load", "progress")
        extra = {"max_length": options["max_length"]} if options.get("max_length") else {}
        if options.get("calibration") is not None:
            extra["calibration"] = options["calibration"]
        if options.get("tune"):
            extra["tune"] = options["tune"]
        latency = options.get("latency")
        return export_encoder(path, output, latency=True if latency is None else latency,
                              **{k: options[k] for k in keys if k in options}, **extra)

    def evaluate_labels(self, path: Path, data: Path, *, batch_size: int, device: str) -> Any:
        return evaluate_labelled(path, data, batch_size=min(batch_size, 64), device=device)


FAMILY = register_family(TransformersFamily())
