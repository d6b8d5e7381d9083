"""FactorizedEmbedding and the swap that puts it into any ``nn.Module``.

``FactorizedEmbedding`` holds W_a (V x k) and W_b (k x d) and returns ``W_a[ids] @ W_b``: the paper's factorized
lookup. ``compress_embeddings`` finds the ``nn.Embedding`` modules of a model (the same name and shape rules as
``tables.find_embeddings``), replaces each by its factorized version with ``setattr`` on the parent (as peft swaps
its adapters), and keeps an output layer that shared the table tied to the new factors.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TableError
from .groupreduce import group_reduce
from .methods.base import Table, TiedLinear
from .methods.groupreduce import GroupedFactorizedEmbedding
from .methods.svd import FactorizedEmbedding
from .rank import choose_rank
from .svd import factorize_matrix


FACTORIZED = (FactorizedEmbedding, GroupedFactorizedEmbedding)


TiedFactorizedLinear = TiedLinear  # the output layer tied to any table (the name 0.1 used)


@dataclass(frozen=True)
class SwapReport:
    """What ``compress_embeddings`` did to one module."""

    name: str
    num_embeddings: int
    embedding_dim: int
    rank: int
    rel_error: float | None
    tied: tuple[str, ...]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _select_embeddings(model: nn.Module, tables: list[str] | None) -> list[tuple[str, nn.Embedding]]:
    from .tables import is_embedding_candidate

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if tables:
        for pattern in tables:
            if not any(_matches(n, [pattern]) or _matches(f"{n}.weight", [pattern]) for n, _ in found):
                names = ", ".join(n for n, _ in found) or "none"
                raise TableError(f"--tables {pattern!r} matches no nn.Embedding module (modules: {names})")
        return [(n, m) for n, m in found if _matches(n, tables) or _matches(f"{n}.weight", tables)]
    chosen = [(n, m) for n, m in found if is_embedding_candidate(f"{n}.weight", tuple(m.weight.shape))[0]]
    if not chosen:
        raise TableError("no embedding table found in the model; name one with tables=[...]")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compress_embeddings(
    model: nn.Module,
    *,
    reduction: float | None = None,
    rank: int | None = None,
    tables: list[str] | None = None,
    method: str = "exact",
    weights: torch.Tensor | None = None,
    blocks: int = 8,
    force: bool = False,
) -> list[SwapReport]:
    """Replace the model's embedding tables by factorized ones in place; return what was swapped.

    Give exactly one of ``reduction`` (the fraction of each table's parameters to remove; eq. 5 picks k) or
    ``rank``. ``tables`` lists module names or globs; by default the tables ``find_embeddings`` would choose.
    ``method`` is ``exact`` or ``randomized`` (truncated SVD), or ``groupreduce`` with per-row ``weights`` (token
    counts, > 0) and ``blocks``: a ``GroupedFactorizedEmbedding`` in the budget of rank k.
    Output layers whose weight *is* a swapped table become ``TiedFactorizedLinear``, so the tie survives.
    """
    if (method == "groupreduce") != (weights is not None):
        raise TableError("method='groupreduce' needs row weights (token counts), and weights need groupreduce")
    reports = []
    for name, emb in _select_embeddings(model, tables):
        V, d = emb.weight.shape
        k = choose_rank(V, d, reduction=reduction, rank=rank, force=force, table=name)
        new: FactorizedEmbedding | GroupedFactorizedEmbedding
        if weights is not None:
            g = group_reduce(emb.weight.detach(), weights, budget=k * (V + d), blocks=blocks)
            new = GroupedFactorizedEmbedding.from_factors(g.a, g.b, g.groups, emb.padding_idx)
            new.rel_error, k = g.rel_error, sum(g.ranks)
        else:
            new = FactorizedEmbedding.from_embedding(emb, k, method=method)
        tied = []
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
                tied.append(lin_name)
        _set_submodule(model, name, new)
        reports.append(SwapReport(name, V, d, k, new.rel_error, tuple(tied)))
    return reports


# a factorized table's shape: its rank k, or per block (rows n_c, rank k_c) for GroupReduce
FactorSpec = int | list[tuple[int, int]]
_BLOCK_FACTOR = re.compile(r"^(?P<module>.+)\.weight_a\.(?P<block>\d+)$")


def factor_specs(shapes: dict[str, tuple[int, ...]]) -> dict[str, FactorSpec]:
    """Module name -> ``FactorSpec`` read off a state dict's tensor shapes: ``<m>.weight_a`` (V x k) gives k,
    ``<m>.weight_a.<c>`` (n_c x k_c) the per-block list."""
    specs: dict[str, FactorSpec] = {}
    blocks: dict[str, dict[int, tuple[int, int]]] = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if name.endswith(".weight_a"):
            specs[name.removesuffix(".weight_a")] = int(shape[1])
        elif m := _BLOCK_FACTOR.match(name):
            blocks.setdefault(m["module"], {})[int(m["block"])] = (int(shape[0]), int(shape[1]))
    for module, found in blocks.items():
        if sorted(found) != list(range(len(found))):
            raise TableError(f"{module}: block factors {sorted(found)} are not numbered 0..{len(found) - 1}")
        specs[module] = [found[c] for c in range(len(found))]
    return specs


def factorized_shapes(model: nn.Module, ranks: dict[str, FactorSpec]) -> None:
    """Swap the named ``nn.Embedding`` modules for empty factorized ones of the given shapes (no SVD).

    A rank gives a ``FactorizedEmbedding``, a per-block list a ``GroupedFactorizedEmbedding`` (its groups map
    arrives with the state dict). Used before ``load_state_dict`` of a factorized checkpoint: the shapes must match
    before the weights load. Tied output layers are re-tied as in ``compress_embeddings``.
    """
    for name, spec in ranks.items():
        emb = model.get_submodule(name)
        if not isinstance(emb, nn.Embedding):
            raise TableError(f"{name!r} is not an nn.Embedding in this model")
        V, d = emb.weight.shape
        where = {"device": emb.weight.device, "dtype": emb.weight.dtype}
        new: nn.Module
        if isinstance(spec, int):
            new = FactorizedEmbedding(V, d, spec, emb.padding_idx, **where)
        else:
            sizes = [n for n, _ in spec]
            if sum(sizes) != V:
                raise TableError(f"{name}: the blocks hold {sum(sizes)} rows, the table {V}")
            new = GroupedFactorizedEmbedding([k for _, k in spec], sizes, d, emb.padding_idx, **where)
        for lin_name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and lin.weight is emb.weight:
                _set_submodule(model, lin_name, TiedFactorizedLinear(new, lin.bias))
        _set_submodule(model, name, new)
