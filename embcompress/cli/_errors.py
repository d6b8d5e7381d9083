"""Map exceptions to one line on stderr and an exit code: a user never sees a traceback for bad input.

Exit codes: 1 internal error, 2 bad input (arguments, checkpoints, data), 3 output cannot be written (full disk,
quota, read-only file system, not a regular file), 4 missing optional dependency, 130 interrupted (143 for
SIGTERM). ``EMBCOMPRESS_DEBUG=1`` re-raises for a full traceback and lets library warnings through.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import ParamSpec, TypeVar

from ..checkpoint import remove_stale_temporaries
from ..errors import EmbcompressError, Interrupted

P = ParamSpec("P")
R = TypeVar("R")

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

_signal_received = signal.SIGINT
# a bare OSError with one of these is a write the system refused; any other is a bad input (exit 2)
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _say(message: str) -> None:
    print(f"embcompress: error: {message}", file=sys.stderr)


def _debug() -> bool:
    return os.environ.get("EMBCOMPRESS_DEBUG") == "1"


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into the same unwinding as Ctrl-C, so every temporary is removed on the way out."""
    global _signal_received
    _signal_received = signal.Signals(signum)
    raise KeyboardInterrupt


def prepare() -> None:
    """Set up a command run: SIGTERM unwinds like Ctrl-C; library warnings stay off the terminal unless
    ``EMBCOMPRESS_DEBUG=1``; temporaries that killed runs left in the current folder are removed."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    if not _debug():
        warnings.simplefilter("ignore")
    remove_stale_temporaries(Path.cwd())


def interruptible(command: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command so Ctrl-C inside it ends as one line and exit 130 (typer would exit 130 silently)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; nothing written") from None

    return run


def _from_json_decoder(exc: BaseException) -> bool:
    """True when a RecursionError was raised while decoding JSON (a hostile, deeply nested document)."""
    return any(os.sep + "json" + os.sep in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def exit_code_for(exc: BaseException) -> int:
    """Print one line for ``exc`` and return the exit code it maps to."""
    if _debug():
        raise exc
    if isinstance(exc, Interrupted):
        print(f"embcompress: {exc}", file=sys.stderr)
        return 128 + int(_signal_received)
    if isinstance(exc, EmbcompressError):
        _say(str(exc))
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("embcompress: interrupted; nothing written", file=sys.stderr)
        return 128 + int(_signal_received)
    if isinstance(exc, MemoryError):
        _say("out of memory; try --method randomized or a machine with more memory")
        return EXIT_INTERNAL
    if isinstance(exc, RecursionError) and _from_json_decoder(exc):
        _say("a JSON document is nested too deeply to read")
        return 2
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _say(f"{where}{exc.strerror or exc}")
        return 3 if exc.errno in _NO_ROOM else 2
    first = (str(exc).strip().splitlines() or [""])[0]
    _say(f"internal error: {type(exc).__name__}: {first} (set EMBCOMPRESS_DEBUG=1 for the traceback)")
    return EXIT_INTERNAL
