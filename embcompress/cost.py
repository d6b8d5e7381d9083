"""The cost model of a V x d embedding table: parameters, bytes and multiply-adds of four layouts.

After section 4 of Acharya et al. (AAAI 2019), which weighs factorization against fixed-point quantization by
storage and FLOPs. The layouts:

* **dense**: W, V x d numbers at the table's own width (32 bits for float32);
* **quantized**: W at ``bits`` per number. 16 bits is float16 (no side data); fewer bits is a symmetric integer
  code with one float32 scale per row (what ``embcompress quantize --bits 8`` writes);
* **factorized**: W_a (V x k) and W_b (k x d), k (V + d) numbers;
* **factorized + quantized**: both factors quantized; integer codes carry a scale per row of W_a and of W_b
  (V + k scales).

Work is counted in multiply-adds (MACs) per token, in two uses of the table:

* **lookup** (an input layer): a dense or quantized table is a gather, 0 MACs; a factorized one projects the
  gathered row of W_a through W_b, k d MACs;
* **output** (a softmax layer giving V logits from a d-vector h): h W^T costs V d MACs; (h W_b^T) W_a^T costs
  k (V + d).

Integer codes add scale multiplies, listed apart from the MACs: a per-row scale factors out of a dot product, so
it costs one multiply per row used (V for output logits; k + V factorized), or one per value gathered (d for a
dense lookup; 2 k factorized, folding W_b's scales into the k-vector). float16 is converted, not rescaled: no
multiplies are counted for it.

The break-even conditions follow from these counts:

* **parameters** (and bytes at equal width): factorization stores fewer numbers iff k (V + d) < V d, i.e.
  ``k < V d / (V + d)`` (:func:`params_break_even_rank`);
* **FLOPs**: as an output layer it saves multiply-adds under the same condition, k (V + d) < V d
  (:func:`output_flops_break_even_rank`); as a lookup it never saves any: a gather is free and the projection
  costs k d per token (:func:`lookup_extra_macs`);
* **against quantization at equal bytes**: factors at f bits are smaller than the dense table at q bits iff
  k < (q / f) V d / (V + d) (plus the scales of integer codes; :func:`equal_bytes_rank`), i.e. a reduction R above
  about 1 - q / f (75 % for float32 factors against int8, 50 % against float16). At that rank, factorization is the
  better compression iff its error, sqrt(1 - energy kept at k), is below the quantizer's (:func:`compare_layouts`
  measures both for a real table).

The brief that asked for this module cites these as the paper's eqs. 8, 11 and 15; that numbering was not checked
against the paper's text, so the functions are named by what they state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

SCALE_BITS = 32  # a float32 scale per row of an integer code
FLOAT_BITS = (16, 32, 64)  # widths stored as floating point: no scales


def _check(V: int, d: int, k: int | None = None, bits: int | None = None) -> None:
    if V < 1 or d < 1:
        raise ValueError(f"V and d must be at least 1, got V={V}, d={d}")
    if k is not None and k < 1:
        raise ValueError(f"rank k must be at least 1, got {k}")
    if bits is not None and not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")


def is_integer_code(bits: int) -> bool:
    """True for widths stored as an integer code with per-row scales (8 and the like); False for 16/32/64."""
    return bits not in FLOAT_BITS


# --- the four layouts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """Storage and work of one layout of a V x d table."""

    V: int
    d: int
    rank: int | None  # k for the factorized layouts
    bits: int  # bits per stored number
    params: int  # numbers stored (scales excluded)
    scales: int  # float32 scales stored (integer codes only)
    bytes: int  # params * bits / 8 (rounded up) + scales * 4
    lookup_macs: int  # multiply-adds per looked-up token
    lookup_scale_mults: int  # dequantizing multiplies per looked-up token
    output_macs: int  # multiply-adds per token as an output layer (V logits)
    output_scale_mults: int  # dequantizing multiplies per token as an output layer

    @property
    def lookup_flops(self) -> int:
        return self.lookup_macs + self.lookup_scale_mults

    @property
    def output_flops(self) -> int:
        return self.output_macs + self.output_scale_mults


def _bytes(numbers: int, bits: int, scales: int) -> int:
    return math.ceil(numbers * bits / 8) + scales * SCALE_BITS // 8


def layer_cost(V: int, d: int, *, rank: int | None = None, bits: int = 32) -> LayerCost:
    """The cost of a V x d table stored dense (``rank=None``) or factorized at rank k, at ``bits`` per number."""
    _check(V, d, rank, bits)
    code = is_integer_code(bits)
    if rank is None:
        scales = V if code else 0
        return LayerCost(
            V=V, d=d, rank=None, bits=bits, params=V * d, scales=scales, bytes=_bytes(V * d, bits, scales),
            lookup_macs=0, lookup_scale_mults=d if code else 0,
            output_macs=V * d, output_scale_mults=V if code else 0,
        )
    k = rank
    scales = V + k if code else 0
    return LayerCost(
        V=V, d=d, rank=k, bits=bits, params=k * (V + d), scales=scales, bytes=_bytes(k * (V + d), bits, scales),
        lookup_macs=k * d, lookup_scale_mults=2 * k if code else 0,
        output_macs=k * (V + d), output_scale_mults=V + k if code else 0,
    )


def dense_cost(V: int, d: int, bits: int = 32) -> LayerCost:
    """The dense table at its own width."""
    return layer_cost(V, d, bits=bits)


def quantized_cost(V: int, d: int, bits: int = 8) -> LayerCost:
    """The dense table quantized to ``bits`` (8: int8 with a float32 scale per row; 16: float16)."""
    return layer_cost(V, d, bits=bits)


def factorized_cost(V: int, d: int, k: int, bits: int = 32) -> LayerCost:
    """W_a (V x k) and W_b (k x d) at the table's own width."""
    return layer_cost(V, d, rank=k, bits=bits)


