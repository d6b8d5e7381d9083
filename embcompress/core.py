"""The in-memory core: encode tables with any registered method, swap them into a model, and read them back.

``compress_(model, spec, tables=None)`` works on a live ``nn.Module`` as torchao's ``quantize_`` does: each chosen
``nn.Embedding`` is encoded by the spec's structure (and its tensors kept by the spec's storage), and the
:class:`~embcompress.methods.base.Table` takes its place, output layers that shared its weight tied to it.
``compress_state`` does the same to a state dict (no model class needed). ``table_tensors`` and ``table_from_tensors``
are the file form of one table; ``attach`` puts the recorded tables of a file back into a dense model.

A :class:`Spec` is one point on the two axes: a structure (``dense``, ``svd``, ``groupreduce``, ``pq`` ...) and a
storage for its float tensors (none, ``fp16``, ``int8``, ``lowbit`` ...), written ``svd+int8`` on the command line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, InputError, TableError
from .methods import base
from .methods.base import STORAGE, STRUCTURE, CodeTraining, Config, Context, Method, StoredTable, Table, TiedLinear

DENSE = "dense"
RECORD_VERSION = 2


@dataclass(frozen=True)
class Spec:
    """A structure (``None`` for the dense table) and a storage (``None`` for float32), each with its options."""

    structure: Method | None = None
    structure_config: Config | None = None
    storage: Method | None = None
    storage_config: Config | None = None

    @property
    def name(self) -> str:
        parts = [self.structure.name if self.structure else DENSE] if self.structure or not self.storage else []
        return "+".join(parts + ([self.storage.name] if self.storage else []))

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.structure.name if self.structure else DENSE,
                "config": self.structure_config.to_dict() if self.structure_config else {},
                "storage": self.storage.name if self.storage else None,
                "storage_config": self.storage_config.to_dict() if self.storage_config else {}}


def parse_method(text: str) -> tuple[Method | None, Method | None]:
    """``svd``, ``lowbit``, ``svd+int8``, ``dense+lowbit`` -> (structure, storage); unknown names refused."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    if not parts or len(parts) > 2:
        raise InputError(f"--method is a structure, a storage, or structure+storage (svd+int8), got {text!r}")
    structure = storage = None
    for i, part in enumerate(parts):
        if part == DENSE and i == 0:
            continue
        method = base.get(part)
        if method.kind == STRUCTURE:
            if i != 0:
                raise InputError(f"--method {text!r}: the structure comes first (svd+int8)")
            structure = method
        elif storage is not None:
            raise InputError(f"--method {text!r}: one storage at most")
        else:
            storage = method
    if structure is None and storage is None:
        raise InputError("--method dense alone changes nothing; add a storage (dense+int8) or choose a structure")
    if structure is not None and storage is not None and not structure.takes_storage:
        raise InputError(f"--method {text!r}: {structure.name} keeps its own storage (codes and fp16 codebooks); "
                         f"use {structure.name} alone")
    return structure, storage


