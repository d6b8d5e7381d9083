"""The record in the files embcompress writes: its metadata key's names, the history of operations, and the
version-1 fields a factorized table's format-2 entry keeps.

Kept apart from the modules that write it so that readers (``hf``, ``classifier``) and writers (``factorize``,
``quant``, ``ops``) import the same names and rules without importing each other.

One record (``checkpoint.META_KEY``, format 2) holds: ``tables`` (per table its structure, config, storage, tensors'
shapes, bytes, measured figures and ties; a factorized table also the fields 0.1 wrote: ``rank``, ``rank_rule``,
``reduction_requested``, ``reduction_achieved``, ``method``, ``rel_error``, ``energy_kept``, ``factors``, ``tied``,
``weighting``, ``blocks``), ``tensors`` (per quantized tensor its storage, scheme, scale and errors, written by
``quantize``), ``quantized`` (its bits and bytes) and ``history`` (each operation that wrote the model: ``op``,
``tool``, ``options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import core
from ._version import __version__
from .methods.base import Table
from .methods.weighted import DEFAULT_SMOOTHING
from .rank import achieved_reduction
from .svd import METHODS as SVD_METHODS

METHODS: tuple[str, ...] = (*SVD_METHODS, "weighted", "groupreduce")  # factorize --method (the paper's verb)
COUNTED_METHODS = ("weighted", "groupreduce")
FACTORIZED_STRUCTURES = ("svd", "weighted", "groupreduce")  # the structures 0.1 wrote, whose entries keep its fields
WRITTEN_BY_EACH = ("tables", "tool", "format_version", "tensors", "quantized", "file")  # set anew by every writer
_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def tool() -> str:
    """The tool and its version, as every record names it."""
    return f"embcompress {__version__}"


def factor_names(name: str) -> tuple[str, str]:
    """The tensor names of a table's factors: ``<name>_a`` (V x k) and ``<name>_b`` (k x d)."""
    return f"{name}_a", f"{name}_b"


def groups_name(name: str) -> str:
    """The tensor name of a GroupReduce table's row -> block map: ``<name>_groups`` (V, uint8)."""
    return f"{name}_groups"


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
        return list(value)
    return str(value)


