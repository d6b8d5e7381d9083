"""Map exceptions to one line on stderr and an exit code: a user never sees a traceback for bad input.

Exit codes: 1 internal error, 2 bad input (arguments, checkpoints, data), 3 output cannot be written,
4 missing optional dependency, 130 interrupted. ``EMBCOMPRESS_DEBUG=1`` re-raises for a full traceback.
"""

from __future__ import annotations

import os
import sys

from ..errors import EmbcompressError

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _say(message: str) -> None:
    print(f"embcompress: error: {message}", file=sys.stderr)


def exit_code_for(exc: BaseException) -> int:
    """Print one line for ``exc`` and return the exit code it maps to."""
    if os.environ.get("EMBCOMPRESS_DEBUG") == "1":
        raise exc
    if isinstance(exc, EmbcompressError):
        _say(str(exc))
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        _say("interrupted; no output was written")
        return EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        _say("out of memory; try --method randomized or a machine with more memory")
        return EXIT_INTERNAL
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _say(f"{where}{exc.strerror or exc}")
        return 2
    first = (str(exc).strip().splitlines() or [""])[0]
    _say(f"internal error: {type(exc).__name__}: {first} (set EMBCOMPRESS_DEBUG=1 for the traceback)")
    return EXIT_INTERNAL
