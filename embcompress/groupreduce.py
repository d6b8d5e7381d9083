"""GroupReduce (Chen et al., NeurIPS 2018): block-wise frequency-weighted low rank with frequent words given more rank.

The vocabulary is split into C blocks; block c holds n_c rows W_c and is stored as a_c (n_c x k_c) times
b_c (k_c x d). The objective is the frequency-weighted error sum_i f_i ||w_i - w^_i||^2, as in the weighted SVD.

1. **Blocks**: rows sorted by weight (most frequent first) and cut into C blocks of (nearly) equal size.
2. **Ranks**: for a block's subspace, the weighted error is the tail of the eigenvalues of G_c = W_c^T F_c W_c.
   One more rank in block c removes its next eigenvalue and costs n_c + d parameters, so ranks are handed out
   greedily by eigenvalue per parameter (the optimal rule for these concave gains) until the budget is spent.
   Blocks of frequent words have large weighted eigenvalues and receive more rank.
3. **Factors**: b_c = the top-k_c eigenvectors of G_c (orthonormal rows), a_c = W_c b_c^T: each row is projected
   onto its block's subspace, which is optimal for any row weight once the subspace is fixed.
4. **Refinement** (``rounds``): every row is moved to the block whose subspace reconstructs it best, keeping each
   block's size (so the parameter budget is unchanged): rows are placed in order of how much they would lose by
   their second choice, weighted by frequency. Blocks, ranks and factors are then re-solved. A round is kept only
   if it lowers the weighted error, so refinement never makes the result worse.

The token -> block map is stored as one small integer per row (``groups``); its bytes are taken out of the
parameter budget, so a GroupReduce file is no larger than the plain SVD's at the same budget.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError

DEFAULT_BLOCKS = 8
DEFAULT_ROUNDS = 3
MAX_BLOCKS = 255  # the block of each row is stored as one uint8


@dataclass
class GroupedFactors:
    """The result of ``group_reduce``: per-block factors and the row -> block map."""

    a: list[torch.Tensor]  # block c: n_c x k_c, rows in increasing token id order
    b: list[torch.Tensor]  # block c: k_c x d, orthonormal rows
    groups: torch.Tensor  # V, uint8: the block of each row
    ranks: list[int]
    weighted_rel_error: float  # sqrt(sum f_i ||w_i - w^_i||^2 / sum f_i ||w_i||^2)
    rel_error: float  # the plain ||W - W^||_F / ||W||_F
    history: list[float] = field(default_factory=list)  # weighted_rel_error after the start and each kept round

    @property
    def params(self) -> int:
        """Float parameters of the factors (the groups map is not included)."""
        return sum(a.numel() + b.numel() for a, b in zip(self.a, self.b))


def groups_bytes(rows: int) -> int:
    """Bytes of the stored row -> block map."""
    return rows  # one uint8 per row


def _eig_desc(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, vec = np.linalg.eigh(G)
    return np.clip(lam[::-1], 0.0, None), vec[:, ::-1]


def _allocate(spectra: list[np.ndarray], sizes: list[int], d: int, budget: int) -> list[int]:
    """Ranks (each >= 1) maximising the removed weighted error within ``budget`` parameters, greedily."""
    ranks = [1] * len(sizes)
    spent = sum(n + d for n in sizes)
    if spent > budget:
        raise InputError(f"a budget of {budget} parameters cannot give each of {len(sizes)} blocks rank 1 "
                         f"({spent} parameters); use fewer --blocks or a smaller reduction")
    heap = [(-lam[1] / (n + d), c) for c, (lam, n) in enumerate(zip(spectra, sizes)) if len(lam) > 1 and n > 1]
    heapq.heapify(heap)
    while heap:
        _, c = heapq.heappop(heap)
        cost = sizes[c] + d
        if spent + cost > budget:
            continue  # this block's next rank does not fit; a cheaper block's may
        ranks[c] += 1
        spent += cost
        k = ranks[c]
        if k < min(len(spectra[c]), sizes[c]):
            heapq.heappush(heap, (-spectra[c][k] / cost, c))
    return ranks


class _Solver:
    """Blocks -> (spectra, bases, weighted error) for one table and its row weights, in float64."""

    def __init__(self, W: torch.Tensor, weights: torch.Tensor) -> None:
        self.W = W.detach().to(torch.float64).cpu().numpy()
        self.f = weights.detach().to(torch.float64).cpu().numpy()
        self.sq = np.einsum("ij,ij->i", self.W, self.W)
        self.total = float(self.f @ self.sq)

    def spectra(self, groups: np.ndarray, blocks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        lams, vecs = [], []
        for c in range(blocks):
            rows = self.W[groups == c]
            G = (rows * self.f[groups == c, None]).T @ rows
            lam, vec = _eig_desc(G)
            lams.append(lam)
            vecs.append(vec)
        return lams, vecs

    def solve(self, groups: np.ndarray, blocks: int, budget: int) -> tuple[list[int], list[np.ndarray], float]:
        sizes = np.bincount(groups, minlength=blocks).tolist()
        lams, vecs = self.spectra(groups, blocks)
        ranks = _allocate(lams, sizes, self.W.shape[1], budget)
        err = sum(float(lam[k:].sum()) for lam, k in zip(lams, ranks))
        return ranks, [vec[:, :k] for vec, k in zip(vecs, ranks)], err

    def reassign(self, groups: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
        """Each row to the block reconstructing it best, block sizes kept (greedy by frequency-weighted regret)."""
        blocks = len(bases)
        resid = np.stack([self.sq - np.einsum("ij,ij->i", P, P) for P in (self.W @ Q for Q in bases)], axis=1)
        resid *= self.f[:, None]
        capacity = np.bincount(groups, minlength=blocks)
        prefs = np.argsort(resid, axis=1, kind="stable")
        ordered = np.sort(resid, axis=1)
        regret = ordered[:, 1] - ordered[:, 0] if blocks > 1 else np.zeros(len(groups))
        out = np.empty_like(groups)
        for i in np.argsort(-regret, kind="stable"):
            for c in prefs[i]:
                if capacity[c]:
                    capacity[c] -= 1
                    out[i] = c
                    break
        return out


def group_reduce(
    W: torch.Tensor,
    weights: torch.Tensor,
    *,
    budget: int,
    blocks: int = DEFAULT_BLOCKS,
    rounds: int = DEFAULT_ROUNDS,
) -> GroupedFactors:
    """GroupReduce factors of ``W`` (V x d) with row weights ``weights`` (V, > 0) in at most ``budget`` parameters.

    ``budget`` counts the factors' numbers plus the groups map (``groups_bytes`` in units of W's element size), so
    passing the plain SVD's k * (V + d) compares the two at equal file size.
    """
    if W.ndim != 2 or not W.is_floating_point():
        raise InputError(f"expected a 2-D floating-point table, got shape {tuple(W.shape)} of {W.dtype}")
    V, d = W.shape
    if not 1 <= blocks <= min(MAX_BLOCKS, V):
        raise InputError(f"--blocks must be between 1 and {min(MAX_BLOCKS, V)}, got {blocks}")
    if rounds < 0:
        raise InputError(f"--rounds must be 0 or more, got {rounds}")
    w = torch.as_tensor(weights).flatten()
    if w.numel() != V:
        raise InputError(f"{w.numel()} row weights for a table of {V} rows")
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise InputError("row weights must be finite and positive (add smoothing to zero counts)")
    budget -= math.ceil(groups_bytes(V) / W.element_size())
    solver = _Solver(W, w)
    order = np.argsort(-solver.f, kind="stable")
    groups = np.empty(V, dtype=np.int64)
    for c, chunk in enumerate(np.array_split(order, blocks)):
        groups[chunk] = c
    ranks, bases, err = solver.solve(groups, blocks, budget)
    total = solver.total or 1.0
    history = [math.sqrt(err / total)]
    for _ in range(rounds):
        moved = solver.reassign(groups, bases)
        if np.array_equal(moved, groups):
            break
        new_ranks, new_bases, new_err = solver.solve(moved, blocks, budget)
        if new_err >= err:
            break
        groups, ranks, bases, err = moved, new_ranks, new_bases, new_err
        history.append(math.sqrt(err / total))
    a_list, b_list = [], []
    plain_err = 0.0
    for c, Q in enumerate(bases):
        rows = solver.W[groups == c]
        coef = rows @ Q
        plain_err += float(((rows - coef @ Q.T) ** 2).sum())
        a_list.append(torch.from_numpy(coef).to(W.dtype))
        b_list.append(torch.from_numpy(np.ascontiguousarray(Q.T)).to(W.dtype))
    plain_total = float(solver.sq.sum())
    return GroupedFactors(
        a=a_list,
        b=b_list,
        groups=torch.from_numpy(groups.astype(np.uint8)),
        ranks=ranks,
        weighted_rel_error=history[-1],
        rel_error=math.sqrt(plain_err / plain_total) if plain_total > 0 else 0.0,
        history=history,
    )
