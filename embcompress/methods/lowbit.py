"""``lowbit`` storage: 2-, 3-, 4- or 8-bit codes in groups along the embedding dimension, packed for real.

Why: on transformer encoders a table kept at 2-4 bits a weight with one fp16 scale (and one integer zero point) per
group of G values loses far less than low rank at the same bytes (issue 15). This module stores such a table in the
very bytes onnxruntime's ``com.microsoft.GatherBlockQuantized`` reads, so the ONNX export copies the file's bytes and
the served table stays packed in memory (only looked-up rows are decoded).

Scheme, for each row r and group g of G consecutive values along the last axis (L = 2^bits - 1):

* ``asym`` (default): the group's range [min(w, 0), max(w, 0)] (it always holds 0, so the integer zero point lies in
  [0, L]) gives scale s = range / L, rounded **up** to fp16, and zero point z = round(-min / s); codes
  q = clamp(round(w / s) + z, 0, L) and w ~ (q - z) s, with |w - (q - z) s| <= s / 2 for every value.
* ``sym``: no stored zero point; it is fixed at 2^(bits-1), the op's default. As in onnxruntime's own 4-bit
  quantizers, s = -v / 2^(bits-1) with v the group's value of largest magnitude (so s may be negative and v is
  exact at code 0); the levels are -2^(bits-1) .. 2^(bits-1) - 1 times -s, so values of v's sign are within |s| / 2
  and values of the other sign within |s| (the top level is one step short).

``refine=True`` fits each group's scale and zero point to the data, no training data needed: a search over clipped
ranges (the range shrunk by factors down to 0.5), then alternating least squares (codes for fixed scale and zero;
the least-squares scale and offset for fixed codes, the zero point rounded to an integer, the scale refitted for it),
keeping per group the best squared error seen, so it never does worse than plain min/max. Every candidate is
evaluated with its scale rounded to fp16 and its zero point an integer, exactly as stored. (The ``hqq`` package was
not used: its zero points are floats, which ``GatherBlockQuantized`` cannot read, and its install runs a CUDA build.)

Any d: a row is padded with zeros to D = nb * G columns, nb = ceil(d / G), and the padded table is what is stored
(and counted by ``stored_bytes``); decoding returns the first d columns. The zeros cost the padded group no
precision: its range [min(w, 0), max(w, 0)] always holds 0, so min/max gives it the scale and zero point of its real
values alone, and 0 is exactly a code (z, or 2^(bits-1) for ``sym``), so the padded values decode to 0 with no error;
``refine`` fits its least-squares steps on the real values only. Nothing beyond the record's shape and group size is
needed to read such a table: D follows from d and G. Tables with G dividing d are stored exactly as before.

Stored tensors for a tensor named ``W`` of shape (..., d), rows = the product of the leading dims:

* ``W``: uint8 codes, shape (rows, D * bits / 8). bits 8: one code a byte. bits 4: two codes a byte, the code of
  the even column in the low nibble. bits 2: four codes a byte, column 4k in bits 0-1, 4k+1 in bits 2-3 and so on.
  bits 3 (no onnxruntime kernel; our own layout): eight codes in three bytes, read as a little-endian 24-bit number
  whose bits 3i..3i+2 hold code i.
* ``W_scale``: float16 scales, shape (rows, nb), one per group, groups in column order.
* ``W_zero`` (asym only): uint8 zero points packed like the codes along the groups axis: bits 8 one a byte,
  bits 4 and 3 two a byte (low nibble first), bits 2 four a byte (low bits first); shape (rows, ceil(nb * b / 8))
  with b = 4 for 3-bit tables; the unused high bits of a row's last byte are 0.

These are the layouts ``GatherBlockQuantized`` (uint8 data, ``bits`` attribute, ``quantize_axis`` the last one,
``gather_axis`` 0) reads for 2, 4 and 8 bits. The ONNX lowering (``gather`` under ``torch.onnx.export(...,
dynamo=False)``) emits that op on the stored codes, fp16 scales and zero points themselves, so the ONNX file and
onnxruntime's memory hold the safetensors bytes unchanged; the op then returns float16 (a ``Cast`` to float32
follows, then, for d < D, a ``Slice`` to the first d columns). Decoding is therefore defined, in torch too, as
float16(float32(q - z) * float32(s)): the product rounded to float16 (relative 2^-11, far below a quantization step
even at 8 bits), which makes torch and onnxruntime agree bit for bit. (Casting the scales to float32 instead would
let the exporter fold the Cast into a float32 copy of the scales in the file.) A 3-bit table is refused by the ONNX
lowering with one line (store 2 or 4 bits to export it). Constraint: G is a power of 2 and at least 16 (the op's
rule).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, InputError
from .base import STORAGE, BudgetError, Config, Method, register

BITS = (2, 3, 4, 8)
ONNX_BITS = (2, 4, 8)
SCHEMES = ("asym", "sym")
SCALE_SUFFIX = "_scale"
ZERO_SUFFIX = "_zero"
MIN_GROUP = 16
_BLOCK_ELEMS = 1 << 18  # rows are quantized in blocks of about this many values (1 MiB of float32: in cache)
_REFINE_BLOCK_ELEMS = 1 << 19
_REFINE_SHRINK = tuple(1.0 - 0.025 * i for i in range(21))  # clipped ranges tried: 1.0 down to 0.5
_REFINE_ITERS = 20


# --- options ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowBitConfig(Config):
    """bits in {2, 3, 4, 8}; group_size G (a power of 2, >= 16; rows are padded to a multiple of it); scheme
    ``asym`` (fp16 scale and integer zero point per group) or ``sym`` (fp16 scale, zero point fixed at 2^(bits-1));
    refine: fit scales and zero points to the table (data-free) instead of plain min/max."""

    bits: int = 4
    group_size: int = 32
    scheme: str = "asym"
    refine: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in BITS:
            raise InputError(f"lowbit bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < MIN_GROUP or g & (g - 1):
            raise InputError(f"lowbit group size must be a power of 2 and at least {MIN_GROUP} (onnxruntime's "
                             f"GatherBlockQuantized rule), got {g!r}")
        if self.scheme not in SCHEMES:
            raise InputError(f"lowbit scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if not isinstance(self.refine, bool):
            raise InputError(f"lowbit refine must be true or false, got {self.refine!r}")

    @property
    def levels(self) -> int:
        """L = 2^bits - 1, the largest code."""
        return (1 << self.bits) - 1

    def groups(self, dim: int) -> int:
        """Groups per row, ceil(dim / G) (the last one padded when G does not divide ``dim``)."""
        if dim < 1:
            raise InputError(f"lowbit needs a dimension of at least 1, got {dim!r}")
        return -(-dim // self.group_size)

    def width(self, dim: int) -> int:
        """The stored (padded) row width D = groups * G."""
        return self.groups(dim) * self.group_size

    def code_bytes(self, dim: int) -> int:
        """Packed code bytes per (padded) row."""
        return self.width(dim) * self.bits // 8

    def zero_bytes(self, dim: int) -> int:
        """Packed zero-point bytes per row (0 for ``sym``)."""
        if self.scheme == "sym":
            return 0
        zero_bits = 4 if self.bits == 3 else self.bits
        return -(-self.groups(dim) * zero_bits // 8)

    def stored_bytes(self, rows: int, dim: int) -> int:
        return rows * (self.code_bytes(dim) + 2 * self.groups(dim) + self.zero_bytes(dim))

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> LowBitConfig:
        """The most bits (8, 4, 3, 2), then the finest group (smallest G, the most accurate) whose stored bytes fit.

        Groups are tried from 16 up to the first power of 2 holding a whole row: the ones dividing ``dim`` come first
        (every power of 2 below a divisor divides too), then the padded ones, whose bytes need not grow with G (300
        values: G = 64 pads to 320 in 5 groups, G = 128 to 384 in 3). ``bits`` or ``group_size`` given in
        ``options`` are kept as given; ``scheme`` and ``refine`` pass through.
        """
        bits_options = (options.pop("bits"),) if "bits" in options else tuple(sorted(BITS, reverse=True))
        group_options = (options.pop("group_size"),) if "group_size" in options else tuple(_powers_of_two(dim))
        smallest = None
        for bits in bits_options:
            for g in group_options:
                config = cls(bits=bits, group_size=g, **options)
                need = config.stored_bytes(rows, dim)
                if need <= budget:
                    return config
                smallest = need if smallest is None else min(smallest, need)
        raise BudgetError(f"lowbit needs at least {smallest} bytes for a {rows} x {dim} table, over the budget of "
                          f"{budget}")


def _powers_of_two(dim: int) -> list[int]:
    """The group sizes worth trying for rows of ``dim`` values: powers of 2 from MIN_GROUP up to the first one
    holding a whole row (a larger group pads more for the same single group)."""
    out, g = [MIN_GROUP], MIN_GROUP
    while g < dim:
        g *= 2
        out.append(g)
    return out


# --- packing ---------------------------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (rows, n) in [0, 2^bits) along the last axis, low bits first (see the module docstring).

    n must be a multiple of 8 / bits (of 8 for 3 bits); use :func:`pack_padded` otherwise.
    """
    rows, n = codes.shape
    codes = codes.to(torch.uint8).contiguous()
    if bits == 8:
        return codes
    if bits not in (2, 3, 4):
        raise InputError(f"cannot pack {bits}-bit codes")
    if sys.byteorder != "little":  # the fast path below reads bytes through wider little-endian integers
        c = codes.to(torch.int64).reshape(rows, -1, 8 if bits == 3 else 8 // bits)
        v = (c << (bits * torch.arange(c.shape[-1]))).sum(dim=-1)
        nbytes = 3 if bits == 3 else 1
        return torch.stack([(v >> (8 * k)) & 0xFF for k in range(nbytes)], -1).to(torch.uint8).reshape(rows, -1)
    if bits == 4:  # two codes (bytes) as one int16: low byte | high byte << 4
        v = codes.view(torch.int16)
        return ((v | (v >> 4)) & 0xFF).to(torch.uint8)
    if bits == 2:  # four codes as one int32
        v = codes.view(torch.int32)
        v = (v | (v >> 6)) & 0x000F000F
        return ((v | (v >> 12)) & 0xFF).to(torch.uint8)
    v = codes.view(torch.int64)  # bits 3: eight codes as one int64 -> 24 bits -> its 3 low bytes
    r = v & 7
    for i in range(1, 8):
        r |= (v >> (5 * i)) & (7 << (3 * i))
    return r.view(torch.uint8).reshape(rows, n // 8, 8)[:, :, :3].reshape(rows, n // 8 * 3)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack` (and of :func:`pack_padded`): uint8 codes (rows, n)."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if bits in (2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        out = (packed.unsqueeze(-1) >> shifts) & mask
        return out.reshape(rows, packed.shape[1] * per)[:, :n]
    if bits == 3:
        b = packed.reshape(rows, -1, 3).to(torch.int32)
        v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        out = ((v.unsqueeze(-1) >> shifts) & 7).to(torch.uint8)
        return out.reshape(rows, -1)[:, :n]
    raise CheckpointError(f"cannot unpack {bits}-bit codes")


def pack_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` after padding the last axis with zero codes to a whole number of bytes."""
    per = 8 if bits == 3 else 8 // bits
    pad = -codes.shape[1] % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], pad)], dim=1)
    return pack(codes, bits)


def _zero_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


# --- quantization ----------------------------------------------------------------------------------------------


def _fp16_up(s: torch.Tensor) -> torch.Tensor:
    """s (float32, >= 0) rounded to the nearest float16 not below it."""
    h = s.to(torch.float16)
    low = h.to(torch.float32) < s
    if bool(low.any()):
        h = torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h


def _check_scales(s16: torch.Tensor) -> None:
    if not bool(torch.isfinite(s16).all()):
        raise InputError("lowbit scales overflow float16 (a group's range is beyond 65504 times its levels)")


def _plain(x: torch.Tensor, config: LowBitConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Min/max fit of x (n, nb, G) float32: codes uint8 (n, nb, G), scales fp16 (n, nb), zeros uint8 (n, nb).

    Codes are floor(x / s + z + 1/2) clamped to [0, L] (one fused multiply-add, then a truncating cast)."""
    L = config.levels
    mx, mn = x.amax(dim=-1), x.amin(dim=-1)  # two plain reductions are ~10x faster than torch.aminmax here
    if not (bool(torch.isfinite(mx).all()) and bool(torch.isfinite(mn).all())):
        raise InputError("lowbit quantization needs finite values; the tensor holds NaN or Inf")
    if config.scheme == "asym":
        mn.clamp_(max=0.0)
        mx.clamp_(min=0.0)
        s16 = _fp16_up((mx - mn) / L)
        _check_scales(s16)
        sf = s16.to(torch.float32)
        inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
        z = (-mn * inv).round_().clamp_(0, L)
        q = torch.addcmul((z + 0.5).unsqueeze(-1), x, inv.unsqueeze(-1)).clamp_(0, L)
        return q.to(torch.uint8), s16, z.to(torch.uint8)
    half = 1 << (config.bits - 1)
    v = torch.where(mx >= -mn, mx, mn)  # the value of largest magnitude
    s16 = _fp16_up(v.abs() / half)
    s16 = torch.where(v > 0, -s16, s16)
    _check_scales(s16)
    sf = s16.to(torch.float32)
    inv = torch.where(sf != 0, 1.0 / sf, torch.zeros_like(sf))
    q = torch.addcmul(torch.full_like(sf, half + 0.5).unsqueeze(-1), x, inv.unsqueeze(-1)).clamp_(0, L)
    return q.to(torch.uint8), s16, None


def _codes(x: torch.Tensor, sf: torch.Tensor, z: torch.Tensor, L: int) -> torch.Tensor:
    inv = torch.where(sf != 0, 1.0 / sf, torch.zeros_like(sf))
    q = x * inv.unsqueeze(-1)
    return q.round_().add_(z.unsqueeze(-1)).clamp_(0, L)


def _sse(x: torch.Tensor, q: torch.Tensor, sf: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r = (q - z.unsqueeze(-1)).mul_(sf.unsqueeze(-1)).sub_(x)
    return r.mul_(r).sum(dim=-1)


def _refined(x: torch.Tensor, config: LowBitConfig,
             real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Data-free fit of scales and zero points per group (clipped-range search, then alternating least squares),
    keeping per group the best squared error; starts from (and never loses to) :func:`_plain`. ``real`` (nb, G),
    1 for a real value and 0 for padding (which holds zeros), keeps the least-squares fits to the real values."""
    L = config.levels
    asym = config.scheme == "asym"
    q0, s16, z0 = _plain(x, config)
    best_s = s16.to(torch.float32)
    best_z = z0.to(torch.float32) if asym else torch.full_like(best_s, float(1 << (config.bits - 1)))
    best_err = _sse(x, q0.to(torch.float32), best_s, best_z)

    def consider(s: torch.Tensor, z: torch.Tensor) -> None:
        s = s.to(torch.float16)
        if not bool(torch.isfinite(s).all()):
            s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        sf = s.to(torch.float32)
        z = z.round().clamp(0, L)
        err = _sse(x, _codes(x, sf, z, L), sf, z)
        better = err < best_err
        best_err.copy_(torch.where(better, err, best_err))
        best_s.copy_(torch.where(better, sf, best_s))
        best_z.copy_(torch.where(better, z, best_z))

    if asym:
        mn, mx = torch.aminmax(x, dim=-1)
        mn.clamp_(max=0.0)
        mx.clamp_(min=0.0)
        for f in _REFINE_SHRINK[1:]:
            s = (mx - mn) * (f / L)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            consider(s, -mn * f / safe)
    else:
        base = s16.to(torch.float32)  # the min/max scale the shrink factors apply to
        for f in _REFINE_SHRINK[1:]:
            consider(base * f, best_z)
    for _ in range(_REFINE_ITERS):
        q = _codes(x, best_s, best_z, L)
        if asym:
            # least squares of x ~ a q + c over each group, then the integer zero point z = -c / a, then the scale
            if real is None:
                qm, xm = q.mean(dim=-1), x.mean(dim=-1)
                qc = q - qm.unsqueeze(-1)
            else:
                count = real.sum(dim=-1)
                qm, xm = (q * real).sum(dim=-1) / count, x.sum(dim=-1) / count
                qc = (q - qm.unsqueeze(-1)) * real
            var = (qc * qc).sum(dim=-1)
            a = (qc * x).sum(dim=-1) / torch.where(var > 0, var, torch.ones_like(var))
            ok = (var > 0) & (a > 0)
            a = torch.where(ok, a, best_s)
            z = torch.where(ok, ((a * qm - xm) / a), best_z).round_().clamp_(0, L)
        else:
            z = best_z
        d = q - z.unsqueeze(-1)
        den = (d * d).sum(dim=-1)
        s = torch.where(den > 0, (d * x).sum(dim=-1) / torch.where(den > 0, den, torch.ones_like(den)), best_s)
        consider(s, z)
    q = _codes(x, best_s, best_z, L)
    return q.to(torch.uint8), best_s.to(torch.float16), best_z.to(torch.uint8) if asym else None


def _fit(x: torch.Tensor, config: LowBitConfig,
         real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The configured fit (:func:`_refined` or :func:`_plain`) of groups x (n, nb, G), padding marked by ``real``."""
    return _refined(x, config, real) if config.refine else _plain(x, config)


def _real_mask(dim: int, config: LowBitConfig) -> torch.Tensor | None:
    """(nb, G) float32, 1 for the first ``dim`` values of a padded row and 0 after; None when nothing is padded."""
    width = config.width(dim)
    if width == dim:
        return None
    return (torch.arange(width) < dim).to(torch.float32).reshape(config.groups(dim), config.group_size)


def _run_blocks(block: Any, starts: range) -> None:
    """Run ``block(start)`` for every start, on as many threads as torch's intra-op setting, each block's ops
    single-threaded: small blocks stay in cache, and no op waits at a parallel barrier for a descheduled thread
    (on a busy machine torch's own 2 threads made this 10x slower than 1). torch's thread count is restored after."""
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        for i in starts:
            block(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(block, starts):
                pass
    finally:
        torch.set_num_threads(previous)


def quantize_lowbit(w: torch.Tensor, config: LowBitConfig) -> dict[str, torch.Tensor]:
    """The stored tensors for ``w`` (..., d): ``""`` packed codes, ``"_scale"`` fp16 scales, ``"_zero"`` packed
    zero points (asym). Rows are processed in blocks, in float32, so the extra memory stays a few MiB."""
    if w.dim() < 1 or not w.is_floating_point():
        raise InputError(f"lowbit quantization needs a floating tensor, got {w.dtype} {tuple(w.shape)}")
    dim = w.shape[-1]
    nb, width, G = config.groups(dim), config.width(dim), config.group_size
    rows = w.numel() // dim
    flat = w.detach().reshape(rows, dim)
    codes = torch.empty(rows, config.code_bytes(dim), dtype=torch.uint8)
    scales = torch.empty(rows, nb, dtype=torch.float16)
    zeros = torch.empty(rows, config.zero_bytes(dim), dtype=torch.uint8) if config.scheme == "asym" else None
    real = _real_mask(dim, config)
    step = max(1, (_REFINE_BLOCK_ELEMS if config.refine else _BLOCK_ELEMS) // width)

    def block(i: int) -> None:
        x = flat[i : i + step].to("cpu", torch.float32)
        n = x.shape[0]
        if width != dim:
            x = torch.nn.functional.pad(x, (0, width - dim))
        q, s16, z = _fit(x.reshape(n, nb, G), config, real)
        codes[i : i + n] = pack(q.reshape(n, width), config.bits)
        scales[i : i + n] = s16
        if zeros is not None:
            zeros[i : i + n] = pack_padded(z, _zero_bits(config.bits))

    _run_blocks(block, range(0, rows, step))
    out = {"": codes, SCALE_SUFFIX: scales}
    if zeros is not None:
        out[ZERO_SUFFIX] = zeros
    return out


def quantize_lowbit_gptq(w: torch.Tensor, config: LowBitConfig, hessian: torch.Tensor, *, damp: float = 0.01,
                         act_order: bool = True, block: int = 128) -> dict[str, torch.Tensor]:
    """The stored tensors of :func:`quantize_lowbit` for a weight ``w`` (n, d) multiplying inputs x (d) as
    ``w @ x``, with codes chosen by GPTQ (Frantar et al., ICLR 2023) to keep ``w @ x`` rather than ``w`` itself.

    Why: a layer's error is ``(w - w_q) @ x``; where the inputs have large or correlated channels (a transformer's
    LayerNorm outputs), rounding each weight to its nearest code wastes accuracy. ``hessian`` is E[x x^T] (d, d)
    over calibration inputs. Columns are quantized one at a time; each one's rounding error is spread over the
    columns not yet quantized through the inverse Hessian (its Cholesky factor, ``damp`` times the mean diagonal
    added). ``act_order``: columns in decreasing order of E[x_i^2], the groups' scales and zero points fitted
    (min/max, or ``refine``) on ``w`` beforehand; else columns in order, each group fitted on its columns as updated
    when it is reached. The result has the very layout of the min/max storage, so every reader of ``lowbit`` tensors
    reads it unchanged.

    A width d that G does not divide is padded as :func:`quantize_lowbit` pads it: the padded columns are zero
    weights with no input (a unit Hessian diagonal, no coupling), so they keep code z exactly, add no error to
    propagate, and take no part in the damping's mean diagonal."""
    if w.dim() != 2 or not w.is_floating_point():
        raise InputError(f"GPTQ needs a floating matrix, got {w.dtype} {tuple(w.shape)}")
    n, dim = w.shape
    nb, G, L, width = config.groups(dim), config.group_size, config.levels, config.width(dim)
    if tuple(hessian.shape) != (dim, dim):
        raise InputError(f"GPTQ needs a {dim} x {dim} Hessian, got {tuple(hessian.shape)}")
    W = torch.zeros(n, width)
    W[:, :dim] = w.detach().to(torch.float32)
    H = torch.eye(width, dtype=torch.float64)
    H[:dim, :dim] = hessian.detach().to(torch.float64)
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    real = _real_mask(dim, config)
    mid = float(1 << (config.bits - 1))
    scales = torch.empty(n, nb, dtype=torch.float16)
    zeros = torch.full((n, nb), int(mid), dtype=torch.uint8)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(width)
    if act_order:
        _, s16, z16 = _fit(W.reshape(n, nb, G).contiguous(), config, real)
        scales.copy_(s16)
        if z16 is not None:
            zeros.copy_(z16)
        W, H = W[:, perm].contiguous(), H[perm][:, perm]
    H.diagonal().add_(damp * float(H.diagonal()[perm < dim].mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    q_all = torch.empty(n, width, dtype=torch.uint8)
    step = max(G, block // G * G)
    for b0 in range(0, width, step):
        b1 = min(b0 + step, width)
        w1 = W[:, b0:b1]
        err = torch.zeros_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            if not act_order and col % G == 0:
                group_real = None if real is None else real[col // G : col // G + 1]
                _, s16, z16 = _fit(w1[:, i : i + G].reshape(n, 1, G).contiguous(), config, group_real)
                scales[:, col // G] = s16[:, 0]
                if z16 is not None:
                    zeros[:, col // G] = z16[:, 0]
            sf, z = scales[:, col // G].to(torch.float32), zeros[:, col // G].to(torch.float32)
            x = w1[:, i]
            q = _codes(x.reshape(n, 1, 1), sf.reshape(n, 1), z.reshape(n, 1), L).reshape(n)
            q_all[:, col] = q.to(torch.uint8)
            deq = (q - z) * sf  # float32, as MatMulNBits computes it
            e = (x - deq) / h1[i, i]
            w1[:, i:].sub_(e.unsqueeze(1) * h1[i, i:].unsqueeze(0))
            err[:, i] = e
        W[:, b1:].sub_(err @ hinv[b0:b1, b1:])
    out = {"": pack(q_all, config.bits), SCALE_SUFFIX: scales}
    if config.scheme == "asym":
        out[ZERO_SUFFIX] = pack_padded(zeros, _zero_bits(config.bits))
    return out


def dequantize_lowbit(stored: Mapping[str, torch.Tensor], config: LowBitConfig,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of any rows of the stored tensors (the rows they hold), reshaped to ``shape``: (q - z) * s per
    group computed in float32 and rounded to float16, exactly as ``GatherBlockQuantized`` computes it from fp16
    scales; of a padded row, its first ``shape[-1]`` values."""
    codes, scales = stored[""], stored[SCALE_SUFFIX]
    dim = shape[-1] if shape else 0
    nb, width = config.groups(dim), config.width(dim)
    rows = codes.shape[0] if codes.dim() else 0
    tracing = torch.jit.is_tracing()  # shapes are traced values then: checked at export's start instead
    if not tracing and (codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, config.code_bytes(dim))
                        or tuple(scales.shape) != (rows, nb)):
        raise CheckpointError(f"lowbit tensors of shapes {tuple(codes.shape)} and {tuple(scales.shape)} do not "
                              f"fit {config.bits}-bit groups of {config.group_size} over {dim} values")
    q = unpack(codes, config.bits, width).to(torch.float32).reshape(rows, nb, config.group_size)
    if config.scheme == "asym":
        zp = stored.get(ZERO_SUFFIX)
        if zp is None or (not tracing and tuple(zp.shape) != (rows, config.zero_bytes(dim))):
            raise CheckpointError("lowbit asym table without matching zero points")
        z = unpack(zp, _zero_bits(config.bits), nb).to(torch.float32)
    else:
        z = torch.full((rows, nb), float(1 << (config.bits - 1)))
    w = q.sub_(z.unsqueeze(-1)).mul_(scales.to(torch.float32).unsqueeze(-1)).reshape(rows, width)
    if width != dim:
        w = w[:, :dim]
    return w.to(torch.float16).to(torch.float32).reshape(shape)


# --- ONNX lowering ---------------------------------------------------------------------------------------------


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows ``ids`` of a packed table: in torch the same math as :func:`dequantize_lowbit`; in ONNX one
    ``com.microsoft::GatherBlockQuantized`` node reading the stored bytes."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, scheme: str, dim: int) -> torch.Tensor:
        config = LowBitConfig(bits=bits, group_size=group_size, scheme=scheme)
        return _gather_eager({"": codes, SCALE_SUFFIX: scales, **({ZERO_SUFFIX: zeros} if zeros is not None else {})},
                             ids, config, dim)

    @staticmethod
    def symbolic(g: Any, codes: Any, ids: Any, scales: Any, zeros: Any, bits: int, group_size: int, scheme: str,
                 dim: int) -> Any:
        inputs = [codes, ids, scales] + ([zeros] if scheme == "asym" else [])
        width = LowBitConfig(bits=bits, group_size=group_size, scheme=scheme).width(dim)
        half = g.op("com.microsoft::GatherBlockQuantized", *inputs, bits_i=bits, block_size_i=group_size,
                    gather_axis_i=0, quantize_axis_i=1)
        wide = g.op("Cast", half, to_i=1)  # TensorProto.FLOAT
        out = wide
        if width != dim:  # the padded columns dropped: a Slice of the last axis to its first dim values
            starts, ends, axes = (g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64)) for v in (0, dim, -1))
            out = g.op("Slice", wide, starts, ends, axes)
        ids_type = ids.type()
        sizes = ids_type.varyingSizes() if hasattr(ids_type, "varyingSizes") else None
        if sizes is not None:
            half.setType(ids_type.with_dtype(torch.float16).with_sizes([*sizes, width]))
            wide.setType(ids_type.with_dtype(torch.float32).with_sizes([*sizes, width]))
            out.setType(ids_type.with_dtype(torch.float32).with_sizes([*sizes, dim]))
        return out


def _gather_eager(stored: Mapping[str, torch.Tensor], ids: torch.Tensor, config: LowBitConfig,
                  dim: int) -> torch.Tensor:
    flat = ids.reshape(-1)
    rows = dequantize_lowbit({k: v[flat] for k, v in stored.items()}, config, (flat.numel(), dim))
    return rows.reshape(*ids.shape, dim)


def gather_lowbit(stored: Mapping[str, torch.Tensor], ids: torch.Tensor, config: LowBitConfig,
                  dim: int) -> torch.Tensor:
    """Rows ``ids`` of the stored table, decoding only those rows; under ONNX export, a GatherBlockQuantized node."""
    if not torch.onnx.is_in_onnx_export():
        return _gather_eager(stored, ids, config, dim)
    if config.bits not in ONNX_BITS:
        raise InputError(f"a {config.bits}-bit lowbit table has no onnxruntime kernel (GatherBlockQuantized reads "
                         f"{', '.join(map(str, ONNX_BITS))} bits); store it at 2 or 4 bits to export it")
    zeros = stored.get(ZERO_SUFFIX) if config.scheme == "asym" else None
    return _GatherBlockQuantized.apply(stored[""], ids, stored[SCALE_SUFFIX], zeros, config.bits,
                                       config.group_size, config.scheme, dim)


METHOD = register(Method(
    name="lowbit",
    kind=STORAGE,
    config=LowBitConfig,
    description="2/3/4/8-bit codes in groups along d with fp16 scales (and zero points), packed as "
                "onnxruntime's GatherBlockQuantized reads them (2-bit, G=32: 0.080 of float32)",
    quantize=quantize_lowbit,
    dequantize=dequantize_lowbit,
    gather=gather_lowbit,
    folds_at_load=False,  # GatherBlockQuantized is a contrib op onnxruntime runs, never folds
    budget_options=("bits", "group_size"),
))
