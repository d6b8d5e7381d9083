"""The method registry and the contract every method keeps.

A table is described on two axes:

* its **structure**, how the V x d table is shaped: ``dense``, low-rank factors (``svd``, ``weighted``), blocks of
  factors (``groupreduce``), codebooks (``pq``), binary codes (``iiq``) ...;
* its **storage**, how each float tensor of that structure is kept in the file: float32 (none), ``fp16``, ``int8``
  per row, low-bit groups (``lowbit``) ...

A method is one module that builds a :class:`Method` and calls :func:`register` (or is named by an entry point in
the group ``embcompress.methods``). A structure method encodes a dense table into a :class:`Table`, the
``nn.Module`` that serves it; a storage method turns one tensor into the tensors stored for it and back, row by row,
so a dense table stored that way is served by :class:`StoredTable` without ever being rebuilt whole.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

STRUCTURE = "structure"
STORAGE = "storage"
KINDS = (STRUCTURE, STORAGE)
ENTRY_POINT_GROUP = "embcompress.methods"
FLOAT32_BYTES = 4

C = TypeVar("C", bound="Config")


class BudgetError(InputError):
    """No setting of a method fits the byte budget asked for (or the budget is not below the float32 table)."""


@dataclass(frozen=True)
class Config:
    """A method's options: subclasses are frozen dataclasses whose fields are the options and their defaults."""

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values (the record stores this)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any] | None) -> C:
        """Options from a record or from the command line; unknown names are refused."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}")
        try:
            return cls(**values)
        except TypeError as e:
            raise InputError(str(e)) from None

    @classmethod
    def for_budget(cls: type[C], rows: int, dim: int, budget: int, **options: Any) -> C:
        """The best options whose stored bytes for a ``rows`` x ``dim`` table are at most ``budget``."""
        raise BudgetError(f"{cls.__name__} cannot be sized to a byte budget")

    def stored_bytes(self, rows: int, dim: int) -> int:
        """The bytes a ``rows`` x ``dim`` table takes with these options (for planning, before encoding)."""
        raise NotImplementedError

    def extra_bytes(self, rows: int, dim: int, storage: Config | None = None) -> int:
        """Bytes beyond ``planned_shapes`` that a structure kept in ``storage`` may add (maps, per-block scales)."""
        return 0

    def planned_shapes(self, rows: int, dim: int) -> dict[str, tuple[int, ...]] | None:
        """The shapes of the float tensors a storage may keep (``storable``), when known before encoding; a
        budget for structure+storage is checked against them."""
        return None


@dataclass
class Context:
    """What a structure's ``encode`` may use besides the table itself."""

    counts: torch.Tensor | None = None  # how often each row occurs in the user's texts (float, length V)
    padding_idx: int | None = None
    device: str = "cpu"
    seed: int = 0


