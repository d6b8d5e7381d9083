"""Choosing the rank k of a factorized table.

The paper's eq. 5: keeping a fraction p = 1 - R of a V x d table's parameters gives k = floor(p * V * d / (V + d)).
A rank at or above the break-even V * d / (V + d) stores at least as many numbers as the dense table.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError


def break_even_rank(V: int, d: int) -> float:
    """The rank at which the factors V*k + k*d hold as many numbers as the table V*d."""
    return V * d / (V + d)


def rank_for_reduction(V: int, d: int, reduction: float) -> int:
    """k = floor((1 - R) * V * d / (V + d)) (eq. 5), for 0 < R < 1."""
    if not 0.0 < reduction < 1.0:
        raise InputError(f"--reduction must be strictly between 0 and 1 (a fraction: 0.9 removes 90 %), got {reduction}")
    # round before floor so that 0.1 * x = 37.99999999 lands on 38 when the exact value is 38
    return math.floor(round((1.0 - reduction) * break_even_rank(V, d), 9))


def achieved_reduction(V: int, d: int, k: int) -> float:
    """The fraction of the table's parameters removed by rank k: 1 - k (V + d) / (V d)."""
    return 1.0 - k * (V + d) / (V * d)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values keep at least ``energy`` of sum(s_i^2)."""
    if not 0.0 < energy <= 1.0:
        raise InputError(f"--energy must be in (0, 1] (a fraction of sum s_i^2), got {energy}")
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    k = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1
    return min(k, len(s2))


def check_rank(V: int, d: int, k: int, *, force: bool = False, table: str = "table") -> int:
    """Refuse k < 1, k > min(V, d), and (unless ``force``) a k that saves nothing."""
    if k < 1:
        raise InputError(f"{table}: rank k = {k} is below 1; ask for a smaller reduction or a larger rank")
    if k > min(V, d):
        raise InputError(f"{table}: rank k = {k} exceeds min(V, d) = {min(V, d)} for a {V} x {d} table")
    if k >= break_even_rank(V, d) and not force:
        raise InputError(
            f"{table}: rank k = {k} is at or above break-even V*d/(V+d) = {break_even_rank(V, d):.1f} for a "
            f"{V} x {d} table, so the factors would not be smaller; use --force to factorize anyway"
        )
    return k


def choose_rank(
    V: int,
    d: int,
    *,
    reduction: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    singular_values: torch.Tensor | None = None,
    force: bool = False,
    table: str = "table",
) -> int:
    """The rank for one table from exactly one of ``reduction``, ``rank`` or ``energy`` (the last needs the spectrum)."""
    given = [x is not None for x in (reduction, rank, energy)]
    if sum(given) != 1:
        raise InputError("give exactly one of --reduction, --rank or --energy")
    if reduction is not None:
        k = rank_for_reduction(V, d, reduction)
        if k < 1:
            raise InputError(
                f"{table}: --reduction {reduction} leaves k = floor({1 - reduction:.4g} * {V}*{d}/({V}+{d})) = {k}, "
                "below 1; ask for a smaller reduction"
            )
    elif rank is not None:
        k = rank
    else:
        if singular_values is None:
            raise InputError("--energy needs the table's singular values")
        k = rank_for_energy(singular_values, energy)
    return check_rank(V, d, k, force=force, table=table)