def history(previous: Mapping[str, Any] | None, op: str, options: Mapping[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    """The previous record's history with one more operation: ``{"op", "tool", "options"}`` (JSON values only)."""
    past = list((previous or {}).get("history") or [])
    return [*past, {"op": op, "tool": tool(), "options": {str(k): _json_value(v) for k, v in (options or {}).items()}}]


def carried(previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a writer keeps of the previous record: everything but the parts it writes anew (tables, per-tensor
    storage, tool and version, file figures)."""
    return {k: v for k, v in (previous or {}).items() if k not in WRITTEN_BY_EACH}


def file_record(previous: Mapping[str, Any] | None, tables: Mapping[str, Any], *, op: str | None = None,
                options: Mapping[str, Any] | None = None, **parts: Any) -> dict[str, Any]:
    """The format-2 record of a file: the previous one's carried parts, these tables, the tool, the history (one
    operation more when ``op`` is given) and any other ``parts`` (``tensors``, ``quantized``, ``file`` ...)."""
    out = {**carried(previous), "format_version": core.RECORD_VERSION, "tool": tool(), "tables": dict(tables)}
    if op is not None:
        out["history"] = history(previous, op, options)
    out.update(parts)
    return out


def legacy_fields(name: str, entry: Mapping[str, Any], tensor_names: list[str], old: Mapping[str, Any] | None = None,
                  **given: Any) -> dict[str, Any]:
    """A factorized table's format-2 entry with the fields 0.1 wrote (``rank``, ``method``, ``factors`` ...), so
    that its readers and ``inspect`` keep working; other entries come back unchanged.

    ``tensor_names`` are the table's tensors (relative to its module, as ``core.table_tensors`` names them); ``old``
    is the table's previous entry (its rule, its weighting, the SVD's error before training); ``given`` sets fields
    the caller measured (``rank_rule``, ``reduction_requested``, ``energy_kept``, ``weighting``, ``tied``).
    """
    structure = entry.get("structure")
    if structure not in FACTORIZED_STRUCTURES or entry.get("storage"):
        return dict(entry)
    old = dict(old or {})
    V, d = (int(x) for x in entry["shape"])
    config = dict(entry.get("config") or {})
    info = {**(old.get("info") or {}), **{k: v for k, v in (entry.get("info") or {}).items() if v is not None}}
    module = name.removesuffix(".weight")
    factors = [f"{module}.{n}" for n in tensor_names if n.startswith(("weight_a", "weight_b"))]
    factors = [f for f in factors if ".weight_a" in f] + [f for f in factors if ".weight_b" in f]
    method = old.get("method") or (config.get("algorithm", "exact") if structure == "svd" else structure)
    if structure == "svd" and method == "weighted":  # a weighted factorization loaded by 0.1's reader
        structure = "weighted"
        weighting = old.get("weighting") or {}
        config.update(smoothing=weighting.get("smoothing", DEFAULT_SMOOTHING), power=weighting.get("power", 1.0))
    elif structure == "svd" and method in SVD_METHODS:
        config["algorithm"] = method
    blocks = None
    if structure == "groupreduce":
        ranks = [int(k) for k in info.get("ranks") or []]
        rank = sum(ranks)
        achieved = 1.0 - int(entry["bytes"]) / (V * d * _ITEM.get(str(entry.get("dtype")), 4))
        blocks = {**(old.get("blocks") or {}), "ranks": ranks, "sizes": [int(n) for n in info.get("sizes") or []],
                  "groups": f"{module}.weight_groups",
                  **{k: info[k] for k in ("budget_rank", "weighted_rel_error", "rounds") if k in info}}
    else:
        rank = int(config.get("rank") or info.get("rank"))
        achieved = achieved_reduction(V, d, rank)
    rel_error = info.get("rel_error", old.get("rel_error"))
    energy = old.get("energy_kept") if old.get("rank") == rank and "energy_kept" in old else None
    if energy is None and rel_error is not None:
        energy = max(0.0, 1.0 - float(rel_error) ** 2)
    out = {
        **old,
        **entry,
        "structure": structure,
        "config": config,
        "info": info,
        "rank": rank,
        "rank_rule": old.get("rank_rule", "rank"),
        "reduction_requested": old.get("reduction_requested"),
        "reduction_achieved": achieved,
        "method": method,
        "rel_error": rel_error,
        "energy_kept": energy,
        "factors": factors,
        "tied": {**(old.get("tied") or {}), **(entry.get("tied") or {})},
        **({"blocks": blocks} if blocks else {}),
        **{k: v for k, v in given.items() if v is not None},
    }
    return out


def _same_table(new: str, old: str) -> bool:
    return new == old or new.endswith("." + old) or old.endswith("." + new)


def model_entries(model: nn.Module, previous: Mapping[str, Mapping[str, Any]] | None = None, *,
                  trained: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors a file holds for a model with compressed tables and their format-2 entries (``core.model_state``),
    factorized tables with the fields 0.1 wrote; ``previous`` entries (a head model's names may carry a prefix the
    base model's lack) give each table its rule, weighting and the SVD's error; ``trained`` marks those figures as
    describing the table before training."""
    state, entries = core.model_state(model)
    tables = core.tables_of(model)
    prev = dict(previous or {})
    out = {}
    for name, entry in entries.items():
        old = next((dict(v) for k, v in prev.items() if _same_table(name, k)), {})
        table: Table = tables[name.removesuffix(".weight")]
        names = list(core.table_tensors(table))
        full = legacy_fields(name, entry, names, {k: v for k, v in old.items() if k != "shape"},
                             dtype=old.get("dtype"))
        if "factors" in full and (trained or old.get("trained")):
            full["trained"] = True  # rel_error and energy_kept describe the factorization, before training
        out[name] = full
    return state, out
