"""Reading and writing checkpoints.

Three kinds of input are read, lazily where the format allows:

* a ``.safetensors`` file (opened with ``safe_open``: a tensor is read only when asked for);
* a Hugging Face style folder: ``config.json`` beside ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``, or a ``pytorch_model.bin``;
* a ``.pt`` / ``.bin`` state dict, loaded only with ``torch.load(weights_only=True)``: a checkpoint is untrusted
  data, and a pickle that holds anything but tensors is refused without running it.

Outputs are written atomically (a temporary file or folder beside the target, then a rename), never over an input,
and over an existing output only when the caller says ``force``. Tensors that are not being compressed pass through
unchanged, whatever their dtype.

Factorized files carry an ``embcompress`` key in their safetensors metadata: a JSON document (``META_KEY``) that
records, per table, the original name, shape and dtype, the rank, the reduction asked and achieved, the method and
the relative error, and the tensors tied to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, OutputError

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


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse a table holding NaN or Inf: no factorization of it would mean anything."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"table {name!r} holds {bad} NaN or Inf value(s); refusing to factorize it")


# --- writing ---------------------------------------------------------------------------------------------------


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(out: Path, inputs: list[Path], *, force: bool = False) -> None:
    """Refuse an output that is an input (or inside an input folder), that exists without ``force``, or whose
    folder does not exist or cannot be written."""
    for src in inputs:
        if _same_path(out, src):
            raise OutputError(f"{out}: the output would overwrite the input; choose another -o")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"{out}: the output would be written inside the input folder {src}")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; use --force to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output folder is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(out: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success rename it onto ``out``, on failure remove it.

    For a folder that already exists (the caller checked ``force``), the old folder is moved aside first and
    removed only after the new one is in place, so a failure never leaves neither.
    """
    parent = out.resolve().parent
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise OutputError(f"{parent}: cannot write there ({_one_line(e)})") from None
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp makes 0600; give the usual mode
        if directory and out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            old.rmdir()
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if directory and out.exists():
                out.unlink()
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share memory with an earlier one (safetensors refuses shared storage)."""
    seen: set[int] = set()
    clean = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in seen and v.numel() else v.contiguous()
        seen.add(ptr)
    return clean


def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    try:
        save_file(_unshared(tensors), str(file), metadata=metadata)
        os.chmod(file, 0o666 & ~_umask())  # safetensors writes 0600; inside a folder nothing else fixes the mode
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError as e:
        raise OutputError(f"{file}: write failed ({_one_line(e)})") from None


def save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically."""
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
