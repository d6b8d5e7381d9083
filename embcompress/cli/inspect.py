"""``embcompress inspect``: what is in a checkpoint and what factorizing its tables would cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..summary import inspect_checkpoint
from ._options import JsonOpt, TablesOpt, split_list
from ._render import console, err_console, human_bytes, pct, print_json, shape, table

EXAMPLES = """Examples:

  embcompress inspect model.safetensors

  embcompress inspect ./all-MiniLM-L6-v2 --json

  embcompress inspect model.pt --tables embedding.weight

  embcompress inspect            (the last model written in this folder's workspace record)
"""


def inspect(
    path: Annotated[Path | None, typer.Argument(help="A .safetensors file, a Hugging Face model folder, or a "
                    ".pt/.bin state dict. Default: the last model in the workspace record.", show_default=False)] = None,
    tables: TablesOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show the tensors by group, the embedding tables found, and the rank, bytes saved and spectral energy kept
    when each table is factorized at R = 50, 70 and 90 %."""
    path, recorded = workspace.take(path, "model", what="checkpoint")
    if recorded:
        err_console.print(f"using {path} (the last model in the workspace record)")
    report = inspect_checkpoint(path, tables=split_list(tables))
    if json:
        print_json(report.to_dict())
        return
    console.print(
        f"[bold]{report.path}[/bold] ({report.kind}): {report.tensors} tensors, {report.params:,} parameters, "
        f"{human_bytes(report.bytes)} of tensor data, {human_bytes(report.file_bytes)} on disk"
    )
    console.print(
        table(
            "Tensors by group",
            ["group", "tensors", "parameters", "bytes", "share", "dtypes"],
            [[g.name, g.tensors, f"{g.params:,}", human_bytes(g.bytes), pct(g.share), ", ".join(g.dtypes)]
             for g in report.groups],
            right={1, 2, 3, 4},
        )
    )
    if report.factorized:
        console.print(
            table(
                "Already factorized",
                ["table", "shape", "rank", "R achieved", "rel. error", "method"],
                [[n, shape(e["shape"]), e["rank"], pct(e["reduction_achieved"]), f"{e['rel_error']:.4f}",
                  e["method"]] for n, e in report.factorized.items()],
            )
        )
    if not report.tables:
        console.print(f"[yellow]{report.note or 'no embedding table found'}[/yellow]")
        return
    console.print(
        table(
            "Embedding tables",
            ["table", "shape", "dtype", "parameters", "bytes", "share of file", "tied with", "why"],
            [[t.name, shape(t.shape), t.dtype, f"{t.params:,}", human_bytes(t.bytes), pct(t.share),
              ", ".join(f"{n} ({how})" for n, how in t.tied.items()) or "-", t.reason] for t in report.tables],
            right={3, 4, 5},
        )
    )
    rows = [[t.name, pct(p.reduction, 0), p.rank, human_bytes(p.bytes_saved), pct(p.energy_kept, 2),
             f"{p.rel_error:.4f}"] for t in report.tables for p in t.projections]
    console.print(table("Factorizing (k from eq. 5)", ["table", "R", "k", "bytes saved", "energy kept", "rel. error"],
                        rows))
    console.print("energy kept = sum of the top-k squared singular values / sum of all; rel. error = "
                  "||W - W_a W_b||_F / ||W||_F = sqrt(1 - energy kept)")