def factorized_quantized_cost(V: int, d: int, k: int, bits: int = 8) -> LayerCost:
    """Both factors quantized to ``bits`` (int8: scales per row of W_a and of W_b)."""
    return layer_cost(V, d, rank=k, bits=bits)


# --- break-even conditions -------------------------------------------------------------------------------------


def params_break_even_rank(V: int, d: int) -> float:
    """Factorization stores fewer numbers iff k < V d / (V + d) (the brief's eq. 8; numbering unverified)."""
    _check(V, d)
    return V * d / (V + d)


def saves_params(V: int, d: int, k: int) -> bool:
    """k (V + d) < V d."""
    _check(V, d, k)
    return k * (V + d) < V * d


def output_flops_break_even_rank(V: int, d: int) -> float:
    """As an output layer, (h W_b^T) W_a^T costs fewer MACs than h W^T iff k (V + d) < V d: the same rank as for
    parameters (the brief's eq. 11; numbering unverified)."""
    _check(V, d)
    return V * d / (V + d)


def saves_output_flops(V: int, d: int, k: int) -> bool:
    """k (V + d) < V d."""
    _check(V, d, k)
    return factorized_cost(V, d, k).output_macs < dense_cost(V, d).output_macs


def lookup_extra_macs(d: int, k: int) -> int:
    """What a factorized lookup costs per token beyond a dense gather (0 MACs): k d. It never saves work."""
    _check(1, d, k)
    return k * d


def equal_bytes_rank(V: int, d: int, quant_bits: int = 8, factor_bits: int = 32) -> float:
    """The (real) rank at which factors at ``factor_bits`` take the bytes of the dense table at ``quant_bits``,
    scales included. Factorization is the smaller of the two iff k is below it (the brief's eq. 15; numbering
    unverified). Without scales this is (q / f) V d / (V + d)."""
    _check(V, d, bits=quant_bits)
    _check(V, d, bits=factor_bits)
    s = SCALE_BITS
    dense_q = V * d * quant_bits + (V * s if is_integer_code(quant_bits) else 0)
    fixed = V * s if is_integer_code(factor_bits) else 0  # W_a's scales do not depend on k
    per_rank = (V + d) * factor_bits + (s if is_integer_code(factor_bits) else 0)
    return (dense_q - fixed) / per_rank


def equal_bytes_reduction(V: int, d: int, quant_bits: int = 8, factor_bits: int = 32) -> float:
    """The reduction R = 1 - k (V + d) / (V d) at :func:`equal_bytes_rank`: about 1 - q / f."""
    return 1.0 - equal_bytes_rank(V, d, quant_bits, factor_bits) * (V + d) / (V * d)


def beats_quantization_in_bytes(V: int, d: int, k: int, quant_bits: int = 8, factor_bits: int = 32) -> bool:
    """True when the factors at rank k (at ``factor_bits``) take fewer bytes than the table at ``quant_bits``."""
    return factorized_cost(V, d, k, factor_bits).bytes < quantized_cost(V, d, quant_bits).bytes


