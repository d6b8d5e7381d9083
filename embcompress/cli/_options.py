"""Option aliases shared by several commands (one place, as in huggingface_hub's CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output; allow a rank that saves nothing.")
]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Where to write. Default: beside the input (model.r90.safetensors).",
                 show_default=False),
]
TablesOpt = Annotated[
    list[str] | None,
    typer.Option("--tables", help="Table name or glob to use instead of the automatic choice (repeatable, or "
                 "comma-separated).", show_default=False),
]
CheckpointArg = Annotated[
    Path, typer.Argument(help="A .safetensors file, a Hugging Face model folder, or a .pt/.bin state dict.",
                         show_default=False)
]


def split_list(values: list[str] | None) -> list[str] | None:
    """``--tables a,b --tables c`` -> ``['a', 'b', 'c']``."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA where present, with mixed precision), cpu, cuda or cuda:N.")
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Training examples, JSON Lines: {\"text\": ..., \"label\": ...} a line.",
                 show_default=False),
]
DevOpt = Annotated[
    Path | None, typer.Option("--dev", help="Development examples (JSON Lines) to pick the best epoch.",
                              show_default=False)
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Passes over the training data.", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Examples per step.")]
LrOpt = Annotated[
    float | None, typer.Option("--lr", help="Learning rate (the upper bound LR_UB for calr and clr).",
                               show_default=False)
]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd, adam or adagrad.")]
ScheduleOpt = Annotated[
    str, typer.Option("--schedule", help="calr (the paper's cyclically annealed LR), clr (triangular) or constant.")
]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="L2 penalty.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same model on CPU.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch "
                       "(<output>.resume.pt).")
]
