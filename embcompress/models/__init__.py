"""The paper's text classifiers and their JSON configs.

Every model keeps its constructor arguments in ``model.config`` (with ``"arch"``), so ``build_model(model_config(m))``
rebuilds the same architecture: that config is what a checkpoint stores next to the weights. All models forward as
``model(ids, lengths) -> logits`` and keep their token table in the attribute ``embedding``.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..errors import InputError
from .dan import DAN
from .lstm import LSTMClassifier

MODELS: dict[str, type[nn.Module]] = {"dan": DAN, "lstm": LSTMClassifier}


def build_model(config: dict) -> nn.Module:
    """A new model from ``{"arch": "dan"|"lstm", ...constructor arguments}``; InputError on a bad config."""
    if not isinstance(config, dict) or "arch" not in config:
        raise InputError("a model config must be a dict with an 'arch' key")
    arch = config["arch"]
    if arch not in MODELS:
        raise InputError(f"unknown model arch {arch!r} (known: {', '.join(sorted(MODELS))})")
    cls = MODELS[arch]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        raise InputError(f"unknown {arch} config keys: {', '.join(unknown)}")
    missing = [n for n, p in params.items() if n != "self" and p.default is p.empty and n not in kwargs]
    if missing:
        raise InputError(f"{arch} config lacks required keys: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"bad {arch} config: {exc}") from None


def model_config(model: nn.Module) -> dict:
    """The JSON-serialisable config that ``build_model`` turns back into this architecture (a copy)."""
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper holds the model in .module
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("arch") not in MODELS:
        raise InputError(f"{type(model).__name__} carries no embcompress model config")
    return copy.deepcopy(config)


def init_embedding(model: nn.Module, vectors: torch.Tensor) -> None:
    """Copy pretrained vectors (V x d, e.g. from ``data.load_vectors``) into ``model.embedding``'s dense table."""
    table = getattr(model, "embedding", None)
    if not isinstance(table, nn.Embedding):
        raise InputError("the model has no dense nn.Embedding attribute 'embedding' to initialise")
    if tuple(vectors.shape) != tuple(table.weight.shape):
        raise InputError(f"vectors are {tuple(vectors.shape)}, the embedding table is {tuple(table.weight.shape)}")
    with torch.no_grad():
        table.weight.copy_(vectors)


__all__ = ["DAN", "MODELS", "LSTMClassifier", "build_model", "init_embedding", "model_config"]
