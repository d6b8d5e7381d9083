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
