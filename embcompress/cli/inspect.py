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
    when each table is factorized at R = 50, 70 and 90 %, with the cost model: bytes and multiply-adds per token of
    the dense, int8/fp16, factorized and factorized + quantized table, and the break-even ranks.

    Each table is also stored as int8 and in 4- and 2-bit groups of 32 (measured on up to 4096 rows), beside low
    rank at the same bytes; when low rank's error is over twice 4-bit groups' at their bytes (a nearly flat
    spectrum), a warning names the better choice and the command to run."""
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
                [[n, shape(e["shape"]), _rank(e), pct(e["reduction_achieved"]), f"{e['rel_error']:.4f}",
                  e["method"]] for n, e in report.factorized.items()],
            )
        )
    if report.quantized:
        q = report.quantized
        console.print(f"quantized ({q.get('bits')}-bit) by embcompress quantize: {len(q['tensors'])} tensors "
                      "(each one's storage in the 'embcompress' record); loaders dequantize them")
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
    _print_cost(report)
    _print_storage(report)


def _print_storage(report) -> None:
    """Each table stored int8 or in 4/2-bit groups (measured) beside low rank at the same bytes; the warnings."""
    rows = [[t.name, o.storage + (f" (groups of {o.group_size})" if o.group_size else " (per row)"),
             human_bytes(o.bytes), pct(o.fraction), f"{o.rel_error:.4f}", o.rows_measured, o.svd_rank,
             pct(o.svd_energy_kept, 2), f"{o.svd_rel_error:.4f}"] for t in report.tables for o in t.storage]
    if rows:
        console.print(table("Low-bit storage or low rank, at equal bytes",
                            ["table", "storage", "bytes", "of float32", "rel. error", "rows measured", "SVD k",
                             "SVD energy kept", "SVD rel. error"], rows, right={2, 3, 4, 5, 6, 7, 8}))
    for t in report.tables:
        if t.warning:
            console.print(f"[yellow]warning: {t.warning}[/yellow]")


def _print_cost(report) -> None:
    """The cost model (embcompress.cost) of each table: bytes and multiply-adds per token of every layout."""
    rows = [[t.name, r["name"], r["rank"] or "-", human_bytes(r["bytes"]), f"{r['ratio']:.3f}",
             f"{r['lookup_macs']:,}", f"{r['output_macs']:,}",
             f"{r['rel_error']:.4f}" if r["rel_error"] is not None else "-"]
            for t in report.tables if t.cost for r in t.cost["rows"]]
    if not rows:
        return
    console.print(table("Cost model (section 4 of the paper; MACs = multiply-adds per token)",
                        ["table", "layout", "k", "bytes", "x dense", "lookup MACs", "output MACs", "rel. error"],
                        rows))
    for t in report.tables:
        c = t.cost
        if not c:
            continue
        console.print(
            f"{t.name}: factorizing saves parameters and output-layer MACs iff k < V d / (V + d) = "
            f"{c['params_break_even_rank']:.1f}; a factorized lookup costs k x {c['lookup_extra_macs_per_rank']} "
            "MACs per token more than a gather"
        )
        for e in c["equal_bytes"]:
            verdict = ""
            if e["factor_rel_error"] is not None and e["quant_rel_error"] is not None:
                verdict = (f": at k = {e['factor_rank']} rel. error {e['factor_rel_error']:.4f} vs "
                           f"{e['quant_rel_error']:.4f}, {e['winner']} wins at equal bytes")
            console.print(f"  {c['bits']}-bit factors take fewer bytes than the {e['quant_bits']}-bit table iff "
                          f"k < {e['rank']:.1f} (R > {pct(e['reduction'])}){verdict}")


def _rank(entry: dict) -> str:
    """k, or for GroupReduce the block ranks: 174 = 167+1+... (8 blocks)."""
    blocks = (entry.get("blocks") or {}).get("ranks")
    if not blocks:
        return str(entry["rank"])
    shown = "+".join(map(str, blocks[:4])) + ("+..." if len(blocks) > 4 else "")
    return f"{sum(blocks)} = {shown} ({len(blocks)} blocks)"
