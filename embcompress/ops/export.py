"""``export``: a model file or folder -> ONNX, through its model family's graph (:mod:`embcompress.families`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .. import families
from ..checkpoint import check_output
from ..export import DEFAULT_BLOCK_SIZE, ExportReport, OnnxExport
from ..export.onnx import check_options


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
    calibration: int | None = None,
    decode_at_load: bool = False,
    tune: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExportReport | OnnxExport:
    """Export a model to ONNX with its family's graph, checked against torch and written atomically: a classifier
    file (:func:`~embcompress.export.export_classifier`, an :class:`ExportReport`) or a Hugging Face folder
    (:func:`~embcompress.export.export_encoder`, an :class:`OnnxExport`).

    ``quantize``: None, ``int8`` / ``int4`` (weight-only) or ``fp16`` (classifiers). ``latency`` (default: for
    encoders) times the written graph at batch 1 and 64. ``texts``, ``max_length`` and ``tolerance`` are the
    encoders' (and ``calibration``, the number of GPTQ calibration texts of an int4 encoder, and ``tune``, the
    distillation steps of its int4 layers' scales, biases and norms); ``fold_projection``
    the classifiers'. ``decode_at_load``: the compressed tables are decoded by onnxruntime when it loads the file
    (small file, float32 lookup speed and memory; see :class:`~embcompress.export.onnx.DecodedAtLoad`).
    """
    src, out = Path(model_path), Path(output) if output is not None else None
    check_options(quantize, opset, threads)  # the checks that need no model, before it is read
    if out is not None:
        check_output(out, [src], force=force)
    return families.detect(src).export_onnx(
        src, out, quantize=quantize, opset=opset, data=data, texts=texts,
        device=device, force=force, threads=threads, fold_projection=fold_projection, max_length=max_length,
        tolerance=tolerance, latency=latency, block_size=block_size, calibration=calibration,
        decode_at_load=decode_at_load, tune=tune, progress=progress)
