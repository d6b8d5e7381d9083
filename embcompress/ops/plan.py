"""``compress --method auto``: measure every method at the budget on the user's texts, write the best.

:func:`choose` reads the rows of a sweep (:mod:`embcompress.sweep`, no recovery) and picks, among the rows that fit
within the budget, the one of highest quality (ties: the smaller), or with ``min_quality`` the smallest that
reaches it; it says why, against the runner-up and the measurement's noise. :func:`compress_auto` runs the sweep at
one budget, chooses, and writes the choice with :func:`embcompress.ops.compress.compress` (the same sizing and the
same token counts as the sweep, so the file holds what was measured). The sweep's cache (``.embcompress-cache``
beside the output, where ``compare`` also keeps it) holds every row measured before on the same model, texts,
counts and settings, so after ``compare`` nothing is encoded or measured again and the chosen row's tables are
written as they were measured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import sweep
from ..checkpoint import check_output
from ..errors import InputError
from ..methods import base
from .compress import CompressResult, compress, parse_budget

AUTO = "auto"


@dataclass
class Choice:
    """The row chosen, why, and the front it was chosen from."""

    row: sweep.Row
    why: str
    front: list[sweep.Row]
    runner_up: sweep.Row | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.row.method, "why": self.why, "row": self.row.to_dict(),
                "runner_up": self.runner_up.to_dict() if self.runner_up else None,
                "front": [r.to_dict() for r in self.front]}


def check_min_quality(value: float | None) -> None:
    """``--min-quality`` is in (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise InputError(f"--min-quality must be in (0, 1], got {value}")


def choose(result: sweep.SweepResult, budget_bytes: int, min_quality: float | None = None) -> Choice:
    """The best measured row within ``budget_bytes`` (or the smallest reaching ``min_quality``); refused with the
    best there is when nothing fits or nothing reaches the floor."""
    check_min_quality(min_quality)
    within = [r for r in result.rows if r.fits and not r.recovered and r.method != sweep.UNCOMPRESSED
              and r.quality is not None and r.table_bytes is not None and r.table_bytes <= budget_bytes]
    if not within:
        raise InputError(f"no method fits {budget_bytes:,} bytes for these tables; try a larger --budget")
    by_quality = sorted(within, key=lambda r: (-(r.quality or 0), r.table_bytes))
    best = by_quality[0]
    what = result.quality.split(" to ")[0]
    if min_quality is not None:
        reaching = sorted((r for r in within if (r.quality or 0) >= min_quality), key=lambda r: (r.table_bytes,
                                                                                               -(r.quality or 0)))
        if not reaching:
            raise InputError(f"no method within {budget_bytes:,} bytes reaches --min-quality {min_quality:g}; the best "
                             f"is {best.method} at {best.quality:.4f}")
        row = reaching[0]
        why = (f"the smallest of {len(reaching)} representations within {budget_bytes:,} bytes whose {what} reaches "
               f"{min_quality:g}: {row.method} ({row.table_bytes:,} bytes, {row.quality:.4f})")
        others = [r for r in by_quality if r is not row]
        return Choice(row, why, result.front(), others[0] if others else None)
    runner = next((r for r in by_quality[1:] if r.method != best.method), None)
    why = (f"the highest {what} of {len(within)} representations within {budget_bytes:,} bytes: {best.method} "
           f"{best.quality:.4f} ({best.table_bytes:,} bytes)")
    if runner is not None:
        margin = (best.quality or 0) - (runner.quality or 0)
        noise = max(best.quality_stderr or 0, runner.quality_stderr or 0)
        why += (f"; next {runner.method} {runner.quality:.4f}, {margin:.4f} lower"
                + (f" ({margin / noise:.1f} standard errors)" if noise > 0 else ""))
    return Choice(best, why, result.front(), runner)


@dataclass
class AutoResult:
    """What ``compress --method auto`` measured, chose and wrote."""

    choice: Choice
    written: CompressResult
    sweep: sweep.SweepResult
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.written.to_dict(), "auto": self.choice.to_dict(),
                "rows": sweep.rows_json(self.sweep), "settings": self.settings}


def compress_auto(
    path: str | os.PathLike[str],
    *,
    budget: str | float | None,
    data: str | os.PathLike[str] | None,
    min_quality: float | None = None,
    methods: str | list[str] | None = None,
    limit: int | None = None,
    corpus: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> AutoResult:
    """Sweep every method at ``budget`` on the texts of ``data`` (no recovery), choose, and write the choice.

    Methods that weight by frequency count tokens in ``corpus`` when given (texts other than the scored ones, so
    their scores are not flattered), else in ``data``."""
    if data is None:
        raise InputError("--method auto measures every method on your texts: give --data TEXTS (.txt or .jsonl)")
    if budget is None:
        raise InputError("--method auto needs --budget (a fraction such as 0.05, or a size such as 2MB)")
    check_min_quality(min_quality)
    parse_budget(budget, 1 << 62)  # its form, before the model is read
    src = Path(path)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, [src, Path(data)], force=force)
    cache = sweep.cache_folder(out)
    result = sweep.sweep(src, data, budgets=[str(budget)], methods=methods, limit=limit, cache_dir=cache,
                         train=corpus, device=device, progress=progress)
    size = next(iter(result.settings["budget_bytes"].values()))
    choice = choose(result, size, min_quality)
    counted = any("counts" in m.needs for m in _parts(choice.row.method))
    encoded = sweep.cached_tables(result, choice.row)
    if progress:
        progress(f"writing {choice.row.method}" + (" (its tables as measured, from the cache)" if encoded else ""))
    written = compress(src, choice.row.method, budget=str(budget),
                       corpus=(corpus if corpus is not None else data) if counted else None,
                       output=output, force=force, device=device, progress=progress, encoded=encoded)
    return AutoResult(choice, written, result, {"budget": str(budget), "min_quality": min_quality,
                                                "data": str(data), "limit": limit, "cache": str(cache),
                                                "rows_from_cache": result.settings["row_cache"]["read"],
                                                "tables_from_cache": encoded is not None})


def _parts(method: str) -> list[base.Method]:
    return [base.get(p) for p in method.split("+") if p and p != "dense"]
