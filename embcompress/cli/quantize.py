"""``embcompress quantize``: int8 or float16 weights, the fixed-point baseline the paper compares against."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..errors import InputError
from ..quant import quantize as quantize_checkpoint
from ._options import CheckpointArg, JsonOpt, split_list
from ._progress import spinner
from ._render import console, human_bytes, print_json, shape, table

EXAMPLES = """Examples:

  embcompress quantize model.safetensors                       (int8: writes model.int8.safetensors)

  embcompress quantize ./all-MiniLM-L6-v2 --bits 16 -o ./minilm-fp16 --json

  embcompress quantize dan.r90.safetensors --bits 8            (low rank + int8: the factors are quantized)

  embcompress quantize model.safetensors --tables embedding.weight -o model.emb-int8.safetensors --force
"""

_BITS_NAMES = {"8": 8, "int8": 8, "16": 16, "fp16": 16, "float16": 16}


def _bits(value: str) -> int:
    bits = _BITS_NAMES.get(value.strip().lower())
    if bits is None:
        raise InputError(f"--bits must be 8 (int8) or 16 (float16), got {value!r}")
    return bits


def quantize(
    path: CheckpointArg,
    bits: Annotated[str, typer.Option("--bits", "-b", help="8: symmetric int8 with a float32 scale per row "
                    "(tables, factors, linear weights; 1-D tensors stay as they are). 16: float16.")] = "8",
    tables: Annotated[list[str] | None, typer.Option("--tables", help="Quantize only these tensors: names or "
                      "globs (repeatable, or comma-separated); a factorized table's name selects its factors.",
                      show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write. Default: beside the "
                      "input (model.int8.safetensors, or FOLDER-int8 for a folder).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json: JsonOpt = False,
) -> None:
    """Quantize a checkpoint's weights to int8 (per row of each table, factor and linear weight, with float32
    scales) or float16, and report the bytes and the error of the dequantized weights.

    The output is the same kind as the input (a file, or a model folder with its config and tokenizer); its
    metadata ('embcompress.quant') records each quantized tensor, so `evaluate`, `finetune` and `export`
    dequantize it on load. Factorize first, then quantize: the factors are quantized too.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    nbits = _bits(bits)
    with spinner("reading checkpoint", not json) as say:
        result = quantize_checkpoint(path, nbits, output, force, tables=split_list(tables), progress=say)
    figures = {
        "bits": result.bits,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "tables": {t.name: {"rel_error": t.rel_error, "max_abs_error": t.max_abs_error} for t in result.tables},
    }
    workspace.record(
        "quantize",
        options={"bits": nbits, "tables": split_list(tables)},
        inputs=[("model", path)],
        outputs=[("model", Path(result.output))],
        figures=figures,
    )
    if json:
        print_json(result.to_dict())
        return
    kind = "int8" if result.bits == 8 else "float16"
    if result.tables:
        console.print(
            table(
                f"Quantized {result.input} -> {result.output} ({kind})",
                ["table", "shape", "role", "scheme", "bytes before", "bytes after", "max abs error", "rel. error"],
                [[t.name, shape(t.shape), t.role, t.scheme, human_bytes(t.bytes_before), human_bytes(t.bytes_after),
                  f"{t.max_abs_error:.3g}", f"{t.rel_error:.4f}"] for t in result.tables],
            )
        )
    console.print(
        table(
            "By group" if result.tables else f"Quantized {result.input} -> {result.output} ({kind}), by group",
            ["group", "tensors", "bytes before", "bytes after", "max abs error", "rel. error"],
            [[g.name, g.tensors, human_bytes(g.bytes_before), human_bytes(g.bytes_after), f"{g.max_abs_error:.3g}",
              f"{g.rel_error:.4f}"] for g in result.groups],
        )
    )
    console.print(
        f"whole file: {len(result.tensors)} tensors quantized, {result.passed_through} passed through; "
        f"{human_bytes(result.file_bytes_before)} -> {human_bytes(result.file_bytes_after)} on disk "
        f"({result.file_ratio:.3f} x), in {result.seconds:.1f} s"
    )
