"""``embcompress evaluate``: how much a compressed model lost. A classifier: accuracy, macro-F1 and per-class
figures on labelled examples. A Hugging Face encoder with ``--similarity-to``: the cosine of its sentence
embeddings to the original's on any texts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import families, workspace
from ..errors import InputError
from ..train.run import EvalReport
from ._options import DeviceOpt, JsonOpt
from ._render import console, err_console, pct, print_json, table

EXAMPLES = """Examples:

  A classifier (labelled JSON Lines: {"text": "...", "label": "pos"} a line):

  embcompress evaluate model.safetensors --data test.jsonl

  embcompress evaluate model.r90.ft.safetensors --data test.jsonl --json

  A Hugging Face encoder against the model it came from (any texts: .txt one a line, or .jsonl with "text"):

  embcompress evaluate ./all-MiniLM-L6-v2-lowbit-4b --similarity-to ./all-MiniLM-L6-v2 --data texts.txt

  embcompress evaluate minilm-r90-ft --similarity-to all-MiniLM-L6-v2 --data test.jsonl --coverage-of train.txt
"""


def evaluate(
    model: Annotated[Path | None, typer.Argument(help="A classifier (dense, compressed or fine-tuned), or with "
                     "--similarity-to a Hugging Face encoder folder (compressed or fine-tuned). Default: the "
                     "last model in the workspace record.", show_default=False)] = None,
    data: Annotated[Path, typer.Option("--data", help="For a classifier: labelled examples, JSON Lines ({\"text\", "
                    "\"label\"} a line). With --similarity-to: texts, .txt (one a line) or .jsonl (\"text\"; labels "
                    "ignored).")] = ...,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 512,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
    # --- Hugging Face encoders (embcompress.distill): cosine to the original's sentence embeddings ---
    similarity_to: Annotated[Path | None, typer.Option(
        "--similarity-to", help="The original Hugging Face model folder: report the mean and worst cosine between "
        "MODEL's and its mean-pooled sentence embeddings of the --data texts (.txt, one a line, or .jsonl).",
        show_default=False)] = None,
    coverage_of: Annotated[Path | None, typer.Option(
        "--coverage-of", help="With --similarity-to: the texts MODEL was recovered on. Also report the mean cosine "
        "by how often each --data text's rarest token occurs in them (never, 1-2, 3-9, 10+ times).",
        show_default=False)] = None,
) -> None:
    """Measure what a compressed model lost, in one of two ways.

    A classifier (or a Hugging Face sequence classifier) on labelled JSON Lines: accuracy, macro-F1,
    precision/recall/F1 per class, and examples per second.

    A Hugging Face encoder with --similarity-to ORIGINAL, on any texts (.txt one a line, or .jsonl): the mean and
    worst cosine between its mean-pooled sentence embeddings and the original's.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    model, recorded = workspace.take(model, "model", what="model")
    if recorded and not json:
        err_console.print(f"using {model} (the last model in the workspace record)")
    if similarity_to is not None:
        from ._hf import evaluate_similarity

        evaluate_similarity(model, similarity_to, data, batch_size=min(batch_size, 64), max_length=None,
                            limit=None, device=device, json=json, coverage_of=coverage_of)
        return
    if coverage_of is not None:
        raise InputError("--coverage-of needs --similarity-to ORIGINAL")
    report = families.detect(model).evaluate_labels(model, data, batch_size=batch_size, device=device)
    if not isinstance(report, EvalReport):  # a Hugging Face sequence classifier (finetune HF_FOLDER --data ...)
        from ._hf import show_labels

        show_labels(model, data, report, batch_size=batch_size, json=json)
        return
    workspace.record("evaluate", options={"batch_size": batch_size}, inputs=[("model", model), ("test", data)],
                     outputs=[], figures={"accuracy": report.result.accuracy, "macro_f1": report.result.macro_f1})
    if json:
        print_json(report.to_dict())
        return
    r = report.result
    console.print(f"[bold]{model}[/bold] on {data}: accuracy {pct(r.accuracy, 2)}, macro-F1 {pct(r.macro_f1, 2)}, "
                  f"{r.num_examples} examples, {r.examples_per_second:,.0f} examples/s")
    console.print(table("Per class", ["label", "precision", "recall", "F1", "support"],
                        [[c.label, pct(c.precision, 2), pct(c.recall, 2), pct(c.f1, 2), c.support]
                         for c in r.per_class]))