def make_spec(method: str, options: Mapping[str, Any] | None = None,
              storage_options: Mapping[str, Any] | None = None) -> Spec:
    """A spec from a method name and the options of its structure and storage."""
    structure, storage = parse_method(method)
    options, storage_options = dict(options or {}), dict(storage_options or {})
    if structure is None and options:
        storage_options = {**options, **storage_options}
        options = {}
    return Spec(structure, structure.config.from_dict(options) if structure else None,
                storage, storage.config.from_dict(storage_options) if storage else None)


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_options(method: str, pairs: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set name=value`` pairs -> (structure options, storage options), by which config has the field;
    ``high.bits=4`` sets a key of a dict-valued option."""
    structure, storage = parse_method(method)
    s_fields = {f.name for f in dataclasses.fields(structure.config)} if structure else set()
    t_fields = {f.name for f in dataclasses.fields(storage.config)} if storage else set()
    s_opts: dict[str, Any] = {}
    t_opts: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        name = name.strip().replace("-", "_")
        head, dot, key = name.partition(".")
        if not sep or not name or (dot and not key):
            raise InputError(f"--set takes name=value, got {pair!r}")
        target = s_opts if head in s_fields else t_opts if head in t_fields else None
        if target is None:
            known = ", ".join(sorted(s_fields | t_fields)) or "none"
            raise InputError(f"--set {head}: {method} has no such option (its options: {known})")
        if dot:
            target.setdefault(head, {})[key] = _value(raw)
        else:
            target[head] = _value(raw)
    return s_opts, t_opts


def spec_for_budget(method: str, rows: int, dim: int, budget: int, options: Mapping[str, Any] | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Spec:
    """The spec whose stored bytes for a ``rows`` x ``dim`` table fit ``budget`` bytes, each method choosing its
    own parameters; with a structure and a storage, the structure is sized for the storage's bits."""
    structure, storage = parse_method(method)
    options, storage_options = dict(options or {}), dict(storage_options or {})
    if budget >= 4 * rows * dim:
        raise base.BudgetError(f"a budget of {budget} bytes is not below the float32 table ({4 * rows * dim} bytes)")
    if structure is None:
        assert storage is not None
        return Spec(None, None, storage, storage.config.for_budget(rows, dim, budget, **{**options,
                                                                                          **storage_options}))
    if storage is None:
        return Spec(structure, structure.config.for_budget(rows, dim, budget, **options))
    storage_config = storage.config.from_dict(storage_options)
    group = getattr(storage_config, "group_size", None)
    if group and "multiple" in {f.name for f in dataclasses.fields(structure.config)}:
        options.setdefault("multiple", group)
    inner = min(int(budget / _storage_ratio(storage_config, rows, dim)), 4 * rows * dim - 1)
    least: tuple[int, Config] | None = None
    for _ in range(200):  # shrink the structure's share until its tensors, so stored, fit
        config = structure.config.for_budget(rows, dim, inner, **options)
        shapes = config.planned_shapes(rows, dim)
        extra = config.extra_bytes(rows, dim, storage_config)
        if shapes is None:
            return Spec(structure, config, storage, storage_config)
        stored = sum(storage_config.stored_bytes(*_as_2d(s)) for s in shapes.values()) + extra
        if stored <= budget:
            return Spec(structure, config, storage, storage_config)
        least = min(least, (stored, config), key=lambda x: x[0]) if least else (stored, config)
        inner = int(inner * 0.99)
    assert least is not None
    chose = ", ".join(f"{k} {getattr(least[1], k)}" for k in structure.budget_options if hasattr(least[1], k))
    raise base.BudgetError(f"{method} cannot be sized to {budget} bytes for a {rows} x {dim} table: the smallest "
                           f"sizing tried ({chose}) stores {least[0]} bytes")


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0]
    return rows, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1


def _storage_ratio(config: Config, rows: int, dim: int) -> float:
    """The storage's bytes over float32's for a table of this shape (scales included)."""
    return config.stored_bytes(rows, dim) / (4 * rows * dim)


# --- one table ---------------------------------------------------------------------------------------------------


def encode_table(W: torch.Tensor, spec: Spec, context: Context | None = None) -> Table:
    """Encode a dense V x d table as ``spec`` says; the result serves it and knows its file form."""
    context = context or Context()
    if W.dim() != 2 or not W.is_floating_point():
        raise TableError(f"a table is a 2-D floating tensor, got {tuple(W.shape)} of {W.dtype}")
    V, d = W.shape
    if spec.structure is None:
        if spec.storage is None:
            raise InputError("nothing to do: no structure and no storage")
        stored = spec.storage.quantize(W.detach().float().cpu(), spec.storage_config)
        table: Table = StoredTable(spec.storage, spec.storage_config, stored, V, d, context.padding_idx)
    else:
        table = spec.structure.encode(W, spec.structure_config, context)
        if spec.storage is not None and spec.structure.fit_stored is not None:
            spec.structure.fit_stored(W.detach().float().cpu(), table, spec.storage, spec.storage_config)
            table.storage, table.storage_config, table.stored_names = spec.storage, spec.storage_config, \
                table.storable()
            _settle(table)
        elif spec.storage is not None:
            store_(table, spec.storage, spec.storage_config)
    table.spec_name = spec.name
    table._info = {**(getattr(table, "_info", None) or {}), "rel_error": relative_error(W, table)}
    return table


def relative_error(W: torch.Tensor, table: nn.Module, block: int = 8192) -> float:
    """||W - W_hat||_F / ||W||_F of what the table serves, computed block by block (no dense copy of the table)."""
    err = total = 0.0
    with torch.no_grad():
        for i in range(0, W.shape[0], block):
            ids = torch.arange(i, min(i + block, W.shape[0]), device=W.device)
            w = W[i : i + block].double()
            err += float(((table(ids).double() - w) ** 2).sum())
            total += float((w**2).sum())
    return (err / total) ** 0.5 if total > 0 else 0.0