class Table(nn.Module):
    """The ``nn.Module`` that serves an encoded table: every structure's module subclasses it.

    ``forward(ids)`` looks rows up; ``logits(hidden)`` is the tied output layer ``hidden @ W^T``; ``dense_weight()``
    materialises W (for export to dense tools and for tests); ``recoverable()`` lists what recovery may train.
    ``tensors()`` and ``from_tensors`` are the file form: names relative to the table's module.
    """

    method: ClassVar[str] = ""
    trains_codes: ClassVar[bool] = False  # code_training gives a module: recovery can re-assign its codes

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden @ W^T (+ bias)``; structures with a cheaper product override it."""
        return F.linear(hidden, self.dense_weight(), bias)

    def recoverable(self) -> list[nn.Parameter]:
        """The parameters recovery may train (all floating parameters by default)."""
        return [p for p in self.parameters() if p.is_floating_point()]

    def code_training(self, start: torch.Tensor | None = None,
                      counts: torch.Tensor | None = None) -> CodeTraining | None:
        """A module that trains this table's codes too, where its method stores codes (None otherwise): recovery
        trains a float copy of the table (``start``, V x d, by default the decoded table), each row read through
        its nearest codes (a straight-through estimate), and ``CodeTraining.table()`` is the table again.
        ``counts`` (per row, from the training texts) weight the rows where the method re-fits what codes index."""
        return None

    def config(self) -> Config:
        """The options this table was encoded with."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Figures measured when encoding (relative error, ranks chosen ...), JSON values; stored in the record."""
        return dict(getattr(self, "_info", {}) or {})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored in the file, by name relative to this module (its persistent state by default)."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> Table:
        """Rebuild the table from its stored tensors and its record entry."""
        raise NotImplementedError

    def storable(self) -> list[str]:
        """Names (as in ``tensors()``) of the float tensors a storage method may store in fewer bits."""
        return [k for k, v in self.tensors().items() if v.is_floating_point() and v.dim() == 2]

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def macs(self) -> dict[str, int]:
        """Multiply-adds per looked-up token (``lookup``) and per position of a tied output layer (``logits``)."""
        return {"lookup": 0, "logits": self.num_embeddings * self.embedding_dim}

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class TiedLinear(nn.Module):
    """An output layer tied to a :class:`Table`: ``table.logits(hidden, bias)``. It owns no table of its own, so
    the tie survives training and saving."""

    def __init__(self, table: nn.Module, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = [table]  # a list keeps it out of this module's parameters and state dict
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def tied_to(self) -> nn.Module:
        return self.embedding[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tied_to.logits(hidden, self.bias)


Encode = Callable[[torch.Tensor, Any, Context], Table]
Quantize = Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]
Dequantize = Callable[[Mapping[str, torch.Tensor], Any, tuple[int, ...]], torch.Tensor]
Gather = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Any, int], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One registered method.

    A ``structure`` gives ``encode(W, config, context) -> Table`` and ``table`` (its module class, whose
    ``from_tensors`` reads it back). A ``storage`` gives ``quantize(tensor, config) -> {suffix: tensor}`` (the
    suffix ``""`` keeps the tensor's own name), ``dequantize(stored, config, shape) -> float32 tensor`` (row-wise: it
    also decodes any subset of rows) and optionally ``gather(stored, ids, config, dim)`` for its ONNX lowering.
    """

    name: str
    kind: str
    config: type[Config]
    description: str
    encode: Encode | None = None
    table: type[Table] | None = None
    quantize: Quantize | None = None
    dequantize: Dequantize | None = None
    gather: Gather | None = None
    fit_stored: Callable[[torch.Tensor, Table, Method, Config], None] | None = None  # structure+storage fitting
    takes_storage: bool = True  # a structure whose tensors a storage may keep (codebooks and codes keep their own)
    needs: tuple[str, ...] = ()  # "counts": token counts from --corpus / --counts
    onnx: bool = True
    folds_at_load: bool = True  # its ONNX lowering is standard ops onnxruntime folds (export --decode-at-load)
    aliases: tuple[str, ...] = ()
    budget_options: tuple[str, ...] = field(default=())  # options --budget chooses (shown by `methods`)

    def options(self) -> list[dict[str, Any]]:
        """Each option with its type and default (for ``embcompress methods``)."""
        out = []
        for f in dataclasses.fields(self.config):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append({"name": f.name, "type": getattr(f.type, "__name__", str(f.type)), "default": default})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description, "options": self.options(),
                "needs": list(self.needs), "onnx": self.onnx, "budget": list(self.budget_options),
                "takes_storage": self.takes_storage if self.kind == STRUCTURE else None,
                "aliases": list(self.aliases)}


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
_entry_points_loaded = False
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry: it then shows in the library, in ``--method`` and in ``embcompress methods``."""
    if not _NAME.match(method.name):
        raise ValueError(f"a method name is lower-case letters, digits, '-' and '_': {method.name!r}")
    if method.kind not in KINDS:
        raise ValueError(f"a method's kind is one of {KINDS}, got {method.kind!r}")
    if method.kind == STRUCTURE and (method.encode is None or method.table is None):
        raise ValueError(f"structure {method.name!r} needs encode and table")
    if method.kind == STORAGE and (method.quantize is None or method.dequantize is None):
        raise ValueError(f"storage {method.name!r} needs quantize and dequantize")
    if not replace and (method.name in _REGISTRY or method.name in _ALIASES):
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def unregister(name: str) -> None:
    """Remove a method (tests use it to undo a toy registration)."""
    method = _REGISTRY.pop(name, None)
    for alias in method.aliases if method else ():
        _ALIASES.pop(alias, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party plugin must not break the tool
            raise InputError(f"the method plugin {ep.name!r} ({ep.value}) cannot be loaded: {e}") from None
        if isinstance(obj, Method) and obj.name not in _REGISTRY:
            register(obj)


def get(name: str, kind: str | None = None) -> Method:
    """The registered method called ``name`` (or one of its aliases); refused with the known names otherwise."""
    _load_entry_points()
    method = _REGISTRY.get(_ALIASES.get(name, name))
    if method is None or (kind is not None and method.kind != kind):
        known = ", ".join(m.name for m in registered(kind))
        what = f"{kind} method" if kind else "method"
        raise InputError(f"unknown {what} {name!r}; registered: {known}")
    return method


def registered(kind: str | None = None) -> list[Method]:
    """Every registered method (of one kind), in registration order."""
    _load_entry_points()
    return [m for m in _REGISTRY.values() if kind is None or m.kind == kind]


# --- a dense table kept in a storage ---------------------------------------------------------------------------


class CodeTraining(nn.Module):
    """A table in recovery whose codes move with a trained float copy of it (``Table.code_training``).

    ``penalty`` (set by each forward) pulls the rows toward the codes they are read through; ``step()`` runs
    after every optimizer step (re-fitting what the codes index, every so often); ``table()`` is the table with
    each row's codes re-assigned, in the bytes of the table it started from."""

    penalty: torch.Tensor | float = 0.0
    penalty_weight: float = 1.0  # its weight in the training loss

    def step(self) -> None:
        raise NotImplementedError

    def table(self) -> Table:
        raise NotImplementedError


class StoredTable(Table):
    """A dense table kept as a storage method stores it: each lookup decodes only the rows it needs.

    The stored tensors are buffers (``weight`` and the storage's own suffixes), so the table stays packed in memory;
    ``dense_weight`` decodes the whole table (for tests and tied output layers).
    """

    method = "dense"

    def __init__(self, storage: Method, config: Config, stored: Mapping[str, torch.Tensor], rows: int, dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.storage_config = config
        self.num_embeddings, self.embedding_dim, self.padding_idx = rows, dim, padding_idx
        self._suffixes = list(stored)
        for suffix, t in stored.items():
            self.register_buffer(_buffer_name(suffix), t.detach().clone())

    def _stored(self, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for suffix in self._suffixes:
            t = getattr(self, _buffer_name(suffix))
            out[suffix] = t if ids is None or t.dim() == 0 else t[ids]
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.storage.gather is not None:
            return self.storage.gather(self._stored(), ids, self.storage_config, self.embedding_dim)
        flat = ids.reshape(-1)
        rows = self.storage.dequantize(self._stored(flat), self.storage_config, (flat.numel(), self.embedding_dim))
        return rows.reshape(*ids.shape, self.embedding_dim)

    def dense_weight(self) -> torch.Tensor:
        return self.storage.dequantize(self._stored(), self.storage_config, (self.num_embeddings, self.embedding_dim))

    def recoverable(self) -> list[nn.Parameter]:
        return []

    def config(self) -> Config:
        return self.storage_config

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"weight{suffix}": getattr(self, _buffer_name(suffix)) for suffix in self._suffixes}

    def storable(self) -> list[str]:
        return []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={self.storage.name}, {self.storage_config}"


def _buffer_name(suffix: str) -> str:
    return "weight" + suffix


def bits_per_value(stored_bytes: int, rows: int, dim: int) -> float:
    """Stored bits per table entry: 32 for float32, ~2.5 for 2-bit groups with their scales."""
    return 8.0 * stored_bytes / max(1, rows * dim)


def fraction(stored_bytes: int, rows: int, dim: int) -> float:
    """Stored bytes over the float32 table's."""
    return stored_bytes / (FLOAT32_BYTES * rows * dim)


def budget_bytes(budget: float | int, rows: int, dim: int) -> int:
    """A budget given as a fraction of the float32 table (``0.05``) or as bytes (``>= 1``), in bytes."""
    if isinstance(budget, float) and budget < 1:
        return int(math.floor(budget * FLOAT32_BYTES * rows * dim))
    return int(budget)
