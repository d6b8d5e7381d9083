"""Any state-dict checkpoint (``.safetensors``, weights-only ``.pt``/``.bin``, or a folder of shards): its tensors
are compressed, quantized and inspected; it cannot be run, so it has no tokenizer, graph or evaluation."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from .base import Family, register_family


class StateDictFamily(Family):
    name = "statedict"
    description = "any state-dict checkpoint: tensors only (.safetensors, weights-only .pt/.bin, shards)"

    def detect(self, path: Path, ckpt: Checkpoint | None) -> bool:
        return True


FAMILY = register_family(StateDictFamily(), first=False)
