"""onnxruntime, an optional dependency: imported on demand, with a message naming the extra when it is missing.

Two PyPI packages provide the ``onnxruntime`` module: ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` (CUDA, runs on
CPU too). They clash when both are installed, so the project offers them as the extras ``[onnxruntime]`` and
``[onnxruntime-gpu]`` and never requires both.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import DependencyError

MISSING = (
    "onnxruntime is not installed: pip install 'embcompress[onnxruntime]' (CPU) or "
    "'embcompress[onnxruntime-gpu]' (CUDA), not both"
)


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or DependencyError naming the extras to install.

    ``ORT_DISABLE_TELEMETRY=1`` is set first (unless already set): onnxruntime writes telemetry files under the home
    folder when imported otherwise.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise DependencyError(MISSING) from None


def execution_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for a device: CUDA first where it is available and asked for, CPU always last."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
