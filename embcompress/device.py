"""Choosing the torch device: ``auto`` is CUDA where present, else the CPU. Every command's ``--device`` goes here."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import InputError


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (InputError when unavailable).

    Plain ``cuda`` means this process's GPU: LOCAL_RANK's in a distributed run, else the current device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but CUDA is not available (use --device cpu or auto)")
        if name == "cuda":
            index = int(os.environ["LOCAL_RANK"]) if is_distributed() and "LOCAL_RANK" in os.environ else None
            return torch.device("cuda", torch.cuda.current_device() if index is None else index)
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"bad device {name!r}") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
        return device
    raise InputError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