def store_(table: Table, storage: Method, config: Config) -> None:
    """Keep the table's float tensors in ``storage``: each is replaced by what the file will hold, decoded, so the
    module in memory computes exactly what the saved one will."""
    names = table.storable()
    params = dict(table.named_parameters())
    buffers = dict(table.named_buffers())
    for name in names:
        t = params.get(name, buffers.get(name))
        if t is None:
            continue
        stored = storage.quantize(t.detach().float().cpu(), config)
        with torch.no_grad():
            t.copy_(storage.dequantize(stored, config, tuple(t.shape)).to(t.dtype))
        _remember(table, name, stored)
    table.storage = storage
    table.storage_config = config
    table.stored_names = names


def _remember(table: Table, name: str, stored: dict[str, torch.Tensor]) -> None:
    """Keep the exact stored form of the table's tensor ``name`` while the tensor is unchanged (its storage and
    version counter): quantizing decoded values again need not give the same codes (a low-bit group whose decoded
    range is narrower than the fitted one gets a new scale), so the file is written from these."""
    t = table.tensors()[name]
    table.__dict__.setdefault("_stored_cache", {})[name] = (t.data_ptr(), t._version, stored)


def _remembered(table: Table, name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    hit = table.__dict__.get("_stored_cache", {}).get(name)
    return hit[2] if hit is not None and hit[0] == t.data_ptr() and hit[1] == t._version else None


def _settle(table: Table) -> None:
    """After a structure fitted its tensors in a storage itself (``fit_stored``): set each to the decoded form of
    what the file will hold, and remember that form, so memory and file agree exactly."""
    storage, config = table.storage, table.storage_config
    for name in table.stored_names:
        t = table.tensors()[name]
        stored = storage.quantize(t.float().cpu(), config)
        decoded = storage.dequantize(stored, config, tuple(t.shape)).to(t.dtype)
        if not torch.equal(decoded, t):
            with torch.no_grad():
                t.copy_(decoded)
        _remember(table, name, stored)


def table_tensors(table: Table) -> dict[str, torch.Tensor]:
    """The tensors the file holds for one table (names relative to its module), its storage applied."""
    storage: Method | None = getattr(table, "storage", None)
    stored_names = set(getattr(table, "stored_names", ()) or ())
    out: dict[str, torch.Tensor] = {}
    for name, t in table.tensors().items():
        t = t.detach().cpu()
        if storage is not None and name in stored_names and not isinstance(table, StoredTable):
            stored = _remembered(table, name, t) or storage.quantize(t.float(), table.storage_config)
            for suffix, s in stored.items():
                out[name + suffix] = s.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def table_entry(table: Table, *, tied: Mapping[str, str] | None = None, dtype: str = "F32") -> dict[str, Any]:
    """The record of one table: its structure and options, its storage and options, what it measured."""
    storage: Method | None = getattr(table, "storage", None)
    if isinstance(table, StoredTable):
        structure, config = DENSE, {}
        storage = table.storage
    else:
        structure, config = _structure_name(table), table.config().to_dict()
    stored = table_tensors(table)
    return {
        "structure": structure,
        "config": config,
        "storage": storage.name if storage else None,
        "storage_config": table.storage_config.to_dict() if storage else {},
        "stored": sorted(getattr(table, "stored_names", ()) or ()) if not isinstance(table, StoredTable) else [],
        "shapes": {n: list(t.shape) for n, t in table.tensors().items()
                   if n in (getattr(table, "stored_names", ()) or ())},
        "shape": [table.num_embeddings, table.embedding_dim],
        "dtype": dtype,
        "padding_idx": table.padding_idx,
        "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
        "info": _json(table.info()),
        "tied": dict(tied or {}),
    }


def _structure_name(table: Table) -> str:
    name = getattr(table, "spec_name", None) or ""
    head = name.split("+")[0]
    return head if head and head != DENSE else type(table).method


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def table_from_tensors(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str = "checkpoint"
                       ) -> Table:
    """Rebuild one table from its record entry and its stored tensors (names relative to its module)."""
    try:
        V, d = (int(x) for x in entry["shape"])
        storage = base.get(entry["storage"], STORAGE) if entry.get("storage") else None
        storage_config = storage.config.from_dict(entry.get("storage_config")) if storage else None
        if entry.get("structure", DENSE) == DENSE:
            if storage is None:
                raise CheckpointError(f"{where}: a dense table recorded without a storage")
            stored = {k.removeprefix("weight"): v for k, v in tensors.items() if k.startswith("weight")}
            return StoredTable(storage, storage_config, stored, V, d, entry.get("padding_idx"))
        structure = base.get(entry["structure"], STRUCTURE)
        decoded = dict(tensors)
        stored_parts: dict[str, dict[str, torch.Tensor]] = {}
        for name in entry.get("stored") or ():
            parts = {k[len(name):]: decoded.pop(k) for k in list(decoded) if k == name or
                     (k.startswith(name) and k[len(name):].startswith("_"))}
            stored_parts[name] = parts
            shape = tuple(entry.get("shapes", {}).get(name) or ())
            decoded[name] = storage.dequantize(parts, storage_config, shape or _decoded_shape(parts))
        table = structure.table.from_tensors(decoded, entry)
        table._config = structure.config.from_dict(entry.get("config"))
        table.spec_name = structure.name
        if storage is not None:
            table.storage, table.storage_config = storage, storage_config
            table.stored_names = list(entry.get("stored") or ())
            for name in table.stored_names:
                _remember(table, name, stored_parts[name])
        return table
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{where}: the record of a table does not fit its tensors ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _decoded_shape(parts: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    main = parts[""]
    return tuple(main.shape)


# --- a model ------------------------------------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap(model: nn.Module, name: str, new: Table) -> list[str]:
    """Put ``new`` in place of the ``nn.Embedding`` ``name`` and of every module sharing its weight.

    An ``nn.Embedding`` sharing the weight (T5's ``encoder.embed_tokens``) becomes the same ``new`` module; an
    ``nn.Linear`` sharing it (a tied output layer) becomes ``TiedLinear(new, bias)``. Returns the names of the
    modules that were tied to it. The padding index is taken from the old table.
    """
    old = model.get_submodule(name)
    if isinstance(old, Table):
        raise InputError(f"{name!r} is already compressed ({type(old).__name__})")
    if not isinstance(old, nn.Embedding):
        raise InputError(f"{name!r} is a {type(old).__name__}, not an nn.Embedding")
    new.padding_idx = old.padding_idx
    weight = old.weight
    tied = []
    for mod_name, mod in list(model.named_modules(remove_duplicate=False)):
        if mod_name == name or getattr(mod, "weight", None) is not weight:
            continue
        if isinstance(mod, nn.Embedding):
            _set_module(model, mod_name, new)
        elif isinstance(mod, nn.Linear):
            _set_module(model, mod_name, TiedLinear(new, mod.bias))
        else:
            continue
        tied.append(mod_name)
    for mod_name, mod in list(model.named_modules(remove_duplicate=False)):
        if mod is old and mod_name != name:  # the same module under another name
            _set_module(model, mod_name, new)
            tied.append(mod_name)
    _set_module(model, name, new)
    # transformers would re-tie the output layer to ``<table>.weight``, which no longer exists
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_keys, dict):
        for key in [k for k, v in tied_keys.items() if v == f"{name}.weight" or k == f"{name}.weight"]:
            tied_keys.pop(key)
    return tied


def embedding_modules(model: nn.Module, tables: list[str] | None = None) -> list[str]:
    """The names of the model's ``nn.Embedding`` modules to compress: those named (names or globs, of the module or
    its ``.weight``) or, by default, every one with more rows than columns (token tables, not positions)."""
    found = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Embedding) or id(mod.weight) in seen:
            continue
        if tables:
            if not any(fnmatch.fnmatchcase(n, p) for p in tables for n in (name, f"{name}.weight")):
                continue
        elif mod.num_embeddings < 2 * mod.embedding_dim:
            continue
        seen.add(id(mod.weight))
        found.append(name)
    if tables and not found:
        raise InputError(f"no nn.Embedding matches {', '.join(tables)}")
    return found


