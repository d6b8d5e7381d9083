"""``embcompress quantize``: int8 or float16 weights, the fixed-point baseline the paper compares against."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..errors import InputError
from ..ops.compress import compress as compress_checkpoint
from ..quant import quantize as quantize_checkpoint
from ._options import CheckpointArg, JsonOpt, split_list
from ._progress import spinner
from ._render import console, human_bytes, print_json, shape, table

EXAMPLES = """Examples:

  embcompress quantize model.safetensors                       (int8: writes model.int8.safetensors)

  embcompress quantize ./all-MiniLM-L6-v2 --bits 16 -o ./minilm-fp16 --json

  embcompress quantize dan.r90.safetensors --bits 8            (low rank + int8: the factors are quantized)

  embcompress quantize model.safetensors --tables embedding.weight -o model.emb-int8.safetensors --force

  embcompress quantize ./all-MiniLM-L6-v2 --bits 2 --group-size 32 --refine    (the token table in 2-bit groups)

  embcompress quantize ./all-MiniLM-L6-v2 --bits 4 --scheme sym -o ./minilm-int4
"""

_BITS_NAMES = {"2": 2, "3": 3, "4": 4, "8": 8, "int8": 8, "16": 16, "fp16": 16, "float16": 16}
LOW_BITS = (2, 3, 4)


def _bits(value: str) -> int:
    bits = _BITS_NAMES.get(value.strip().lower())
    if bits is None:
        raise InputError(f"--bits must be 2, 3, 4, 8 (int8) or 16 (float16), got {value!r}")
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
    group_size: Annotated[int | None, typer.Option("--group-size", help="Below 8 bits: values per group along the "
                          "embedding dimension, each with an fp16 scale (and zero point). Default 32.",
                          show_default=False)] = None,
    scheme: Annotated[str | None, typer.Option("--scheme", help="Below 8 bits: asym (scale and integer zero point "
                      "per group) or sym (scale only).", show_default=False)] = None,
    refine: Annotated[bool, typer.Option("--refine", help="Below 8 bits: fit each group's scale and zero point to "
                      "the table (no data needed); lowers the error of plain min/max.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json: JsonOpt = False,
) -> None:
    """Quantize a checkpoint's weights to int8 (per row of each table, factor and linear weight, with float32
    scales) or float16, and report the bytes and the error of the dequantized weights.

    The output is the same kind as the input (a file, or a model folder with its config and tokenizer); its
    record (the 'embcompress' metadata) holds each quantized tensor's storage, so `evaluate`, `finetune` and `export`
    dequantize it on load. Factorize first, then quantize: the factors are quantized too.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    nbits = _bits(bits)
    if nbits in LOW_BITS:
        _low_bits(path, nbits, group_size, scheme, refine, tables, output, force, json)
        return
    if group_size is not None or scheme is not None or refine:
        raise InputError("--group-size, --scheme and --refine apply below 8 bits (--bits 2, 3 or 4)")
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


def _low_bits(path: Path, bits: int, group_size: int | None, scheme: str | None, refine: bool,
              tables: list[str] | None, output: Path | None, force: bool, json: bool) -> None:
    """2-4 bits: the embedding tables (or the ``--tables`` named) in packed low-bit groups (``compress --method
    lowbit``); the other weights stay as they are."""
    options = {"bits": bits, "refine": refine, **({"group_size": group_size} if group_size is not None else {}),
               **({"scheme": scheme} if scheme is not None else {})}
    with spinner("reading checkpoint", not json) as say:
        result = compress_checkpoint(path, "lowbit", options=options, tables=split_list(tables), output=output,
                                     force=force, progress=say)
    workspace.record("quantize", options={"bits": bits, **options, "tables": split_list(tables)},
                     inputs=[("model", path)], outputs=[("model", Path(result.output))],
                     figures={"bits": bits, "file_bytes_before": result.file_bytes_before,
                              "file_bytes_after": result.file_bytes_after,
                              "tables": {t["name"]: {"rel_error": t["info"].get("rel_error"),
                                                     "fraction": t["fraction"]} for t in result.tables}})
    if json:
        print_json(result.to_dict())
        return
    console.print(table(
        f"Quantized {result.input} -> {result.output} ({bits}-bit groups)",
        ["table", "shape", "group size", "scheme", "float32", "stored", "fraction", "rel. error"],
        [[t["name"], shape(t["shape"]), t["storage_config"].get("group_size"), t["storage_config"].get("scheme"),
          human_bytes(t["float32_bytes"]), human_bytes(t["bytes"]), f"{t['fraction']:.4f}",
          f"{t['info']['rel_error']:.4f}" if t["info"].get("rel_error") is not None else "-"] for t in result.tables],
    ))
    console.print(f"file {human_bytes(result.file_bytes_before)} -> {human_bytes(result.file_bytes_after)} on disk "
                  f"in {result.seconds:.1f} s")
