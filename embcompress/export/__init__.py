"""One ONNX exporter for every model family.

``onnx.py`` holds the pipeline (float32 graph, parity in onnxruntime, weight-only or fp16 quantization, latency,
metadata, atomic write) and the onnxruntime session; ``weights.py`` the weight-only quantization; each family gives
its graph: ``classifier.py`` (the DAN and LSTM classifiers) and ``transformers.py`` (Hugging Face encoders).
:func:`embcompress.ops.export.export_onnx` asks the input's model family (:mod:`embcompress.families`) for its
graph.
"""

from __future__ import annotations

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
    "make_session", "measure_latency", "parity_batches", "quantize_weights", "read_texts",
    "write_fp32_graph",
]