@dataclass
class Compressed:
    """What ``compress_`` did to one table."""

    name: str
    method: str
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int
    tied: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "shape": list(self.shape), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "fraction": self.bytes_after / max(1, self.bytes_before),
                "tied": self.tied, "info": _json(self.info)}


def compress_(model: nn.Module, spec: Spec | str, tables: list[str] | None = None, *,
              counts: Mapping[str, torch.Tensor] | torch.Tensor | None = None, device: str = "cpu",
              filter_fn: Callable[[str, nn.Embedding], bool] | None = None) -> list[Compressed]:
    """Compress the model's embedding tables in place (as torchao's ``quantize_``) and return what was done.

    ``spec`` is a :class:`Spec` or a method name with default options; ``tables`` names modules (or globs);
    ``counts`` gives token counts per table (a tensor for every table, or a dict by module name) to the methods that
    need them; ``filter_fn(name, module)`` narrows the choice further.
    """
    if isinstance(spec, str):
        spec = make_spec(spec)
    done = []
    for name in embedding_modules(model, tables):
        old = model.get_submodule(name)
        if filter_fn is not None and not filter_fn(name, old):
            continue
        W = old.weight.detach()
        row_counts = counts.get(name) if isinstance(counts, Mapping) else counts
        table = encode_table(W, spec, Context(counts=row_counts, padding_idx=old.padding_idx, device=device))
        table.to(W.device)
        tied = swap(model, name, table)
        entry = table_entry(table, tied={f"{t}.weight": "tied to the table" for t in tied})
        records = getattr(model, "_embcompress_tables", None) or {}
        records[f"{name}.weight"] = entry
        model._embcompress_tables = records
        done.append(Compressed(name, spec.name, tuple(W.shape), W.numel() * 4, entry["bytes"], tied, entry["info"]))
    return done


