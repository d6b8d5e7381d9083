"""Factorizing the embedding tables of a checkpoint, and loading a factorized checkpoint back into a model.

Each chosen table W (V x d) becomes ``<name>_a`` = U_k (V x k) and ``<name>_b`` = S_k V_k^T (k x d), the paper's
eqs. 2-4 (GroupReduce: ``<name>_a.<c>``, ``<name>_b.<c>`` and ``<name>_groups``); everything else passes through
unchanged. Each table is encoded by the registry's method (``svd``, ``weighted``, ``groupreduce``) through
:func:`embcompress.core.compress_state`, and its entry in the record (format 2, :mod:`embcompress.record`) keeps the
fields 0.1 wrote (rank, rule, reduction, method, errors, factors, weighting, blocks). Tied copies of a table are
dropped from the file and recorded, so the tie survives a reload. The output is the same kind as the input.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import core, record
from .checkpoint import (
    META_KEY,
    Checkpoint,
    check_finite,
    check_output,
    default_output,
    load_checkpoint,
    save_checkpoint,
)
from .device import resolve_device
from .errors import CheckpointError, InputError
from .groupreduce import DEFAULT_BLOCKS, DEFAULT_ROUNDS, MAX_BLOCKS
from .modules import TiedFactorizedLinear, factor_specs, factorized_shapes
from .ops.compress import option_tag
from .quant import dequantized_state_dict, quant_meta
from .rank import choose_rank
from .record import COUNTED_METHODS, METHODS
from .svd import METHODS as SVD_METHODS
from .svd import spectrum
from .tables import find_embeddings
from .weighting import DEFAULT_SMOOTHING, Counts

# exact and randomized are plain truncated SVDs; weighted is the frequency-weighted one and groupreduce the
# block-wise one (both need token counts)


@dataclass
class TableResult:
    """What happened to one table."""

    name: str
    shape: tuple[int, int]
    dtype: str
    rank: int
    rank_rule: str
    reduction_requested: float | None
    reduction_achieved: float
    rel_error: float
    energy_kept: float
    method: str
    factors: tuple[str, ...]
    tied: dict[str, str]
    bytes_before: int
    bytes_after: int
    seconds: float
    weighting: dict[str, Any] | None = None
    blocks: dict[str, Any] | None = None  # groupreduce: ranks, sizes, groups tensor, weighted error per round


@dataclass
class FactorizeResult:
    """The whole run: per-table results and the file-level totals."""

    input: str
    output: str
    kind: str
    tables: list[TableResult]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    file_bytes_before: int
    file_bytes_after: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reduction_achieved(self) -> float:
        """Fraction of all the file's parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reduction_achieved"] = self.reduction_achieved
        return d


def output_tag(reduction: float | None, rank: int | None, energy: float | None, method: str = "exact",
               options: dict[str, Any] | None = None) -> str:
    """The suffix of a default output name: r90 for --reduction 0.9, k37 for --rank 37, e95 for --energy 0.95 with
    the plain (exact) SVD; any other method leads (``groupreduce-r90``, ``randomized-k37``) and its options that
    differ from their defaults follow (``groupreduce-r90-blocks4``), so no two methods or settings share a name."""
    sizing = {"reduction": reduction, "rank": rank, "energy": energy}
    defaults = {"smoothing": DEFAULT_SMOOTHING, "power": 1.0, "blocks": DEFAULT_BLOCKS, "rounds": DEFAULT_ROUNDS}
    tag = option_tag({**sizing, **(options or {})}, defaults).removeprefix("-")
    return tag if method == "exact" else f"{method}-{tag}"


