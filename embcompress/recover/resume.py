"""The resume state on disk: ``<output>.resume.pt`` beside a run's output, written atomically after every epoch of
the recovery loop and read back with ``torch.load(weights_only=True)``; train, finetune (all three kinds) use it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_torch
from ..errors import CheckpointError, InputError


def resume_path(output: Path) -> Path:
    """Where the per-epoch resume state of a run writing ``output`` lives."""
    return output.with_name(output.name + ".resume.pt")


# field of a resume state -> the type it must have; anything else is a damaged or foreign file
_RESUME_FIELDS: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "best": dict,
    "history": list, "signature": dict,
}


def load_resume(path: Path) -> dict[str, Any]:
    """The resume state at ``path``, its fields checked (a damaged or foreign file is refused in one line)."""
    if not path.is_file():
        raise InputError(f"--resume: no saved state at {path} (it is written after each finished epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable resume state ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a resume state (holds a {type(state).__name__})")
    for key, kind in _RESUME_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "epoch" and value < 0):
            raise CheckpointError(f"{path}: damaged resume state (field {key!r} is {value!r:.60}); delete it to "
                                  "start over")
    return state


def saved_epoch(path: Path) -> int:
    """The epoch a resume state on disk continues from (0 when there is none or it cannot be read): what an
    interrupted run tells the user to resume from."""
    try:
        return int(load_resume(path)["epoch"]) if path.is_file() else 0
    except InputError:
        return 0


def save_resume(state: dict[str, Any], path: Path) -> None:
    """Write a resume state atomically."""
    save_torch(state, path)