def compress_state(tensors: dict[str, torch.Tensor], spec: Spec, names: list[str], *,
                   counts: Mapping[str, torch.Tensor] | None = None, tied: Mapping[str, list[str]] | None = None,
                   device: str = "cpu", padding: Mapping[str, int | None] | None = None,
                   encoded: Mapping[str, Table] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Compress the named tables of a state dict: each ``<module>.weight`` becomes its method's tensors under
    ``<module>.``; tied copies are dropped. A table in ``encoded`` (by name: one ``spec`` already encoded, as
    ``compress --method auto`` measured it) is written as it is. Returns the new tensors and the record entries by
    table name."""
    out = dict(tensors)
    entries = {}
    for name in names:
        W = out.pop(name)
        for alias in (tied or {}).get(name, []):
            out.pop(alias, None)
        context = Context(counts=(counts or {}).get(name), padding_idx=(padding or {}).get(name), device=device)
        table = (encoded or {}).get(name)
        if table is None:
            table = encode_table(W, spec, context)
        elif (table.num_embeddings, table.embedding_dim) != tuple(W.shape):
            raise InputError(f"{name}: the encoded table is {table.num_embeddings} x {table.embedding_dim}, the "
                             f"checkpoint's {W.shape[0]} x {W.shape[1]}")
        prefix = name.removesuffix(".weight")
        for k, v in table_tensors(table).items():
            out[f"{prefix}.{k}"] = v
        entries[name] = table_entry(table, tied={t: "tied to the table" for t in (tied or {}).get(name, [])},
                                    dtype=_dtype_name(W.dtype))
    return out, entries


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(dtype, "F32")


def is_v2_entry(entry: Mapping[str, Any]) -> bool:
    """Whether a record entry is in the registry's form (it names a structure)."""
    return "structure" in entry


def tables_of(model: nn.Module) -> dict[str, Table]:
    """The model's compressed tables by module name (each once, under its first name)."""
    out: dict[str, Table] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Table) and id(mod) not in seen:
            seen.update(id(m) for m in mod.modules())  # a table's own parts (tiers) are not tables of the model
            out[name] = mod
    return out


