"""``embcompress factorize``: replace embedding tables by their truncated-SVD factors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..budget import rank_for_budget
from ..errors import InputError
from ..factorize import factorize as factorize_checkpoint
from ..groupreduce import DEFAULT_BLOCKS, DEFAULT_ROUNDS
from ..tables import tie_label
from ..weighting import load_counts
from ..train.loop import TrainConfig
from ._options import CheckpointArg, DataOpt, DeviceOpt, DevOpt, ForceOpt, JsonOpt, OutputOpt, TablesOpt, split_list
from ._progress import spinner
from ._render import console, human_bytes, pct, print_json, shape, table

EXAMPLES = """Examples:

  embcompress factorize model.safetensors --reduction 0.9

  embcompress factorize ./all-MiniLM-L6-v2 --reduction 0.5 -o ./minilm-r50 --json

  embcompress factorize model.safetensors --rank 64 --tables embedding.weight -o model.k64.safetensors --force

  embcompress factorize model.safetensors --energy 0.95 --method randomized

  embcompress factorize dan.safetensors --reduction 0.9 --method weighted --corpus train.jsonl

  embcompress factorize ./all-MiniLM-L6-v2 --reduction 0.9 --method weighted --counts counts.txt

  embcompress factorize dan.safetensors --reduction 0.9 --method groupreduce --blocks 8 --corpus train.jsonl

  embcompress factorize dan.safetensors --max-drop 0.01 --dev dev.jsonl
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
    method: Annotated[str, typer.Option("--method", help="exact (Gram route, optimal), randomized (streaming, "
                      "for tables beyond memory), weighted (frequency-weighted: frequent tokens get the rank; "
                      "needs --counts or --corpus) or groupreduce (blocks of tokens by frequency, more rank for "
                      "frequent blocks, same budget; needs --counts or --corpus).")] = "exact",
    counts: Annotated[Path | None, typer.Option("--counts", help="With --method weighted or groupreduce: token counts, one a "
                      "line (line i = token id i), 'TOKEN COUNT' lines, or JSON.", show_default=False)] = None,
    corpus: Annotated[Path | None, typer.Option("--corpus", help="With --method weighted or groupreduce: texts (.txt one a line, "
                      ".jsonl with 'text') counted with the model's own tokenizer.", show_default=False)] = None,
    smoothing: Annotated[float, typer.Option("--smoothing", help="With a counted method: added to every count, "
                         "so unseen tokens keep a reconstruction.")] = 1.0,
    weight_power: Annotated[float, typer.Option("--weight-power", help="With a counted method: weights are "
                            "(count + smoothing) ** this; 0.5 softens the pull of the most frequent tokens.")] = 1.0,
    blocks: Annotated[int, typer.Option("--blocks", help="With --method groupreduce: the number of token blocks "
                      "C (1 = weighted SVD).")] = DEFAULT_BLOCKS,
    rounds: Annotated[int, typer.Option("--rounds", help="With --method groupreduce: refinement rounds (rows moved "
                      "to the block that reconstructs them best, kept only when the weighted error falls).")]
    = DEFAULT_ROUNDS,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Instead of a rule: the smallest k whose "
                        "dev accuracy stays within this many accuracy points (a fraction: 0.01 = 1 point) of the "
                        "original classifier's, found by bisection over k.", show_default=False)] = None,
    dev: DevOpt = None,
    data: DataOpt = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="With --max-drop: fine-tune each "
                               "candidate this many epochs on --data before scoring it.")] = 0,
    tables: TablesOpt = None,
    output: OutputOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Factorize each embedding table W (V x d) into W_a = U_k (V x k) and W_b = S_k V_k^T (k x d).

    Give exactly one of --reduction, --rank, --energy or --max-drop (with --dev, for classifiers). The output is
    the same kind as the input (a file, or a model folder with its config and tokenizer); its metadata records what
    was done. --method weighted weights each token's row by its count (--counts, or --corpus counted with the
    model's own tokenizer); --method groupreduce splits the vocabulary into --blocks blocks with their own
    factors, frequent blocks getting more rank under the same parameter budget.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    if max_drop is not None:
        _budget(path, max_drop, dev, data, finetune_epochs, output, force, device, json,
                others=(reduction, rank, energy))
        return
    with spinner("reading checkpoint", not json) as say:
        token_counts = load_counts(path, split_list(tables), counts, corpus)
        result = factorize_checkpoint(
            path, reduction=reduction, rank=rank, energy=energy, tables=split_list(tables), method=method,
            counts=token_counts, smoothing=smoothing, weight_power=weight_power, blocks=blocks, rounds=rounds, output=output, force=force,
            device=device, progress=say,
        )
    figures = {
        "reduction_achieved": result.reduction_achieved,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "tables": {t.name: {"rank": t.rank, "rel_error": t.rel_error, "reduction_achieved": t.reduction_achieved,
                            **({"ranks": t.blocks["ranks"]} if t.blocks else {})} for t in result.tables},
    }
    workspace.record(
        "factorize",
        options={"reduction": reduction, "rank": rank, "energy": energy, "method": method,
                 "tables": split_list(tables),
                 **({"smoothing": smoothing, "weight_power": weight_power} if token_counts else {}),
                 **({"blocks": blocks, "rounds": rounds} if method == "groupreduce" else {})},
        inputs=[("model", path), *([("counts", counts)] if counts else []), *([("corpus", corpus)] if corpus else [])],
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
              human_bytes(t.bytes_after), ", ".join(tie_label(n, how) for n, how in t.tied.items()) or "-",
              f"{t.seconds:.2f} s"] for t in result.tables],
        )
    )
    console.print(
        f"whole file: {result.params_before:,} -> {result.params_after:,} parameters "
        f"(R = {pct(result.reduction_achieved)}), {human_bytes(result.file_bytes_before)} -> "
        f"{human_bytes(result.file_bytes_after)} on disk, in {result.seconds:.1f} s"
    )
    if token_counts is not None:
        w = token_counts.to_dict()
        console.print(f"weighted by {w['tokens_counted']:,} token counts from {w['source']} ({w['rows_seen']:,} of "
                      f"{w['rows']:,} rows seen, smoothing {smoothing:g}, power {weight_power:g}); rel. error is the plain, unweighted one")
    for t in result.tables:
        if t.blocks:
            b = t.blocks
            rounds = " -> ".join(f"{e:.4f}" for e in b["rounds"])
            console.print(f"{t.name}: {len(b['ranks'])} blocks (budget of rank {b['budget_rank']}), ranks "
                          f"{b['ranks']}, rows {b['sizes']}; weighted rel. error {rounds} (start, then each "
                          "refinement round kept)")


