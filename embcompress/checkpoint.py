"""Reading and writing checkpoints.

Three kinds of input are read, lazily where the format allows:

* a ``.safetensors`` file (opened with ``safe_open``: a tensor is read only when asked for);
* a Hugging Face style folder: ``config.json`` beside ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``, or a ``pytorch_model.bin``;
* a ``.pt`` / ``.bin`` state dict, loaded only with ``torch.load(weights_only=True)``: a checkpoint is untrusted
  data, and a pickle that holds anything but tensors is refused without running it.

Outputs are written atomically (``atomic_path``: a temporary ``.NAME.embcompress-tmp-PID-RANDOM`` beside the target,
written, flushed to disk, then renamed), never over an input, never over a device, FIFO or socket, and over an
existing output only when the caller says ``force``; a later run removes the temporaries of a killed one. Tensors
that are not being compressed pass through unchanged, whatever their dtype.

Factorized files carry an ``embcompress`` key in their safetensors metadata: a JSON document (``META_KEY``) that
records, per table, the original name, shape and dtype, the rank, the reduction asked and achieved, the method and
the relative error, and the tensors tied to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, InputError, OutputError

META_KEY = "embcompress"
FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

CheckpointKind = Literal["safetensors", "hf", "torch"]

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_NAMES_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (``F32``, ``BF16``, ``I64``, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype for a safetensors dtype name, or None if torch has no such dtype here."""
    if name in _NAMES_TO_DTYPE:
        return _NAMES_TO_DTYPE[name]
    return getattr(torch, name.lower(), None) if isinstance(getattr(torch, name.lower(), None), torch.dtype) else None


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        dt = torch_dtype(self.dtype)
        itemsize = dt.itemsize if dt is not None else 1
        return self.numel * itemsize

    @property
    def is_floating(self) -> bool:
        dt = torch_dtype(self.dtype)
        return dt is not None and dt.is_floating_point


