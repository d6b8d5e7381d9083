"""``embcompress trim``: keep only the vocabulary a corpus uses, with the tokenizer remapped to match."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..trim import trim as trim_checkpoint
from ._options import CheckpointArg, JsonOpt
from ._progress import spinner
from ._render import console, human_bytes, pct, print_json, shape, table

EXAMPLES = """Examples:

  embcompress trim dan.safetensors --corpus train.jsonl -o dan.trim.safetensors

  embcompress trim ./all-MiniLM-L6-v2 --corpus examples/texts/stdlib.txt -o ./minilm-stdlib

  embcompress trim ./all-MiniLM-L6-v2 --corpus texts.txt --min-count 2 --keep-top 5000 -o ./minilm-5k --json

  embcompress trim dan.safetensors --corpus train.jsonl --force        (writes dan.trim.safetensors)

  embcompress factorize dan.trim.safetensors --reduction 0.5           (trim, then factorize)
"""


def trim(
    path: CheckpointArg,
    corpus: Annotated[Path, typer.Option("--corpus", help="Texts whose tokens to keep: .txt (one a line) or .jsonl "
                      "(a 'text' field a line), counted with the model's own tokenizer.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write. Default: beside the input "
                      "(model.trim.safetensors, or FOLDER-trim for a folder).", show_default=False)] = None,
    keep_top: Annotated[int | None, typer.Option("--keep-top", help="Keep at most the N most frequent corpus "
                        "tokens (special tokens and the pieces the tokenizer needs come on top).",
                        show_default=False)] = None,
    min_count: Annotated[int, typer.Option("--min-count", help="Keep a corpus token only if it occurs at least this "
                         "often.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json: JsonOpt = False,
) -> None:
    """Remove the vocabulary rows a corpus does not use (keeping every special token) from the embedding table,
    the tables tied to it and the output layer, and remap the tokenizer to the new ids.

    Works on embcompress classifiers (the vocabulary in the metadata) and Hugging Face folders (tokenizer.json,
    vocab.txt, vocab.json/merges.txt, config.json), dense or already factorized (then the rows of W_a go). The
    new tokenizer is checked on the corpus before anything is written: every text whose tokens were all kept
    gives the same tokens, so the model's outputs for it are identical. Trim first, then factorize or quantize.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    with spinner("reading checkpoint", not json) as say:
        result = trim_checkpoint(path, corpus, output, keep_top=keep_top, min_count=min_count, force=force,
                                 progress=say)
    workspace.record(
        "trim",
        options={"keep_top": keep_top, "min_count": min_count},
        inputs=[("model", path), ("corpus", corpus)],
        outputs=[("model", Path(result.output))],
        figures={"rows_before": result.rows_before, "rows_after": result.rows_after,
                 "coverage": result.coverage, "texts_changed": result.texts_changed,
                 "file_bytes_before": result.file_bytes_before, "file_bytes_after": result.file_bytes_after},
    )
    if json:
        print_json(result.to_dict())
        return
    console.print(
        table(
            f"Trimmed {result.input} -> {result.output} ({result.tokenizer})",
            ["tensor", "role", "shape before", "shape after", "bytes before", "bytes after"],
            [[t.name, t.role, shape(t.shape_before), shape(t.shape_after), human_bytes(t.bytes_before),
              human_bytes(t.bytes_after)] for t in result.tensors],
            right={2, 3, 4, 5},
        )
    )
    console.print(
        f"vocabulary: {result.rows_before:,} -> {result.rows_after:,} tokens ({pct(result.row_ratio)} kept): "
        f"{result.corpus_tokens:,} from the corpus, {result.special_tokens:,} special, "
        f"{result.structural_tokens:,} needed by the tokenizer; {result.dropped_corpus_tokens:,} corpus tokens "
        f"left out by --min-count/--keep-top"
    )
    console.print(
        f"corpus: {result.texts:,} texts, {result.tokens_counted:,} tokens; {pct(result.coverage, 2)} of them keep "
        f"their row; {result.texts_changed:,} texts tokenize differently (the others give identical outputs)"
    )
    console.print(
        f"whole file: {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)} of tensors, "
        f"{human_bytes(result.file_bytes_before)} -> {human_bytes(result.file_bytes_after)} on disk; rewritten: "
        f"{', '.join(result.files_rewritten)}"
        + (f"; left out: {', '.join(result.files_dropped)}" if result.files_dropped else "")
        + f"; in {result.seconds:.1f} s"
    )
    for note in result.notes:
        console.print(note)
