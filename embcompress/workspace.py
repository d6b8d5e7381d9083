"""The workspace record: what each command did in this folder, so the next command can pick up where it left off.

Every command that writes an artifact appends an entry to ``embcompress-workspace.json`` in the current folder:
the command, its options, its inputs and outputs (path and sha256) and the figures it printed. A later command
that omits an argument (``embcompress finetune --data train.jsonl`` with no model) takes it from the record, says
so, and an explicit argument always wins. The record doubles as provenance: what was done to this model, by which
command. ``EMBCOMPRESS_WORKSPACE`` names another record file, or ``off`` to keep none.

A command checks that the record is readable and writable (``check_record``) before it writes any output, and adds
its entry only after the output is in place: under an exclusive lock on the record's folder, it reads the record
again, appends, and replaces the file atomically, so two commands finishing at once both keep their entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .checkpoint import check_input, save_text
from .errors import InputError, OutputError

RECORD_NAME = "embcompress-workspace.json"
ENV_VAR = "EMBCOMPRESS_WORKSPACE"


def record_path() -> Path | None:
    """The record file in use, or None when recording is off."""
    env = os.environ.get(ENV_VAR)
    if env and env.lower() == "off":
        return None
    return Path(env) if env else Path.cwd() / RECORD_NAME


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    """A file or folder a command read or wrote."""

    role: str
    path: str
    sha256: str | None = None


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def load_record(path: Path | None = None) -> list[dict[str, Any]]:
    """All entries of the record (empty when there is none)."""
    path = path or record_path()
    if path is None or not path.exists():
        return []
    check_input(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
        if not isinstance(entries, list):
            raise TypeError
        return entries
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise InputError(f"{path}: the workspace record is unreadable; move it aside to start a new one") from None


def check_record() -> None:
    """Refuse, before a command writes any output, a record it could not update afterwards: unreadable, or in a
    folder (or a file) that cannot be written. Nothing is written when recording is off."""
    path = record_path()
    if path is None:
        return
    load_record(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: the workspace record's folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{path}: the workspace record cannot be written; fix its permissions or set "
                          f"{ENV_VAR}=off")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the record's folder for the read-merge-write of one entry (no lock file left)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield  # a folder we cannot open for locking is still written atomically
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record(
    command: str,
    *,
    options: dict[str, Any],
    inputs: list[tuple[str, Path]],
    outputs: list[tuple[str, Path]],
    figures: dict[str, Any] | None = None,
) -> Path | None:
    """Append one entry to the record; return the record's path, or None when recording is off.

    Call it after the outputs are in place. Under a lock on the record's folder the record is read again, the entry
    appended and the file replaced atomically, so entries of commands that finish at the same time all stay.
    """
    path = record_path()
    if path is None:
        return None
    base = path.parent

    def art(role: str, p: Path) -> dict[str, Any]:
        return {"role": role, "path": _rel(p, base), "sha256": sha256_of(p) if p.exists() else None}

    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": f"embcompress {__version__}",
        "command": command,
        "options": options,
        "inputs": [art(r, p) for r, p in inputs],
        "outputs": [art(r, p) for r, p in outputs],
        "figures": figures or {},
    }
    with _locked(base):
        entries = load_record(path)
        entries.append(entry)
        save_text(json.dumps({"version": 1, "entries": entries}, indent=1, default=str), path)
    return path


def last_artifact(role: str, *, commands: tuple[str, ...] | None = None, side: str = "outputs") -> Path | None:
    """The most recent recorded artifact with this role (from ``outputs`` or ``inputs``) that still exists."""
    path = record_path()
    if path is None:
        return None
    for entry in reversed(load_record(path)):
        if commands and entry.get("command") not in commands:
            continue
        for art in entry.get(side, []):
            if art.get("role") == role:
                p = Path(art["path"])
                p = p if p.is_absolute() else path.parent / p
                if p.exists():
                    return p
    return None


def take(
    value: Path | None, role: str, *, what: str, commands: tuple[str, ...] | None = None, side: str = "outputs"
) -> tuple[Path, bool]:
    """An explicit ``value`` wins; otherwise the last recorded artifact of ``role``. Returns (path, from_record).

    Raises InputError naming the missing argument when neither exists.
    """
    if value is not None:
        return value, False
    found = last_artifact(role, commands=commands, side=side)
    if found is None:
        raise InputError(f"no {what} given and none in the workspace record ({record_path() or 'recording off'})")
    return found, True


def _resolve(entry_path: str, base: Path) -> Path:
    p = Path(entry_path)
    return (p if p.is_absolute() else base / p).resolve()


def finetuned_by_reduction(model: Path) -> dict[float, Path]:
    """For a dense model: {R: fine-tuned model} from the record's factorize -> finetune chains that still exist."""
    path = record_path()
    if path is None:
        return {}
    base, target = path.parent, model.resolve()
    factorized: dict[Path, float] = {}
    found: dict[float, Path] = {}
    for entry in load_record(path):
        ins = {a["role"]: _resolve(a["path"], base) for a in entry.get("inputs", [])}
        outs = {a["role"]: _resolve(a["path"], base) for a in entry.get("outputs", [])}
        reduction = (entry.get("options") or {}).get("reduction")
        if entry.get("command") == "factorize" and ins.get("model") == target and reduction and "model" in outs:
            factorized[outs["model"]] = float(reduction)
        elif entry.get("command") == "finetune" and ins.get("model") in factorized and "model" in outs:
            if outs["model"].exists():
                found[factorized[ins["model"]]] = outs["model"]
    return found


def recorded_reductions(model: Path) -> list[float]:
    """The reductions this model was factorized at, per the record, in order of first use."""
    path = record_path()
    if path is None:
        return []
    target, seen = model.resolve(), []
    for entry in load_record(path):
        ins = {a["role"]: _resolve(a["path"], path.parent) for a in entry.get("inputs", [])}
        r = (entry.get("options") or {}).get("reduction")
        if entry.get("command") == "factorize" and ins.get("model") == target and r and float(r) not in seen:
            seen.append(float(r))
    return seen
