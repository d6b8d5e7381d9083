"""The library's exceptions.

Every failure a user can cause (a bad path, a corrupt file, a bad option, an output that already exists) raises a
subclass of :class:`EmbcompressError` with a message that fits on one line. The CLI maps each class to an exit code
(see ``embcompress.cli._errors``); library users catch them like any other exception.
"""

from __future__ import annotations


class EmbcompressError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code: int = 1


class InputError(EmbcompressError):
    """An argument or option is invalid (a reduction outside (0, 1), a rank below 1, ...)."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint cannot be read: missing, truncated, corrupt, unsafe to load, or holding bad values."""


class DataError(InputError):
    """A data file (JSON Lines, vectors, texts) cannot be used; the message names the file and line."""


class TableError(InputError):
    """No embedding table was found, or a requested table does not exist or cannot be factorized."""


class OutputError(EmbcompressError):
    """An output cannot be written: it exists (without --force), equals an input, is a device, FIFO or socket, its
    folder is unwritable, or the disk, quota or file system refused the write."""

    exit_code = 3


class Interrupted(EmbcompressError):
    """Ctrl-C (or SIGTERM) stopped a command; the message says what was kept ("interrupted after epoch 2; resume
    with --resume") or that nothing was written."""

    exit_code = 130


class DependencyError(EmbcompressError):
    """An optional dependency (an extra such as ``[onnxruntime]``) is missing; the message names the extra."""

    exit_code = 4
