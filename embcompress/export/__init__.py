"""One ONNX exporter for every model family.

``onnx.py`` holds the pipeline (float32 graph, parity in onnxruntime, weight-only or fp16 quantization, latency,
metadata, atomic write) and the onnxruntime session; ``weights.py`` the weight-only quantization; each family gives
its graph: ``classifier.py`` (the DAN and LSTM classifiers) and ``transformers.py`` (Hugging Face encoders).
:func:`export_onnx` picks the family from the input.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..hf import is_hf_folder
from .classifier import (
    DANExport,
    ExportReport,
    LSTMExport,
    Parity,
    export_classifier,
    export_module,
    parity_batches,
    read_texts,
)
from .onnx import (
    FP32_TOLERANCE,
    LATENCY_REPEATS,
    OPSET_RANGE,
    QUANTIZE_CHOICES,
    ParityError,
    TensorSpec,
    default_onnx_output,
    make_session,
    measure_latency,
    write_fp32_graph,
)
from .transformers import MIN_COSINE, PARITY_TEXTS, EncoderExport, OnnxExport, export_encoder
from .weights import DEFAULT_BLOCK_SIZE, quantize_weights

__all__ = [
    "DANExport", "DEFAULT_BLOCK_SIZE", "EncoderExport", "ExportReport", "FP32_TOLERANCE", "LATENCY_REPEATS",
    "LSTMExport", "MIN_COSINE", "OPSET_RANGE", "OnnxExport", "PARITY_TEXTS", "Parity", "ParityError",
    "QUANTIZE_CHOICES", "TensorSpec", "default_onnx_output", "export_classifier", "export_encoder", "export_module",
    "export_onnx", "make_session", "measure_latency", "parity_batches", "quantize_weights", "read_texts",
    "write_fp32_graph",
]


def export_onnx(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    quantize: str | None = None,
    opset: int = 17,
    data: str | os.PathLike[str] | None = None,
    texts: list[str] | None = None,
    device: str = "auto",
    force: bool = False,
    threads: int | None = None,
    fold_projection: bool = True,
    max_length: int | None = None,
    tolerance: float | None = None,
    latency: bool | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Callable[[str], None] | None = None,
) -> ExportReport | OnnxExport:
    """Export a classifier file (:func:`export_classifier`, an :class:`ExportReport`) or a Hugging Face folder
    (:func:`export_encoder`, an :class:`OnnxExport`) to ONNX, checked against torch and written atomically.

    ``quantize``: None, ``int8`` / ``int4`` (weight-only) or ``fp16`` (classifiers). ``latency`` (default: for
    encoders) times the written graph at batch 1 and 64. ``texts``, ``max_length`` and ``tolerance`` are the
    encoders'; ``fold_projection`` the classifiers'.
    """
    if is_hf_folder(model_path):
        return export_encoder(model_path, output, opset=opset, quantize=quantize, texts=texts, data=data,
                              device=device, force=force, threads=threads, tolerance=tolerance,
                              latency=True if latency is None else latency, block_size=block_size,
                              progress=progress, **({"max_length": max_length} if max_length else {}))
    return export_classifier(model_path, output, quantize=quantize, opset=opset, data=data, device=device,
                             force=force, threads=threads, fold_projection=fold_projection, latency=bool(latency),
                             block_size=block_size, progress=progress)
