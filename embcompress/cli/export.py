"""``embcompress export``: write a classifier as ONNX and check it against PyTorch with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..export import export_onnx
from ..hf import is_hf_folder
from ._options import JsonOpt
from ._progress import spinner
from ._render import console, err_console, human_bytes, pct, print_json, table

EXAMPLES = """Examples:

  embcompress export dan.r90.safetensors                      # writes dan.r90.onnx

  embcompress export dan.safetensors -o dan.int8.onnx --quantize int8 --data dev.jsonl

  embcompress export lstm.safetensors --quantize fp16 --opset 18 --force --json

  embcompress export minilm-r90 --quantize int8     (a Hugging Face folder)
"""


def export(
    model: Annotated[Path | None, typer.Argument(help="A classifier (dense, factorized, fine-tuned or quantized), "
                     "or a Hugging Face encoder folder. Default: the last model in the workspace record.",
                     show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The .onnx file to write. Default: beside "
                      "the model (model.onnx, model.int8.onnx, model.fp16.onnx).", show_default=False)] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8 (onnxruntime dynamic quantization) or "
                        "fp16 (float16 weights and arithmetic). Default: float32.", show_default=False)] = None,
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
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json: JsonOpt = False,
) -> None:
    """Export a classifier to ONNX: input `input_ids` (int64, batch x seq, right-padded with 0), output `logits`.

    Both axes are dynamic; the file also carries the vocabulary and labels in its metadata. A factorized DAN
    averages the k-dim rows of W_a before projecting; an LSTM runs without packed sequences. onnxruntime is
    always checked against PyTorch: float32 logits must agree to 1e-4, or nothing is written; with --quantize the
    agreement of predictions and the largest logit difference are reported.

    A Hugging Face encoder folder (the [hf] extra) becomes input_ids, attention_mask -> last_hidden_state,
    sentence_embedding (float32, or --quantize int8), checked against torch, with the latency of one sentence.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    model, recorded = workspace.take(model, "model", what="model")
    if recorded and not json:
        err_console.print(f"using {model} (the last model in the workspace record)")
    if is_hf_folder(model):
        from ._hf import export_hf

        export_hf(model, output, quantize=quantize, opset=opset, data=data, device=device, threads=threads,
                  force=force, json=json)
        return
    with spinner("loading", not json) as say:
        report = export_onnx(model, output, quantize=quantize, opset=opset, data=data, device=device, force=force,
                             threads=threads, progress=say)
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


def shape_text(dims: list[int | str]) -> str:
    return " x ".join(str(d) for d in dims) if dims else "scalar"

