"""``embcompress export``: write a classifier as ONNX and check it against PyTorch with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..export import LATENCY_REPEATS, ExportReport, OnnxExport
from ..ops.export import export_onnx
from ._options import JsonOpt
from ._progress import spinner
from ._render import console, err_console, human_bytes, pct, print_json, table

EXAMPLES = """Examples:

  embcompress export dan.r90.safetensors                      # writes dan.r90.onnx

  embcompress export dan.safetensors -o dan.int8.onnx --quantize int8 --data dev.jsonl

  embcompress export lstm.safetensors --quantize fp16 --opset 18 --force --json

  embcompress export minilm-r90 --quantize int8     (a Hugging Face folder)

  embcompress export minilm --quantize int4 --data t.txt --calibration 512

  embcompress export minilm-pq --quantize int4 --data t.txt --calibration 2048 --tune 300

  embcompress export minilm-pq --decode-at-load
"""


def export(
    model: Annotated[Path | None, typer.Argument(help="A classifier (dense, factorized, fine-tuned or quantized), "
                     "or a Hugging Face encoder folder. Default: the last model in the workspace record.",
                     show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The .onnx file to write. Default: beside "
                      "the model (model.onnx, model.int8.onnx, model.fp16.onnx).", show_default=False)] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8 or int4: weight-only (MatMulNBits 4-bit "
                        "groups, int8 per output channel; activations stay float32; a float table becomes int8 rows "
                        "or 4-bit groups, a stored table keeps its storage); fp16 (float16 weights and arithmetic, "
                        "classifiers). Default: float32.", show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 13 to 20.")] = 17,
    data: Annotated[Path | None, typer.Option("--data", help="Texts for the parity check, JSON Lines "
                    "({\"text\": ...} a line; labels ignored), or .txt for a Hugging Face folder. Default: sentences "
                    "of vocabulary tokens (a built-in set for a Hugging Face folder).",
                    show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="Where onnxruntime runs the parity check: auto (CUDA "
                      "where present), cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="onnxruntime intra-op threads for the parity "
                       "check (and the latency of a Hugging Face encoder). Default: onnxruntime's choice.",
                       show_default=False)] = None,
    calibration: Annotated[int | None, typer.Option("--calibration", help="int4 of a Hugging Face encoder: how "
                           "many texts of --data (after the parity ones) calibrate GPTQ's choice of 4-bit codes; more "
                           "keep more quality and take longer. Default: 128.", show_default=False)] = None,
    decode_at_load: Annotated[bool, typer.Option("--decode-at-load", help="Decode each compressed table once, when "
                              "onnxruntime loads the file: the file keeps the stored bytes, a lookup costs what a "
                              "float32 Gather costs, and the session holds the table in float32 memory. Not for "
                              "lowbit tables (GatherBlockQuantized is decoded at every call).")] = False,
    tune: Annotated[int, typer.Option("--tune", help="int4 of a Hugging Face encoder: after GPTQ fixes the 4-bit "
                    "codes, distil the layers' group scales and the model's other float parameters (biases, norms) "
                    "toward the model for this many steps on the calibration texts (same bytes; about a second a "
                    "step on 2 CPU cores for MiniLM). Default: 0 (no tuning).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json: JsonOpt = False,
) -> None:
    """Export a classifier to ONNX: input `input_ids` (int64, batch x seq, right-padded with 0), output `logits`.

    Both axes are dynamic; the file also carries the vocabulary and labels in its metadata. A factorized DAN
    averages the k-dim rows of W_a before projecting; an LSTM runs without packed sequences. onnxruntime is
    always checked against PyTorch: float32 logits must agree to 1e-4, or nothing is written; with --quantize the
    agreement of predictions and the largest logit difference are reported.

    A Hugging Face encoder folder (the [hf] extra) becomes input_ids, attention_mask -> last_hidden_state,
    sentence_embedding (float32, or --quantize int8|int4), checked against torch (a quantized graph needs a mean
    cosine of 0.99 for int8, 0.95 for int4), with the latency at batch 1 and 64. Each table is exported as stored:
    int8 rows as a Gather and a Mul by the row scales, 2/4/8-bit groups as GatherBlockQuantized; a 3-bit table is
    refused. --decode-at-load keeps the stored bytes in the file and has onnxruntime decode a pq, iiq or factored
    table once when it loads the file, so a lookup costs a float32 Gather (and the session holds the table in
    float32).
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    model, recorded = workspace.take(model, "model", what="model")
    if recorded and not json:
        err_console.print(f"using {model} (the last model in the workspace record)")
    with spinner("loading", not json) as say:
        report = export_onnx(model, output, quantize=quantize, opset=opset, data=data, device=device, force=force,
                             threads=threads, calibration=calibration, decode_at_load=decode_at_load,
                             tune=tune, progress=say)
    if isinstance(report, OnnxExport):
        _render_encoder(report, model, data=data, quantize=quantize, opset=opset, threads=threads, json=json)
        return
    _render_classifier(report, model, data=data, quantize=quantize, opset=opset, device=device, json=json)


