"""``embcompress compare``: every registered method at each byte budget on your texts, for encoders and
classifiers, with the Pareto front; for a classifier with --train, also the paper's rows and the fair baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import families, workspace
from ..checkpoint import atomic_path, check_output, save_text
from ..compare import compare_model, default_output, parse_baselines, parse_reductions
from ..errors import InputError, Interrupted
from ..sweep import UNCOMPRESSED, SweepResult, parse_budgets, plot, rows_json, to_csv, to_markdown
from ._options import DeviceOpt, DevOpt, ForceOpt, JsonOpt
from ._progress import spinner
from ._render import console, err_console, human_bytes, print_json, table

EXAMPLES = """Examples:

  embcompress compare ./all-MiniLM-L6-v2 --data texts.txt --budgets 0.1,0.05,0.03 --no-latency

  embcompress compare ./all-MiniLM-L6-v2 --data labelled.jsonl --methods lowbit,pq,svd+int8 --recover 200

  embcompress compare dan.safetensors --data test.jsonl --train train.jsonl --dev dev.jsonl

  embcompress compare --baselines quant8,quant16,offline     (after factorize and finetune in this folder)
"""


def compare(
    model: Annotated[Path | None, typer.Argument(help="A Hugging Face model folder or an uncompressed embcompress "
                     "classifier. Default: the model the last factorize in the workspace record started from.",
                     show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The texts every row is scored on: .txt (one a line) "
                    "or .jsonl (text, and label for a probe or a classifier). Default for a classifier: the last "
                    "test data in the workspace record, else the dev set.", show_default=False)] = None,
    budgets: Annotated[str | None, typer.Option("--budgets", help="Comma-separated budgets for the tables: "
                       "fractions of their float32 bytes (0.05) or sizes (2MB). Default 0.25,0.1,0.05,0.03.",
                       show_default=False)] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods or structure+storage "
                       "(svd+int8). Default: every registered one and combination.", show_default=False)] = None,
    recover: Annotated[int, typer.Option("--recover", help="Also recover each row: this many steps of label-free "
                       "distillation (encoders) or of fine-tuning on --train (classifiers). 0: no recovery.")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Score on a seeded random subsample of this many "
                     "texts (encoders).", show_default=False)] = None,
    baselines: Annotated[str | None, typer.Option("--baselines", help="Classifiers with --train: comma-separated "
                         "quant8, quant16, offline, svd, proposed+int8, fair (default: these six), groupreduce. The "
                         "proposed method is always a row.", show_default=False)] = None,
    reductions: Annotated[str | None, typer.Option("--reductions", help="Classifiers with --train: comma-separated "
                          "R for svd, proposed and offline (default: those in the workspace record, else 0.5,0.9).",
                          show_default=False)] = None,
    train: Annotated[Path | None, typer.Option("--train", help="Classifiers: training examples for the protocol "
                     "rows and recovery (default: from the workspace record). Encoders: the texts recovery distils "
                     "on and frequency-weighted methods count tokens in (default: --data).", show_default=False)] = None,
    dev: DevOpt = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="Epochs of CALR fine-tuning "
                               "for the proposed rows (default 3).", show_default=False)] = None,
    finetune_lr: Annotated[float | None, typer.Option("--finetune-lr", help="Peak learning rate of that CALR "
                           "fine-tuning (default 0.002).", show_default=False)] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the ONNX export and timing.")] = False,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per batch size (the median is shown).")] = 20,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The folder for compare.md, .csv, .json, "
                      ".png and compare.log. Default: <model name>.compare here.", show_default=False)] = None,
    force: ForceOpt = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table as CSV here.",
                   show_default=False)] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table as Markdown here.",
                        show_default=False)] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also draw quality against bytes to this PNG.",
                         show_default=False)] = None,
    device: DeviceOpt = "cpu",
    json: JsonOpt = False,
) -> None:
    """Compare every registered method and combination at each byte budget, on your texts: the bytes of the tables
    and of the file, the quality (mean cosine to the original's sentence embeddings for an encoder, with its worst,
    5th percentile and a linear probe when the texts carry labels; accuracy for a classifier), the Pareto front, and
    onnxruntime latency of the front."""
    workspace.check_record()  # before any output: the entry must be writable afterwards
    taken = []
    if model is None:
        model, _ = workspace.take(None, "model", what="model", commands=("factorize",), side="inputs")
        taken.append(f"model {model}")
    reuse = {}
    if Path(model).exists() and families.detect(model).protocol:  # the paper's protocol: reuse the workspace's runs
        if train is None and (train := workspace.last_artifact("train", side="inputs")) is not None:
            taken.append(f"--train {train}")
        if dev is None and (dev := workspace.last_artifact("dev", side="inputs")) is not None:
            taken.append(f"--dev {dev}")
        if data is None and (data := workspace.last_artifact("test", side="inputs") or dev) is not None:
            taken.append(f"--data {data}" + (" (the dev set: no test data was named)" if data == dev else ""))
        if reductions is None and workspace.recorded_reductions(model):
            reductions = ",".join(str(r) for r in workspace.recorded_reductions(model))
            taken.append(f"--reductions {reductions}")
        reuse = workspace.finetuned_by_reduction(model)
    if data is None:
        raise InputError("compare needs --data: the texts (or, for a classifier, the test examples) to score on")
    picked = parse_baselines(baselines) if baselines is not None or train is not None else None
    parsed_reductions = parse_reductions(reductions)
    budget_list = parse_budgets(budgets)
    if taken and not json:
        err_console.print("from the workspace record: " + ", ".join(taken))
    out = output or default_output(model)
    for path in (csv, markdown, plot_path):  # refused now, not after the rows are built
        if path is not None:
            check_output(path, [model, data], force=True)
    with spinner("comparing", not json) as say:
        try:
            result = compare_model(model, data, budgets=budget_list, methods=methods, recover=recover, limit=limit,
                                   train=train, dev=dev, baselines=picked, reductions=parsed_reductions,
                                   finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, reuse=reuse,
                                   latency=not no_latency, repeats=repeats, output=out, force=force, device=device,
                                   progress=say)
        except Interrupted:  # a fine-tuning row's "resume with --resume" does not apply to compare
            raise KeyboardInterrupt from None
    outputs = [("folder", out)]
    if csv:
        save_text(to_csv(result), csv)
        outputs.append(("csv", csv))
    if markdown:
        save_text(to_markdown(result), markdown)
        outputs.append(("markdown", markdown))
    if plot_path:
        with atomic_path(plot_path) as tmp:
            plot(result, tmp)
        outputs.append(("plot", plot_path))
    front = result.front()
    workspace.record("compare", options={"budgets": budgets, "methods": methods, "recover": recover,
                                         "baselines": baselines, "reductions": reductions},
                     inputs=[("model", model), ("test", data)] + ([("train", train)] if train else []),
                     outputs=outputs,
                     figures={"quality": result.quality, "seconds": result.seconds,
                              "front": [{"method": r.method, "budget": r.budget, "table_bytes": r.table_bytes,
                                         "quality": r.quality, "recovered": r.recovered} for r in front],
                              "rows": len(result.rows)})
    if json:
        print_json(rows_json(result))
        return
    _render(result, out, not no_latency)


def _render(result: SweepResult, out: Path, latency: bool) -> None:
    enc = result.family == families.ENCODER
    rows = []
    decoded = latency and any(r.latency_decoded_ms for r in result.front())
    for r in result.front():
        lat, dec = r.latency_ms.get(1), r.latency_decoded_ms.get(1)
        rows.append([r.method + (" (recovered)" if r.recovered else ""), f"{r.budget:.3f}" if r.budget else "-",
                     human_bytes(r.table_bytes or 0), f"{(r.table_bytes or 0) / result.float32_bytes:.4f}",
                     human_bytes(r.file_bytes or 0), f"{r.quality:.4f}",
                     f"{r.cosine['worst']:.4f}" if enc and r.cosine else "-",
                     *([f"{lat:.2f}" if lat is not None else "-"] if latency else []),
                     *([f"{dec:.2f}" if dec is not None else "-"] if decoded else []), r.note])
    head = ["method", "budget", "tables", "x float32", "file", "cosine" if enc else "accuracy",
            "worst" if enc else "-", *(["ms b=1"] if latency else []), *(["decoded at load"] if decoded else []),
            "note"]
    console.print(table(f"Pareto front of {result.model} on {result.data} ({result.settings['texts']} texts)", head,
                        rows))
    misfits = sum(1 for r in result.rows if not r.fits)
    measured = sum(1 for r in result.rows if r.fits and r.method != UNCOMPRESSED)
    console.print(f"{measured} rows measured, {misfits} cannot fit their budget; every row in "
                  f"{out / 'compare.md'} (and .csv, .json, .png; progress in compare.log); {result.seconds:.0f} s")
    if latency:
        console.print("latency: the front's rows exported to ONNX, onnxruntime on the CPU, median of one-sentence "
                      "calls" + ("; decoded at load: the same with export --decode-at-load (the table decoded into "
                                 "float32 when the session starts)" if decoded else ""))