def _budget(path: Path, max_drop: float, dev: Path | None, data: Path | None, epochs: int, output: Path | None,
            force: bool, device: str, json: bool, others: tuple) -> None:
    if any(x is not None for x in others):
        raise InputError("give --max-drop alone, without --reduction, --rank or --energy")
    if dev is None:
        raise InputError("--max-drop needs --dev (the examples that measure the drop)")
    with spinner("bisecting over k", not json) as say:
        result = rank_for_budget(
            path, dev, max_drop=max_drop, train_path=data, finetune_epochs=epochs, output=output, force=force,
            config=TrainConfig(lr=2e-3, device=device),
            progress=(lambda t: say(f"k = {t.rank}: dev accuracy {100 * t.dev_accuracy:.2f} %")) if say else None,
        )
    workspace.record(
        "factorize",
        options={"max_drop": max_drop, "finetune_epochs": epochs},
        inputs=[("model", path), ("dev", dev)] + ([("train", data)] if data else []),
        outputs=[("model", Path(result.output))],
        figures={"rank": result.rank, "dev_accuracy": result.dev_accuracy, "baseline": result.baseline_dev_accuracy},
    )
    if json:
        print_json(result)
        return
    console.print(table(f"Bisection over k (budget: dev accuracy >= {pct(result.baseline_dev_accuracy, 2)} - "
                        f"{100 * max_drop:g} points)",
                        ["k", "R", "dev accuracy", "within budget"],
                        [[t.rank, pct(t.reduction), pct(t.dev_accuracy, 2), "yes" if t.within_budget else "no"]
                         for t in result.trials]))
    console.print(f"chose k = {result.rank} (R = {pct(result.reduction)}), dev accuracy "
                  f"{pct(result.dev_accuracy, 2)}; wrote {result.output}")
