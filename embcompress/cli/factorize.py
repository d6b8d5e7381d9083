"""``embcompress factorize``: replace embedding tables by their truncated-SVD factors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..factorize import factorize as factorize_checkpoint
from ._options import CheckpointArg, DeviceOpt, ForceOpt, JsonOpt, OutputOpt, TablesOpt, split_list
from ._render import console, err_console, human_bytes, pct, print_json, shape, table

EXAMPLES = """Examples:

  embcompress factorize model.safetensors --reduction 0.9

  embcompress factorize ./all-MiniLM-L6-v2 --reduction 0.5 -o ./minilm-r50 --json

  embcompress factorize model.safetensors --rank 64 --tables embedding.weight -o model.k64.safetensors --force

  embcompress factorize model.safetensors --energy 0.95 --method randomized
"""


def factorize(
    path: CheckpointArg,
    reduction: Annotated[float | None, typer.Option("--reduction", "-r", help="Fraction of each table's "
                         "parameters to remove, in (0, 1): 0.9 keeps 10 %. k = floor((1-R) V d / (V + d)).",
                         show_default=False)] = None,
    rank: Annotated[int | None, typer.Option("--rank", "-k", help="Use this rank k for every table.",
                    show_default=False)] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="Smallest k keeping this fraction of the "
                      "spectral energy sum(s_i^2), in (0, 1].", show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help="exact (Gram route, optimal) or randomized "
                      "(streaming, for tables beyond memory).")] = "exact",
    tables: TablesOpt = None,
    output: OutputOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Factorize each embedding table W (V x d) into W_a = U_k (V x k) and W_b = S_k V_k^T (k x d).

    Give exactly one of --reduction, --rank or --energy. The output is the same kind as the input (a file, or a
    model folder with its config and tokenizer); its metadata records what was done.
    """
    status = err_console.status("reading checkpoint", spinner="dots") if not json else None
    if status:
        status.start()
    try:
        result = factorize_checkpoint(
            path, reduction=reduction, rank=rank, energy=energy, tables=split_list(tables), method=method,
            output=output, force=force, device=device, progress=(lambda msg: status.update(msg)) if status else None,
        )
    finally:
        if status:
            status.stop()
    figures = {
        "reduction_achieved": result.reduction_achieved,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "tables": {t.name: {"rank": t.rank, "rel_error": t.rel_error, "reduction_achieved": t.reduction_achieved}
                   for t in result.tables},
    }
    workspace.record(
        "factorize",
        options={"reduction": reduction, "rank": rank, "energy": energy, "method": method,
                 "tables": split_list(tables)},
        inputs=[("model", path)],
        outputs=[("model", Path(result.output))],
        figures=figures,
    )
    if json:
        print_json(result.to_dict())
        return
    console.print(
        table(
            f"Factorized {result.input} -> {result.output}",
            ["table", "shape", "k", "R asked", "R achieved", "rel. error", "energy kept", "bytes before",
             "bytes after", "tied", "time"],
            [[t.name, shape(t.shape), t.rank, pct(t.reduction_requested) if t.reduction_requested else "-",
              pct(t.reduction_achieved), f"{t.rel_error:.4f}", pct(t.energy_kept, 2), human_bytes(t.bytes_before),
              human_bytes(t.bytes_after), ", ".join(t.tied) or "-", f"{t.seconds:.2f} s"] for t in result.tables],
        )
    )
    console.print(
        f"whole file: {result.params_before:,} -> {result.params_after:,} parameters "
        f"(R = {pct(result.reduction_achieved)}), {human_bytes(result.file_bytes_before)} -> "
        f"{human_bytes(result.file_bytes_after)} on disk, in {result.seconds:.1f} s"
    )