def train_codes_(model: nn.Module, starts: Mapping[str, torch.Tensor] | None = None,
                 counts: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Swap each compressed table of ``model`` whose method stores codes for its ``CodeTraining`` module (a float
    copy of the table, from ``starts[name]`` where given, read through its nearest codes, ``counts[name]`` the
    rows' token counts where given); the names swapped.
    A table that a tied output layer or a second name also reads is left as it is (one copy could not serve both).
    ``settle_codes_`` puts the tables back."""
    uses: dict[int, int] = {}
    for m in model.modules():
        for t in [m.tied_to] if isinstance(m, TiedLinear) else []:
            uses[id(t)] = uses.get(id(t), 0) + 1
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    names = []
    for name, table in tables_of(model).items():
        if uses.get(id(table), 0) > 1:
            continue
        module = table.code_training((starts or {}).get(name), (counts or {}).get(name))
        if module is not None:
            _set_module(model, name, module)
            names.append(name)
    return names


def settle_codes_(model: nn.Module, keep: Mapping[str, Table] | None = None) -> list[str]:
    """Each ``CodeTraining`` module of ``model`` replaced by its table, codes re-assigned (or by ``keep[name]``,
    the table it was made from, where given); the names replaced."""
    names = [name for name, m in model.named_modules() if isinstance(m, CodeTraining)]
    for name in names:
        _set_module(model, name, (keep or {}).get(name) or model.get_submodule(name).table())
    return names


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors a file holds for a model with compressed tables (each table in its stored form, tied copies
    dropped) and the record entries of those tables."""
    tables = tables_of(model)
    previous = getattr(model, "_embcompress_tables", None) or {}
    entries = {}
    state: dict[str, torch.Tensor] = {}
    owned = {}
    for name, table in tables.items():
        for alias, mod in model.named_modules(remove_duplicate=False):
            if mod is table:
                owned[alias] = name
    for key, t in model.state_dict().items():
        owner = next((o for a, o in owned.items() if key.startswith(a + ".")), None)
        if owner is not None:
            continue
        state[key] = t.detach().cpu().contiguous()
    for name, table in tables.items():
        for k, v in table_tensors(table).items():
            state[f"{name}.{k}"] = v
        old = previous.get(f"{name}.weight", {})
        tied = {f"{a}.weight": "the same module in the model" for a, o in owned.items() if o == name and a != name}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, TiedLinear) and mod.tied_to is table:
                tied[f"{mod_name}.weight"] = "output layer tied to the table"
        entries[f"{name}.weight"] = {**table_entry(table, tied=tied or old.get("tied"), dtype=old.get("dtype", "F32")),
                                     **({"history": old["history"]} if "history" in old else {})}
    return state, entries


def attach(model: nn.Module, state: dict[str, torch.Tensor], entries: Mapping[str, Mapping[str, Any]],
           where: str = "checkpoint", prefix: str = "") -> None:
    """Swap the recorded tables (registry form) into a model built with dense ``nn.Embedding`` tables, taking their
    tensors out of ``state`` (what is left loads with ``load_state_dict``)."""
    for name, entry in entries.items():
        if not is_v2_entry(entry):
            continue
        module = name.removesuffix(".weight")
        target = _align(module, model, prefix)
        if target is None:
            raise CheckpointError(f"{where}: the model has no table {module!r}")
        mine = {k[len(module) + 1:]: state.pop(k) for k in list(state) if k.startswith(module + ".")}
        table = table_from_tensors(entry, mine, where)
        swap(model, target, table)
        for alias in entry.get("tied") or {}:
            state.pop(alias, None)
        state.update({f"{target}.{k}": v for k, v in table.state_dict().items()})
    model._embcompress_tables = {n: e for n, e in entries.items() if is_v2_entry(e)}


def is_registry_model(model: nn.Module) -> bool:
    """Whether a model's tables must be saved in the registry's record: a table with a storage or of a structure
    0.1 did not know, or a model loaded from such a record."""
    if getattr(model, "_embcompress_tables", None):
        return True
    legacy = tuple(base.get(name).table for name in ("svd", "groupreduce"))
    return any(isinstance(m, Table) and (not isinstance(m, legacy) or getattr(m, "storage", None))
               for m in model.modules())


def _align(module: str, model: nn.Module, prefix: str) -> str | None:
    """The model's module name for a recorded one (a base model's names lack the head model's prefix)."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for candidate in (module, f"{prefix}.{module}" if prefix else module,
                      module.removeprefix(prefix + ".") if prefix else module):
        if candidate in names:
            return candidate
    return None


def placeholder_state(state: dict[str, torch.Tensor], entries: Mapping[str, Mapping[str, Any]],
                      where: str = "checkpoint") -> dict[str, Any]:
    """For loaders that need the dense table present (``from_pretrained``): each registry-form table's tensors
    replaced by a stand-in of its shape; returns the tables rebuilt, by name, to swap in afterwards."""
    built = {}
    for name, entry in entries.items():
        if not is_v2_entry(entry):
            continue
        module = name.removesuffix(".weight")
        mine = {k[len(module) + 1:]: state.pop(k) for k in list(state) if k.startswith(module + ".")}
        table = table_from_tensors(entry, mine, where)
        # a stand-in of the right shape that holds one row of memory: the table is swapped in afterwards
        state[name] = torch.zeros(1, table.embedding_dim).expand(table.num_embeddings, table.embedding_dim)
        built[name] = table
    return built
