"""``embcompress compare``: size, accuracy and latency of every way of shrinking a classifier, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..checkpoint import atomic_path, check_output, save_text
from ..compare import compare as run_compare
from ..errors import InputError, Interrupted
from ..compare import parse_baselines, parse_reductions, plot, to_csv, to_markdown
from ._options import DeviceOpt, DevOpt, JsonOpt
from ._progress import spinner
from ._render import console, err_console, human_bytes, pct, print_json, table

EXAMPLES = """Examples:

  embcompress compare dan.safetensors --train train.jsonl --dev dev.jsonl --data test.jsonl

  embcompress compare --baselines quant8,quant16,offline     (after factorize and finetune in this folder)

  embcompress compare dan.safetensors --reductions 0.5,0.9 --train train.jsonl --data test.jsonl --markdown t.md
"""


def _write(path: Path, text: str) -> None:
    save_text(text, path)


def compare(
    model: Annotated[Path | None, typer.Argument(help="The uncompressed classifier. Default: the model the last "
                     "factorize in the workspace record started from.", show_default=False)] = None,
    baselines: Annotated[str | None, typer.Option("--baselines", help="Comma-separated: quant8, quant16, "
                         "offline, svd, proposed+int8 (default: these five), groupreduce (GroupReduce blocks "
                         "counted on --train, then fine-tuned as proposed). The proposed method is always a row.",
                         show_default=False)] = None,
    reductions: Annotated[str | None, typer.Option("--reductions", help="Comma-separated R for svd, proposed and "
                          "offline (default: those in the workspace record, else 0.5,0.9).",
                          show_default=False)] = None,
    train: Annotated[Path | None, typer.Option("--train", help="Training examples for fine-tuning and offline "
                     "training (default: from the workspace record).", show_default=False)] = None,
    dev: DevOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="Test examples every row is scored on (default: the "
                    "last data evaluated in this folder, else the dev set).", show_default=False)] = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="Epochs of CALR fine-tuning "
                               "for the proposed rows (default 3).", show_default=False)] = None,
    finetune_lr: Annotated[float | None, typer.Option("--finetune-lr", help="Peak learning rate of that CALR "
                           "fine-tuning (default 0.002).", show_default=False)] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the ONNX export and timing.")] = False,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per batch size (the median is shown).")] = 20,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table as CSV.", show_default=False)] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table as Markdown.",
                        show_default=False)] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also draw accuracy against size to a PNG.",
                         show_default=False)] = None,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
) -> None:
    """Compare the uncompressed classifier with quant16, quant8, svd (factorized, not retrained), the proposed
    method (factorized, then fine-tuned with CALR) and offline compression (trained low-rank from the start):
    size on disk, accuracy, relative change, and onnxruntime latency at batch 1 and 64."""
    workspace.check_record()  # before any output: the entry must be writable afterwards
    taken = []
    if model is None:
        model, _ = workspace.take(None, "model", what="model", commands=("factorize",), side="inputs")
        taken.append(f"model {model}")
    if train is None and (train := workspace.last_artifact("train", side="inputs")) is not None:
        taken.append(f"--train {train}")
    if dev is None and (dev := workspace.last_artifact("dev", side="inputs")) is not None:
        taken.append(f"--dev {dev}")
    if data is None:
        data = workspace.last_artifact("test", side="inputs") or dev
        if data is None:
            raise InputError("no --data (test examples) given and none in the workspace record")
        taken.append(f"--data {data}" + (" (the dev set: no test data was named)" if data == dev else ""))
    if reductions is None and workspace.recorded_reductions(model):
        reductions = ",".join(str(r) for r in workspace.recorded_reductions(model))
        taken.append(f"--reductions {reductions}")
    reuse = workspace.finetuned_by_reduction(model)
    if taken and not json:
        err_console.print("from the workspace record: " + ", ".join(taken))
    for path in (csv, markdown, plot_path):  # refused now, not after the rows are built
        if path is not None:
            check_output(path, [model, data], force=True)
    with spinner("comparing", not json) as say:
        try:
            result = run_compare(model, data=data, train=train, dev=dev, baselines=parse_baselines(baselines),
                                 reductions=parse_reductions(reductions), finetune_epochs=finetune_epochs,
                                 finetune_lr=finetune_lr, reuse=reuse, latency=not no_latency, repeats=repeats,
                                 device=device, progress=say)
        except Interrupted:  # a fine-tuning row's "resume with --resume" does not apply to compare
            raise KeyboardInterrupt from None
    outputs = []
    if csv:
        _write(csv, to_csv(result))
        outputs.append(("csv", csv))
    if markdown:
        _write(markdown, to_markdown(result))
        outputs.append(("markdown", markdown))
    if plot_path:
        with atomic_path(plot_path) as tmp:
            plot(result, tmp)
        outputs.append(("plot", plot_path))
    workspace.record("compare", options={"baselines": baselines, "reductions": reductions},
                     inputs=[("model", model), ("test", data)] + ([("train", train)] if train else []),
                     outputs=outputs, figures={r.method + (f"@{r.reduction}" if r.reduction else ""):
                                               {"accuracy": r.accuracy, "size_bytes": r.size_bytes}
                                               for r in result.rows})
    if json:
        print_json(result.to_dict())
        return
    rows = []
    for r in result.rows:
        lat = [f"{r.latency_ms[b]:.3f}" if r.latency_ms.get(b) is not None else "-" for b in (1, 64)]
        rows.append([r.method, pct(r.reduction, 0) if r.reduction is not None else "-", human_bytes(r.size_bytes),
                     pct(r.accuracy, 2), f"{100 * r.relative_change:+.2f} %", *lat, r.note])
    console.print(table(f"{result.model} on {result.data}", ["method", "R", "size on disk", "accuracy",
                        "vs uncompressed", "ms b=1", "ms b=64", "note"], rows, right={1, 2, 3, 4, 5, 6}))
    console.print(f"latency: onnxruntime on the CPU, median of {result.settings['repeats']} runs per batch "
                  f"(tokens per batch: {result.settings['latency_tokens']}); in {result.seconds:.0f} s; "
                  f"artifacts in {result.settings['work_dir']}")