class Checkpoint:
    """An opened checkpoint: tensor names, shapes and dtypes up front; data read on demand.

    Use as a context manager, or call ``close()``. ``tensor(name)`` returns a CPU tensor.
    """

    def __init__(
        self,
        path: Path,
        kind: CheckpointKind,
        infos: dict[str, TensorInfo],
        *,
        metadata: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        loaded: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.infos = infos
        self.metadata = dict(metadata or {})
        self.config = config
        self._loaded = loaded  # for torch state dicts, which cannot be read lazily
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release open file handles."""
        self._handles.clear()

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (headers excluded), the denominator of every 'share of the file'."""
        return sum(info.nbytes for info in self.infos.values())

    @property
    def total_params(self) -> int:
        return sum(info.numel for info in self.infos.values())

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of the weight files."""
        return sum(f.stat().st_size for f in self.files)

    @property
    def embcompress_meta(self) -> dict[str, Any] | None:
        """The parsed ``embcompress`` metadata of a file this tool wrote, or None."""
        raw = self.metadata.get(META_KEY)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: the '{META_KEY}' metadata is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise CheckpointError(f"{self.path}: the '{META_KEY}' metadata is nested too deeply to read") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: the '{META_KEY}' metadata is not a JSON object")
        return meta

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU)."""
        if name not in self.infos:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._loaded is not None:
            return self._loaded[name]
        file = self.infos[name].file
        handle = self._handles.get(file)
        try:
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {_one_line(e)}") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors, read now."""
        return {name: self.tensor(name) for name in self.infos}

    def same_storage(self, a: str, b: str) -> bool:
        """True when two tensors of a torch state dict share memory (a tie saved by ``torch.save``)."""
        if self._loaded is None:
            return False
        ta, tb = self._loaded[a], self._loaded[b]
        return ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and ta.shape == tb.shape


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            infos = {}
            for name in f.keys():
                sl = f.get_slice(name)
                infos[name] = TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype(), file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None
    return infos, metadata


def _open_safetensors(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        part, meta = _read_safetensors_header(file)
        dup = set(part) & set(infos)
        if dup:
            raise CheckpointError(f"{file}: tensor {sorted(dup)[0]!r} also appears in another shard")
        infos.update(part)
        for k, v in meta.items():
            metadata.setdefault(k, v)
    return infos, metadata


def _tensors_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "module", "model_state_dict"):
            found = _tensors_of(obj.get(key))
            if found is not None:
                return found
    return None


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        globals_ = re.findall(r"(?:GLOBAL|global:?) ([\w.]+)", text, flags=re.IGNORECASE)
        if globals_:
            raise CheckpointError(
                f"{file}: refused: the pickle holds more than tensors (it calls {globals_[0]}); it was not run"
            ) from None
        detail = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(_TORCH_BOILERPLATE)]
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({(detail or ['corrupt'])[-1][:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({_one_line(e)[:200]})") from None
    tensors = _tensors_of(obj)
    if tensors is None:
        raise CheckpointError(f"{file}: holds no state dict of named tensors")
    return tensors


def _open_torch(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, torch.Tensor]]:
    loaded: dict[str, torch.Tensor] = {}
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, t in _load_torch(file).items():
            loaded[name] = t
            infos[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), file)
    return infos, loaded


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({_one_line(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: JSON nested too deeply to read") from None


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = _read_json(folder / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / index_name}: no 'weight_map' in the index")
    files = sorted({folder / str(v) for v in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{folder / index_name}: shard {f.name} is missing")
    return files


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a safetensors file, a Hugging Face style folder, or a weights-only torch state dict."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    check_input(p)
    if p.is_dir():
        config = _read_json(p / "config.json") if (p / "config.json").is_file() else None
        if (p / "model.safetensors").is_file():
            infos, meta = _open_safetensors([p / "model.safetensors"])
            return Checkpoint(p, "hf", infos, metadata=meta, config=config)
        if (p / "model.safetensors.index.json").is_file():
            infos, meta = _open_safetensors(_shards(p, "model.safetensors.index.json"))
            return Checkpoint(p, "hf", infos, metadata=meta, config=config)
        if (p / "pytorch_model.bin").is_file():
            infos, loaded = _open_torch([p / "pytorch_model.bin"])
            return Checkpoint(p, "hf", infos, config=config, loaded=loaded)
        if (p / "pytorch_model.bin.index.json").is_file():
            infos, loaded = _open_torch(_shards(p, "pytorch_model.bin.index.json"))
            return Checkpoint(p, "hf", infos, config=config, loaded=loaded)
        raise CheckpointError(
            f"{p}: folder holds no weights (looked for {', '.join(WEIGHT_FILES)})"
        )
    if p.suffix == ".safetensors":
        infos, meta = _open_safetensors([p])
        return Checkpoint(p, "safetensors", infos, metadata=meta)
    if p.suffix in TORCH_SUFFIXES:
        infos, loaded = _open_torch([p])
        return Checkpoint(p, "torch", infos, loaded=loaded)
    raise CheckpointError(
        f"{p}: unknown checkpoint type (expected .safetensors, {'/'.join(TORCH_SUFFIXES)}, or a model folder)"
    )


def check_finite(name: str, tensor: torch.Tensor, *, what: str = "table", action: str = "factorize it") -> None:
    """Refuse a tensor holding NaN or Inf, naming it and its first bad row: nothing computed from it would mean
    anything (a factorization, a score, an export, a fine-tuning)."""
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) if bad.dim() > 0 else 0
        raise CheckpointError(f"{what} {name!r} holds {int(bad.sum())} NaN or Inf value(s), the first in row "
                              f"{first}; refusing to {action}")


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], *, action: str) -> None:
    """``check_finite`` on every floating tensor of a state dict or a module's ``named_parameters()``."""
    for name, tensor in tensors:
        check_finite(name, tensor.detach(), what="tensor", action=action)


# --- special files --------------------------------------------------------------------------------------------

_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def special_kind(path: Path) -> str | None:
    """What a path is when it is neither a regular file nor a folder ("a FIFO", "a socket", ...); None when it is
    one of those, or does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), None)


def check_input(path: Path) -> None:
    """Refuse an input that is a FIFO, socket or device before anything opens it (a FIFO would block forever)."""
    kind = special_kind(path)
    if kind is not None:
        raise InputError(f"{path}: is {kind}, not a regular file or folder; refusing to read it")


# --- writing ---------------------------------------------------------------------------------------------------

TMP_MARK = ".embcompress-tmp-"
_TMP_RE = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"(\d+)-[0-9a-f]+$")
# errno values that mean "this cannot be written here", whatever the library that met them
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                          errno.EIO, errno.ENOTDIR, errno.EISDIR})
_OS_ERROR_RE = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_special(out: Path) -> None:
    kind = special_kind(out)
    if kind is not None:
        raise OutputError(f"{out}: is {kind}; an output can only replace a regular file or folder")


def check_output(out: Path, inputs: list[Path], *, force: bool = False) -> None:
    """Refuse an output that is an input (or inside an input folder), that is a device, FIFO or socket, that
    exists without ``force``, or whose folder does not exist or cannot be written. Stale temporaries of earlier,
    killed runs beside it are removed."""
    for src in inputs:
        if _same_path(out, src):
            raise OutputError(f"{out}: the output would overwrite the input; choose another -o")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"{out}: the output would be written inside the input folder {src}")
    _refuse_special(out)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; use --force to replace it, or -o {_free_name(out)} to keep it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output folder is not writable")
    remove_stale_temporaries(parent)


def _free_name(out: Path) -> Path:
    """The first of NAME-2, NAME-3 ... (before a file's suffix) beside ``out`` that does not exist."""
    suffix = "" if out.is_dir() else out.suffix
    stem = out.name.removesuffix(suffix) if suffix else out.name
    n = 2
    while (out.parent / f"{stem}-{n}{suffix}").exists():
        n += 1
    return out.parent / f"{stem}-{n}{suffix}"


def temporary_name(out: Path) -> Path:
    """A fresh name beside ``out`` that says what it is: ``.NAME.embcompress-tmp-PID-RANDOM`` (the pid lets a
    later run tell a temporary of a killed run from one still being written)."""
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _started_after(pid: int, when: float) -> bool:
    """True when the process now holding ``pid`` started after ``when`` (the pid was reused); False if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") > when + 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def _is_stale(path: Path, pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    try:
        return _started_after(pid, path.lstat().st_mtime)
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries of our naming in ``folder`` whose creating process is gone (killed mid-write);
    return what was removed. Temporaries of live processes stay."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if match and _is_stale(Path(entry.path), int(match.group(1))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _write_errno(exc: BaseException) -> tuple[int, str] | None:
    """(errno, strerror) of the cannot-write OS error behind ``exc`` (its chain searched, and the 'os error N' a
    library's message carries), or None when ``exc`` is something else."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.errno, e.strerror or os.strerror(e.errno)
        if isinstance(e, (RuntimeError, OSError, SafetensorError)):
            for m in _OS_ERROR_RE.finditer(str(e)):
                code = int(m.group(1) or m.group(2))
                if code in WRITE_ERRNOS:
                    return code, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def cannot_write(out: Path, exc: BaseException) -> OutputError | None:
    """The ``OutputError`` (exit 3, naming ``out``) for a write that failed for want of space, quota, permission
    or a writable file system; None when ``exc`` is not such a failure."""
    if isinstance(exc, OutputError):
        return exc
    found = _write_errno(exc)
    return None if found is None else OutputError(f"{out}: cannot write ({found[1]})")


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder of a folder, to the disk before it is renamed into place."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name, os.O_RDONLY)
            _fsync(Path(root), os.O_RDONLY | os.O_DIRECTORY)
    else:
        _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _put_in_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; an existing folder (or a file replaced by a folder) is swapped out
    atomically where the system allows, then removed, so no moment leaves ``target`` missing."""
    if target.is_dir() or (tmp.is_dir() and target.exists()):
        if _exchange(tmp, target):
            _remove(tmp)  # now holds the old output
            return
        old = temporary_name(target)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        _remove(old)
        return
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(out: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` (``.NAME.embcompress-tmp-PID-RANDOM``, a file or a folder) for the
    caller, or any library, to write into; on success flush it to disk and rename it onto ``out``; on any failure
    or interrupt remove it, leaving ``out`` as it was. A failure for want of space, quota or permission becomes
    an ``OutputError`` (exit 3) naming ``out``. A file output never replaces a folder, and nothing replaces a
    device, FIFO or socket."""
    out = Path(out)
    parent = out.parent.resolve()
    target = parent / out.name
    _refuse_special(target)
    if not directory and target.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name for this output")
    remove_stale_temporaries(parent)
    tmp = temporary_name(target)
    try:
        if directory:
            os.mkdir(tmp, 0o777)
        else:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        raise OutputError(f"{parent}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _refuse_special(target)
        _put_in_place(tmp, target)
        with contextlib.suppress(OSError):
            _fsync(parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException as e:
        _remove(tmp)
        failure = cannot_write(out, e)
        if failure is not None and failure is not e:
            raise failure from None
        raise


@contextlib.contextmanager
def temporary_folder(near: Path) -> Iterator[Path]:
    """A scratch folder beside ``near`` (named as ``atomic_path`` names its temporaries, so a killed run's is
    removed by the next), removed when the block ends; a write failure in it becomes an ``OutputError`` naming
    ``near``."""
    near = Path(near)
    tmp = temporary_name(near.parent.resolve() / near.name)
    try:
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise OutputError(f"{tmp.parent}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException as e:
        failure = cannot_write(near, e)
        if failure is not None and failure is not e:
            raise failure from None
        raise
    finally:
        _remove(tmp)


def save_text(text: str, out: Path) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_torch(obj: Any, out: Path) -> None:
    """``torch.save`` into a temporary beside ``out``, then rename (through a file object, so a full disk
    reports its OS error rather than a C++ assertion)."""
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def _tensor_bytes(t: torch.Tensor) -> Any:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors format ourselves into ``file`` (the safetensors library writes through a temporary
    of its own, named after nothing, which a kill would leave behind)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise InputError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in a safetensors file")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            fh.write(_tensor_bytes(tensors[name]))
        fh.flush()
        os.fsync(fh.fileno())


def save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (or into a folder being written atomically)."""
    with atomic_path(out) as tmp:
        _write_safetensors(tensors, tmp, metadata or {})


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    out: Path,
    *,
    like: Checkpoint,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as the same kind as ``like``: a file as a safetensors file; a folder as a folder holding
    ``model.safetensors`` and every non-weight file of the original (config, tokenizer, pooling ...)."""
    meta = {"format": "pt", **{k: v for k, v in like.metadata.items() if k != META_KEY}, **(metadata or {})}
    if like.kind != "hf":
        save_safetensors(tensors, out, meta)
        return
    with atomic_path(out, directory=True) as tmp:
        copy_folder_files(like.path, tmp, skip={f.name for f in like.files})
        _write_safetensors(tensors, tmp / "model.safetensors", meta)

def copy_folder_files(src: Path, dst: Path, skip: set[str] | None = None) -> None:
    """Copy a model folder's files other than its weights (config, tokenizer, pooling ...) into ``dst``; names in
    ``skip`` and hidden files stay behind."""
    skip = set(WEIGHT_FILES) | (skip or set())
    for item in src.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def default_output(path: Path, tag: str) -> Path:
    """Where an output goes when ``-o`` is omitted: ``model.<tag>.safetensors`` beside a file, ``<folder>-<tag>``
    beside a folder."""
    if path.is_dir():
        return path.parent / f"{path.name}-{tag}"
    stem = path.name.removesuffix(path.suffix)
    return path.parent / f"{stem}.{tag}.safetensors"