def _render_classifier(report: ExportReport, model: Path, *, data: Path | None, quantize: str | None, opset: int,
                       device: str, json: bool) -> None:
    p = report.parity
    workspace.record(
        "export",
        options={"quantize": quantize, "opset": opset, "device": device},
        inputs=[("model", model)] + ([("data", data)] if data is not None else []),
        outputs=[("onnx", Path(report.output))],
        figures={"file_bytes": report.file_bytes, "fp32_max_abs_diff": p.fp32_max_abs_diff,
                 "max_abs_diff": p.max_abs_diff, "agreement": p.agreement},
    )
    if json:
        print_json(report.to_dict())
        return
    kind = f"factorized, k = {report.rank}" if report.factorized else "dense table"
    console.print(f"[bold]{report.input}[/bold] ({report.arch}, {kind}) -> [bold]{report.output}[/bold]: "
                  f"{human_bytes(report.file_bytes)} (model file {human_bytes(report.model_bytes)}), opset "
                  f"{report.opset}, {report.quantize or 'float32'}, in {report.seconds:.1f} s")
    console.print(table(None, ["", "name", "type", "shape"],
                        [[side, t.name, t.dtype, shape_text(t.shape)]
                         for side, specs in (("input", report.inputs), ("output", report.outputs)) for t in specs],
                        right=set()))
    console.print(f"graph: {report.graph}")
    console.print(f"parity with PyTorch on {p.examples} examples ({p.source}; batches "
                  f"{', '.join(f'{b} x {s}' for b, s in p.batches)}; {', '.join(p.providers)}):")
    console.print(f"  float32: max |logit difference| {p.fp32_max_abs_diff:.2e} (tolerance {p.fp32_tolerance:g}), "
                  f"predictions identical {pct(p.fp32_agreement, 2)}")
    if report.quantize:
        console.print(f"  {report.quantize}: max |logit difference| {p.max_abs_diff:.2e}, predictions identical "
                      f"{pct(p.agreement, 2)}; float32 graph {human_bytes(report.fp32_file_bytes)}")
    for note in report.notes:
        console.print(f"  {note}")


def _render_encoder(report: OnnxExport, model: Path, *, data: Path | None, quantize: str | None, opset: int,
                    threads: int | None, json: bool) -> None:
    """Record and print the export of a Hugging Face encoder."""
    workspace.record(
        "export",
        options={"quantize": quantize, "opset": opset, "threads": threads, "tune": report.tune_steps},
        inputs=[("model", model)] + ([("data", data)] if data is not None else []),
        outputs=[("onnx", Path(report.output))],
        figures={"file_bytes": report.bytes, "latency_ms": report.latency_ms, "threads": threads,
                 "latency_batch_ms": report.latency_batch_ms, "mean_cosine": report.mean_cosine,
                 "max_abs_diff_embedding": report.max_abs_diff_embedding, "min_cosine": report.min_cosine},
    )
    if json:
        print_json(report.to_dict())
        return
    console.print(f"[bold]{report.input}[/bold] -> [bold]{report.output}[/bold]: {human_bytes(report.bytes)}, opset "
                  f"{report.opset}, {report.quantize or 'float32'}, in {report.seconds:.1f} s")
    console.print("inputs input_ids, attention_mask (int64, batch x seq); outputs last_hidden_state (batch x seq x "
                  "d), sentence_embedding (batch x d, mean over the attended tokens)")
    for name, text in report.tables.items():
        console.print(f"table {name}: {text}")
    console.print(f"parity with torch on {report.parity_texts} texts (one padded batch, then one at a time): max "
                  f"|difference| {report.max_abs_diff_embedding:.2e} in the sentence embeddings, "
                  f"{report.max_abs_diff_hidden:.2e} in the token states; cosine mean {report.mean_cosine:.6f}, "
                  f"worst {report.min_cosine:.6f}")
    if report.quantize:
        console.print(f"  float32 graph {human_bytes(report.fp32_bytes)}: max |difference| "
                      f"{report.fp32_max_abs_diff_embedding:.2e} in the sentence embeddings")
    for note in report.notes:
        console.print(f"  {note}")
    if report.latency_ms is not None:
        on = f"{threads} thread{'' if threads == 1 else 's'}" if threads else "onnxruntime's default threads"
        others = ", ".join(f"{v:.2f} ms at batch {b}" for b, v in report.latency_batch_ms.items() if b != 1)
        console.print(f"latency: {report.latency_ms:.2f} ms for one sentence (median of {LATENCY_REPEATS} onnxruntime "
                      f"calls, {on})" + (f"; {others}" if others else ""))


def shape_text(dims: list[int | str]) -> str:
    return " x ".join(str(d) for d in dims) if dims else "scalar"

