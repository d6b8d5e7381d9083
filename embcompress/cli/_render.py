"""Rendering results: a rich table for people, ``--json`` for scripts (stdout holds only the JSON then)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped or captured output is not wrapped at 80 columns: tables stay one row per line for grep and logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def _default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, right: set[int] | None = None) -> Table:
    """A rich table; columns whose index is in ``right`` are right-aligned (numbers)."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    right = right if right is not None else set(range(1, len(columns)))
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i in right else "left")
    for row in rows:
        t.add_row(*[str(x) for x in row])
    return t


def human_bytes(n: float) -> str:
    """Bytes in B, kB, MB, GB (powers of 1000, as disks and model cards count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %"


def shape(s: Any) -> str:
    return " x ".join(str(int(x)) for x in s)


def render_training(report: Any, verb: str) -> None:
    """Epoch history and dev accuracy before and after, for train and finetune."""
    rows = [[h["epoch"], f"{h['train_loss']:.4f}", pct(h["dev_accuracy"], 2) if h["dev_accuracy"] is not None else "-",
             f"{h['lr_max']:.2e}", f"{h['seconds']:.1f} s", "*" if h["is_best"] else ""] for h in report.history]
    console.print(table(f"{verb} -> {report.output}", ["epoch", "loss", "dev accuracy", "lr max", "time", "best"],
                        rows))
    before = pct(report.dev_before, 2) if report.dev_before is not None else "-"
    after = pct(report.dev_after, 2) if report.dev_after is not None else "-"
    best = (f"best epoch {report.best_epoch}" if report.best_epoch != 0
            else "no epoch beat the starting model on dev: it is kept")
    console.print(f"dev accuracy before {before}, after {after} ({best}); "
                  f"{report.parameters:,} parameters ({report.table} table), {report.device}, {report.seconds:.1f} s")