# --- a table's comparison, as ``inspect`` shows it --------------------------------------------------------------


@dataclass
class LayoutRow:
    """One row of :func:`compare_layouts`."""

    name: str  # "dense F32", "int8", "fp16", "R 90 %", "R 90 % + int8"
    reduction: float | None
    rank: int | None
    bits: int
    params: int
    bytes: int
    ratio: float  # bytes / dense bytes
    lookup_macs: int
    lookup_scale_mults: int
    output_macs: int
    output_scale_mults: int
    rel_error: float | None  # ||W - W'||_F / ||W||_F where known (measured or from the spectrum)


@dataclass
class EqualBytes:
    """Factorization against quantization at the quantizer's bytes."""

    quant_bits: int
    factor_bits: int
    rank: float  # equal_bytes_rank: factors are smaller below it
    reduction: float  # the R at that rank
    factor_rank: int  # the largest integer rank that is no larger than the quantized table
    factor_rel_error: float | None  # sqrt(1 - energy kept) at factor_rank
    quant_rel_error: float | None  # measured on the table
    winner: str | None  # "factorization", "quantization" or None when an error is unknown


@dataclass
class CostReport:
    V: int
    d: int
    bits: int
    rows: list[LayoutRow]
    params_break_even_rank: float
    output_flops_break_even_rank: float
    lookup_extra_macs_per_rank: int  # d: a factorized lookup costs k d MACs per token more than a gather
    equal_bytes: list[EqualBytes] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _name_of_bits(bits: int) -> str:
    return {8: "int8", 16: "fp16", 32: "fp32", 64: "fp64"}.get(bits, f"int{bits}" if is_integer_code(bits) else
                                                                f"fp{bits}")


def compare_layouts(
    V: int,
    d: int,
    *,
    bits: int = 32,
    reductions: Iterable[float] = (0.5, 0.7, 0.9),
    quant_bits: Iterable[int] = (8, 16),
    energy_kept: Callable[[int], float] | None = None,
    quant_errors: dict[int, float] | None = None,
) -> CostReport:
    """Every layout of a V x d table stored at ``bits``: dense, quantized to each of ``quant_bits`` narrower than
    ``bits``, factorized at each reduction R (k by eq. 5), and factorized + quantized.

    ``energy_kept(k)`` (a spectrum's) gives the factorized rows their Eckart-Young error; ``quant_errors``
    ({bits: rel. error}) the quantized rows theirs. The equal-bytes comparison then says which compresses better.
    """
    from .rank import rank_for_reduction

    _check(V, d, bits=bits)
    quant_errors = quant_errors or {}
    qbits = [b for b in quant_bits if b < bits]
    dense = dense_cost(V, d, bits)

    def row(name: str, c: LayerCost, reduction: float | None, err: float | None) -> LayoutRow:
        return LayoutRow(name, reduction, c.rank, c.bits, c.params, c.bytes, c.bytes / dense.bytes, c.lookup_macs,
                         c.lookup_scale_mults, c.output_macs, c.output_scale_mults, err)

    def factor_error(k: int) -> float | None:
        if energy_kept is None:
            return None
        return math.sqrt(max(0.0, 1.0 - energy_kept(k)))

    rows = [row(f"dense {_name_of_bits(bits)}", dense, None, 0.0)]
    rows += [row(_name_of_bits(b), quantized_cost(V, d, b), None, quant_errors.get(b)) for b in qbits]
    for r in reductions:
        k = rank_for_reduction(V, d, r)
        if k < 1:
            continue
        tag = f"R {100 * r:.0f} %"
        rows.append(row(tag, factorized_cost(V, d, k, bits), r, factor_error(k)))
        rows += [row(f"{tag} + {_name_of_bits(b)}", factorized_quantized_cost(V, d, k, b), r, None) for b in qbits]

    equal = []
    for b in qbits:
        k_eq = equal_bytes_rank(V, d, b, bits)
        k_int = min(min(V, d), math.floor(k_eq))
        f_err = factor_error(k_int) if k_int >= 1 else None
        q_err = quant_errors.get(b)
        winner = None
        if f_err is not None and q_err is not None:
            winner = "factorization" if f_err < q_err else "quantization"
        elif k_int < 1:
            winner = "quantization"
        equal.append(EqualBytes(b, bits, k_eq, equal_bytes_reduction(V, d, b, bits), k_int, f_err, q_err, winner))
    return CostReport(V, d, bits, rows, params_break_even_rank(V, d), output_flops_break_even_rank(V, d), d, equal)