def factorize(
    path: str | os.PathLike[str],
    *,
    reduction: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    tables: list[str] | None = None,
    method: str = "exact",
    counts: Counts | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    weight_power: float = 1.0,
    blocks: int = DEFAULT_BLOCKS,
    rounds: int = DEFAULT_ROUNDS,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FactorizeResult:
    """Factorize a checkpoint's embedding tables and write the result; return what was done.

    Give exactly one of ``reduction`` (R in (0, 1); k by eq. 5), ``rank`` (k) or ``energy`` (the smallest k keeping
    that fraction of sum s_i^2). ``output`` defaults to ``model.r90.safetensors`` (or ``<folder>-r90``) beside the
    input, led by the method when it is not ``exact`` (``model.groupreduce-r90.safetensors``; :func:`output_tag`).
    ``force`` replaces an existing output and allows a rank at or above break-even. ``device`` runs the SVD
    there (``auto``: CUDA where present); the factors are written from the CPU. ``method="weighted"`` needs
    ``counts`` (``embcompress.weighting``): each row is weighted by (count + ``smoothing``) ** ``weight_power``.
    ``method="groupreduce"`` (``embcompress.groupreduce``) uses the same weights and spends the parameters of
    rank k on ``blocks`` blocks, refined for up to ``rounds`` rounds.
    """
    start = time.perf_counter()
    if sum(x is not None for x in (reduction, rank, energy)) != 1:
        raise InputError("give exactly one of --reduction, --rank or --energy")
    if reduction is not None and not 0.0 < reduction < 1.0:
        raise InputError(f"--reduction must be strictly between 0 and 1 (0.9 removes 90 %), got {reduction}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InputError(f"--energy must be in (0, 1], got {energy}")
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if (method in COUNTED_METHODS) != (counts is not None):
        raise InputError(f"--method {method if method in COUNTED_METHODS else 'weighted'} needs token counts "
                         "(--counts FILE or --corpus TEXTS), and counts need --method weighted or groupreduce")
    if method == "groupreduce" and not 1 <= blocks <= MAX_BLOCKS:
        raise InputError(f"--blocks must be between 1 and {MAX_BLOCKS}, got {blocks}")
    if rounds < 0:
        raise InputError(f"--rounds must be 0 or more, got {rounds}")
    if counts is not None:
        counts.weights(smoothing, weight_power)  # refuses bad --smoothing / --weight-power before any output
    weighting = {**counts.to_dict(), "smoothing": smoothing, "power": weight_power} if counts is not None else None
    src = Path(path)
    dev = resolve_device(device)
    with load_checkpoint(src) as ckpt:
        quantized = quant_meta(ckpt)  # --- quantized input (embcompress quantize) is refused
        if quantized is not None:
            raise InputError(f"{src}: the checkpoint is quantized ({quantized.get('bits')}-bit); factorize before "
                             "quantizing (factorize the float model, then quantize the result)")
        grouping = {"blocks": blocks, "rounds": rounds} if method == "groupreduce" else None
        weighting_options = {"smoothing": smoothing, "power": weight_power} if counts is not None else {}
        options = {**weighting_options, **(grouping or {})}
        out = Path(output) if output is not None else default_output(
            src, output_tag(reduction, rank, energy, method, options))
        check_output(out, [src], force=force)
        found = find_embeddings(ckpt, tables)
        tensors, results, entries = _factorize_tables(ckpt, found, reduction, rank, energy, method, force, dev,
                                                       progress, counts, weighting, options)
        meta = _metadata(ckpt, entries, tensors, {"reduction": reduction, "rank": rank, "energy": energy,
                                                  "method": method, "tables": tables, **options})
        if progress:
            progress(f"writing {out}")
        save_checkpoint(tensors, out, like=ckpt, metadata={META_KEY: json.dumps(meta)})
        file_after = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*.safetensors")))
        return FactorizeResult(
            input=str(src),
            output=str(out),
            kind=ckpt.kind,
            tables=results,
            params_before=ckpt.total_params,
            params_after=sum(t.numel() for t in tensors.values()),
            bytes_before=ckpt.total_bytes,
            bytes_after=sum(t.numel() * t.element_size() for t in tensors.values()),
            file_bytes_before=ckpt.file_bytes,
            file_bytes_after=file_after,
            seconds=time.perf_counter() - start,
        )


def _factorize_tables(
    ckpt: Checkpoint,
    found: list,
    reduction: float | None,
    rank: int | None,
    energy: float | None,
    method: str,
    force: bool,
    device: torch.device,
    progress: Callable[[str], None] | None,
    counts: Counts | None = None,
    weighting: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[TableResult], dict[str, dict[str, Any]]]:
    """Encode each table with the registry's method (``core.compress_state``): the rank chosen as 0.1 chose it,
    the record entry in format 2 with 0.1's fields."""
    structure = "svd" if method in SVD_METHODS else method
    row_counts = torch.from_numpy(counts.counts).to(torch.float64) if counts is not None else None
    tensors = {name: ckpt.tensor(name) for name in ckpt.names}
    results, entries = [], {}
    rule = "reduction" if reduction is not None else "rank" if rank is not None else "energy"
    for table in found:
        t0 = time.perf_counter()
        if progress:
            progress(f"factorizing {table.name} ({table.rows} x {table.cols})")
        W = tensors[table.name]
        check_finite(table.name, W)
        V, d = table.shape
        spec = spectrum(W.to(device)) if energy is not None else None
        k = choose_rank(V, d, reduction=reduction, rank=rank, energy=energy,
                        singular_values=spec.singular_values if spec is not None else None, force=force,
                        table=table.name)
        if row_counts is not None and row_counts.numel() != V:
            raise InputError(f"{table.name}: {row_counts.numel()} token counts for a table of {V} rows; the counts "
                             "must come from this model's vocabulary")
        config = {"rank": k, "force": force, **({"algorithm": method} if structure == "svd" else {}),
                  **(options or {})}
        before = set(tensors)
        tensors, new = core.compress_state(tensors, core.make_spec(structure, config), [table.name],
                                           counts={table.name: row_counts} if row_counts is not None else None,
                                           tied={table.name: list(table.tied)}, device=str(device))
        prefix = table.name.removesuffix(".weight") + "."
        names = [n[len(prefix):] for n in tensors if n not in before and n.startswith(prefix)]
        entry = record.legacy_fields(
            table.name, new[table.name], names, rank_rule=rule, reduction_requested=reduction,
            energy_kept=spec.energy_kept(k) if spec is not None and counts is None else None,
            tied=dict(table.tie_reasons), weighting=weighting, dtype=table.dtype)
        entry["history"] = [{"op": "factorize", "method": method, "tool": record.tool(), "rank_rule": rule,
                             "reduction_requested": reduction}]
        entries[table.name] = entry
        item = W.element_size()
        del W
        results.append(
            TableResult(
                name=table.name,
                shape=table.shape,
                dtype=table.dtype,
                rank=entry["rank"],
                rank_rule=rule,
                reduction_requested=reduction,
                reduction_achieved=entry["reduction_achieved"],
                rel_error=entry["rel_error"],
                energy_kept=entry["energy_kept"],
                method=method,
                factors=tuple(entry["factors"]),
                tied=dict(table.tie_reasons),
                bytes_before=V * d * item,
                bytes_after=entry["bytes"],
                seconds=time.perf_counter() - t0,
                weighting=weighting,
                blocks=entry.get("blocks"),
            )
        )
    return tensors, results, entries


def _metadata(ckpt: Checkpoint, entries: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor],
              options: dict[str, Any]) -> dict[str, Any]:
    """The file's record (format 2): the previous one's tables and history, these tables, one more operation."""
    previous = ckpt.embcompress_meta or {}
    params_before = ckpt.total_params
    params_after = sum(t.numel() for t in tensors.values())
    return record.file_record(
        previous, {**(previous.get("tables") or {}), **entries}, op="factorize", options=options,
        file={"params_before": params_before, "params_after": params_after,
              "reduction_achieved": 1.0 - params_after / params_before if params_before else 0.0})


def _module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def load_factorized(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Load a factorized checkpoint into a model built with dense ``nn.Embedding`` tables.

    The recorded tables are swapped for ``FactorizedEmbedding`` of the recorded ranks, recorded ties become
    ``TiedFactorizedLinear``, then the weights load. Returns the model.
    """
    with load_checkpoint(path) as ckpt:
        meta = ckpt.embcompress_meta
        if not meta or not meta.get("tables"):
            raise CheckpointError(f"{path}: not a factorized checkpoint (no '{META_KEY}' tables in its metadata)")
        specs = factor_specs({n: tuple(i.shape) for n, i in ckpt.infos.items()})
        ranks = {_module_name(name): specs.get(_module_name(name), int(entry["rank"]))
                 for name, entry in meta["tables"].items()}
        try:
            factorized_shapes(model, ranks)
        except AttributeError as e:
            raise CheckpointError(f"{path}: the model has no module for a recorded table ({e})") from None
        for name, entry in meta["tables"].items():
            emb = model.get_submodule(_module_name(name))
            for tied in entry.get("tied") or {}:
                mod_name = _module_name(tied)
                try:
                    lin = model.get_submodule(mod_name)
                except AttributeError:
                    continue
                if isinstance(lin, nn.Linear):
                    parent, _, child = mod_name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, TiedFactorizedLinear(emb, lin.bias))
        state = dequantized_state_dict(ckpt)  # a factorized file quantized afterwards loads as float
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: does not fit the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model
