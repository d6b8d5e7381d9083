"""``iiq`` structure: binary codes by isotropic iterative quantization (Liao, Chen, Wang, Qiu and Yuan, AAAI 2020).

The paper makes the embedding space isotropic first (it removes the mean and the few dominant principal directions,
the "all-but-the-top" post-processing of Mu and Viswanath), then learns an orthogonal rotation R by iterative
quantization (ITQ, Gong and Lazebnik): alternately B = sign(X R) and R = U W^T from the SVD X^T B = U S W^T, and
keeps sign(X R) as the word's binary vector.

Here the codes must rebuild the table a model was trained with, not replace it, so this module departs from the
paper in three stated ways:

* the removed part is kept, not dropped: ``remove`` dominant directions (D x d, fp16) and each row's coefficients
  on them (V x D, fp16), so W_hat = mean + c_r U + s_r b_r M^T. At D = 2 that is 4 bytes a row and, on MiniLM, it
  carries the directions whose variance a sign code would spread over every bit;
* each row has a scale s_r (fp16) fitted by least squares, s_r = <x_r, b_r M^T> / ||b_r M^T||^2, and ITQ
  minimises the reconstruction error ||X - diag(s) B M^T||_F over B, s and M (the Procrustes step uses diag(s) B
  instead of B, so rows weigh by their size; with bits <= d every step is exact and the error never increases);
* ``bits`` per row may differ from d: fewer bits start from the top principal directions of the residual (as ITQ
  does), more bits from a random tight frame (M is d x bits with orthonormal rows, a random projection to more
  dims followed by the rotation, trained as one matrix).

Stored: the bits (uint8, V x bits/8, packed 8 a byte, most significant bit first), the map M (fp16, d x bits),
the scales (fp16, V), the mean (float32, d) and the removed directions and coefficients (fp16). One bit a dimension
of MiniLM's 30522 x 384 table is 0.036 of float32 at D = 2 (0.033 at D = 0). Recovery trains M, the scales, the
mean, the directions and coefficients; the bits are buffers. A lookup gathers the row's bytes, turns each into 8
signs with a 256 x 8 table (a Gather in ONNX), multiplies by M^T and adds the rest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .base import FLOAT32_BYTES, STRUCTURE, BudgetError, Config, Context, Method, Table, register
from .pq import check_table, relative_error, resolve_padding, rounded

ITQ_SAMPLE = 16384  # ITQ learns the rotation on at most this many rows
MAX_BITS_PER_DIM = 4  # for_budget stops at 4 bits a dimension
_STOP = 1e-5  # ITQ stops when the error falls by less than this fraction in one iteration
_BLOCK_ROWS = 8192
_HALF = torch.float16


def sign_table() -> torch.Tensor:
    """Row b holds the 8 signs (+1 for a set bit, -1 otherwise) of byte b, most significant bit first."""
    byte = torch.arange(256).unsqueeze(1)
    shift = torch.arange(7, -1, -1).unsqueeze(0)
    return ((byte >> shift) & 1).to(torch.float32) * 2 - 1


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """(n, bits) bool -> (n, bits / 8) uint8, most significant bit first."""
    n, bits = positive.shape
    weights = (2 ** torch.arange(7, -1, -1, dtype=torch.int32))
    return (positive.reshape(n, bits // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(n, bytes) uint8 -> (n, 8 bytes) signs +-1 (float32)."""
    return sign_table()[packed.to(torch.int64)].reshape(packed.shape[0], -1)


@dataclass(frozen=True)
class IIQConfig(Config):
    """bits: per row, a multiple of 8 (None: d rounded up to a multiple of 8); remove: dominant directions kept
    apart in fp16 (0 = plain ITQ of the centred table); iterations of ITQ; seed of the rotation's start and the
    sample; zero_padding: serve the padding row as zeros (None: when it is zero)."""

    bits: int | None = None
    remove: int = 2
    iterations: int = 50
    seed: int = 0
    zero_padding: bool | None = None

    def __post_init__(self) -> None:
        for name in ("bits", "remove", "iterations", "seed"):
            value = getattr(self, name)
            if value is None and name == "bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"iiq option {name} must be an integer, got {value!r}")
        if self.bits is not None and (self.bits < 8 or self.bits % 8):
            raise InputError(f"iiq bits must be a positive multiple of 8, got {self.bits}")
        if self.remove < 0:
            raise InputError(f"iiq remove must be at least 0, got {self.remove}")
        if self.iterations < 0:
            raise InputError(f"iiq iterations must be at least 0, got {self.iterations}")

    def row_bits(self, dim: int) -> int:
        return self.bits if self.bits is not None else 8 * -(-dim // 8)

    def check(self, rows: int, dim: int) -> None:
        if self.remove >= dim:
            raise InputError(f"iiq remove {self.remove} must be below the table's {dim} dims")
        if self.remove > rows:
            raise InputError(f"iiq remove {self.remove} is above the table's {rows} rows")

    def stored_bytes(self, rows: int, dim: int) -> int:
        self.check(rows, dim)
        bits = self.row_bits(dim)
        return rows * bits // 8 + 2 * rows + 2 * dim * bits + 4 * dim + 2 * self.remove * (rows + dim)

    @classmethod
    def for_budget(cls, rows: int, dim: int, budget: int, **options: Any) -> IIQConfig:
        """The most bits a row (a multiple of 8, up to 4 a dimension) that fit."""
        if budget >= FLOAT32_BYTES * rows * dim:
            raise BudgetError(f"a budget of {budget} bytes is not below the float32 table's {FLOAT32_BYTES * rows * dim}")
        if options.get("bits") is not None:
            config = cls(**options)
            if config.stored_bytes(rows, dim) > budget:
                raise BudgetError(f"iiq with {config.bits} bits needs {config.stored_bytes(rows, dim)} bytes, "
                                  f"over the budget of {budget}")
            return config
        options.pop("bits", None)
        smallest = cls(bits=8, **options)
        fixed = smallest.stored_bytes(rows, dim) - (rows + 2 * dim * 8)  # without the bits' own share
        per8 = rows + 2 * dim * 8  # bytes per 8 more bits a row
        bits = 8 * ((budget - fixed) // per8)
        bits = min(bits, MAX_BITS_PER_DIM * 8 * -(-dim // 8))
        if bits < 8:
            raise BudgetError(f"iiq needs at least {smallest.stored_bytes(rows, dim)} bytes for a {rows} x {dim} "
                              f"table, over the budget of {budget}")
        return cls(bits=int(bits), **options)


class IIQTable(Table):
    """Binary codes: row r is mean + coefficients_r @ directions + scales_r * signs(bits_r) @ rotation^T."""

    method = "iiq"

    def __init__(self, bits: torch.Tensor, rotation: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor,
                 directions: torch.Tensor, coefficients: torch.Tensor, config: IIQConfig,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        rows, nbytes = bits.shape
        dim, nbits = rotation.shape
        if nbits != 8 * nbytes or scales.shape != (rows,) or mean.shape != (dim,) \
                or directions.shape[1:] != (dim,) or coefficients.shape != (rows, directions.shape[0]):
            raise CheckpointError(
                f"iiq tensors do not fit together: bits {tuple(bits.shape)}, rotation {tuple(rotation.shape)}, "
                f"scales {tuple(scales.shape)}, mean {tuple(mean.shape)}, directions {tuple(directions.shape)}, "
                f"coefficients {tuple(coefficients.shape)}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = rows, dim, padding_idx
        self.nbits, self.remove = nbits, directions.shape[0]
        self._config = config
        self.register_buffer("bits", bits.to(torch.uint8).contiguous())
        self.rotation = nn.Parameter(rotation.detach().to(torch.float32).clone())
        self.scales = nn.Parameter(scales.detach().to(torch.float32).clone())
        self.mean = nn.Parameter(mean.detach().to(torch.float32).clone())
        self.directions = nn.Parameter(directions.detach().to(torch.float32).clone())
        self.coefficients = nn.Parameter(coefficients.detach().to(torch.float32).clone())
        self.register_buffer("signs", sign_table(), persistent=False)
        self._info: dict[str, Any] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        packed = torch.index_select(self.bits, 0, flat).to(torch.int64)  # (n, bits / 8)
        signs = torch.index_select(self.signs, 0, packed.reshape(-1)).reshape(flat.shape[0], self.nbits)
        out = (signs @ self.rotation.T) * torch.index_select(self.scales, 0, flat).unsqueeze(1) + self.mean
        if self.remove:
            out = out + torch.index_select(self.coefficients, 0, flat) @ self.directions
        out = out.reshape(*ids.shape, self.embedding_dim)
        if self._config.zero_padding and self.padding_idx is not None:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.bits.device))

    def config(self) -> IIQConfig:
        return self._config

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"bits": self.bits.detach(), "rotation": self.rotation.detach().to(_HALF),
               "scales": self.scales.detach().to(_HALF), "mean": self.mean.detach().to(torch.float32)}
        if self.remove:
            out["directions"] = self.directions.detach().to(_HALF)
            out["coefficients"] = self.coefficients.detach().to(_HALF)
        return out

    def storable(self) -> list[str]:
        return []

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> IIQTable:
        config = IIQConfig.from_dict(entry.get("config"))
        need = {"bits", "rotation", "scales", "mean"} | ({"directions", "coefficients"} if config.remove else set())
        missing = sorted(need - set(tensors))
        if missing:
            raise CheckpointError(f"iiq table lacks tensor(s) {', '.join(missing)}")
        bits = tensors["bits"]
        if bits.dtype != torch.uint8 or bits.dim() != 2:
            raise CheckpointError(f"iiq bits must be a 2-D uint8 tensor, got {bits.dtype} {tuple(bits.shape)}")
        for name in need - {"bits"}:
            if not tensors[name].is_floating_point():
                raise CheckpointError(f"iiq {name} must be a float tensor, got {tensors[name].dtype}")
        rotation = tensors["rotation"]
        if rotation.dim() != 2:
            raise CheckpointError(f"iiq rotation must be 2-D, got shape {tuple(rotation.shape)}")
        rows, dim = bits.shape[0], rotation.shape[0]
        shape = list(entry.get("shape") or [rows, dim])
        if shape != [rows, dim]:
            raise CheckpointError(f"iiq tensors give a {rows} x {dim} table, the record says {shape[0]} x {shape[1]}")
        directions = tensors.get("directions", torch.zeros(0, dim))
        coefficients = tensors.get("coefficients", torch.zeros(rows, 0))
        table = cls(bits, rotation, tensors["scales"], tensors["mean"], directions, coefficients, config,
                    entry.get("padding_idx"))
        table._info = dict(entry.get("info") or {})
        return table

    def macs(self) -> dict[str, int]:
        return {"lookup": self.embedding_dim * (self.nbits + self.remove),
                "logits": self.num_embeddings * self.embedding_dim}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.nbits}, remove={self.remove}"


def _decode(b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return b @ m.T


def _fit_scales(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Least-squares s per row of ||x - s d||: <x, d> / ||d||^2 (0 where d is 0)."""
    dd = (d * d).sum(1)
    return torch.where(dd > 0, (x * d).sum(1) / dd.clamp(min=1e-30), torch.zeros_like(dd))


def itq(x: torch.Tensor, bits: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """The map M (d x bits) that ITQ learns on x (n x d, centred), and the relative error after each step."""
    n, d = x.shape
    if bits <= d:
        cov = (x.T.double() @ x.double())
        _, vecs = torch.linalg.eigh(cov)
        p = vecs[:, -bits:].flip(1).to(torch.float32)  # the top bits principal directions
        q, _ = torch.linalg.qr(torch.randn(bits, bits, generator=generator))
        m = p @ q
    else:
        q, _ = torch.linalg.qr(torch.randn(bits, d, generator=generator))  # (bits, d), orthonormal columns
        m = q.T.contiguous()  # d x bits, orthonormal rows: a random tight frame
    norm2 = float((x * x).sum()) or 1.0
    orthonormal_columns = bits <= d  # then ||b M^T||^2 = bits and the error needs no decoding
    history: list[float] = []
    for step in range(iterations + 1):
        p = x @ m
        b = torch.where(p >= 0, 1.0, -1.0)
        if orthonormal_columns:
            l1 = p.abs().sum(1)
            s = l1 / bits
            err = max(0.0, 1.0 - float((l1 * l1).sum()) / bits / norm2)
        else:
            dec = _decode(b, m)
            s = _fit_scales(x, dec)
            err = float(((x - s.unsqueeze(1) * dec) ** 2).sum()) / norm2
        history.append(err ** 0.5)
        if step == iterations or (len(history) > 1 and history[-2] - history[-1] < _STOP * history[-2]):
            break
        u, _, vt = torch.linalg.svd(x.T @ (s.unsqueeze(1) * b), full_matrices=False)
        m = u @ vt
    return m, history


def encode_iiq(w: torch.Tensor, config: IIQConfig, context: Context | None = None) -> IIQTable:
    context = context or Context()
    w = check_table(w, "iiq")
    rows, dim = w.shape
    config.check(rows, dim)
    padding_idx, zero_padding = resolve_padding(w, context.padding_idx, config.zero_padding)
    config = dataclasses.replace(config, zero_padding=zero_padding)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    mean = w.double().mean(0).to(torch.float32)
    x = w - mean
    if config.remove:
        cov = x.T.double() @ x.double()
        _, vecs = torch.linalg.eigh(cov)
        directions = rounded(vecs[:, -config.remove:].flip(1).T.to(torch.float32), _HALF)  # (D, d)
        # least squares on the rounded directions: coefficients = x U (U^T U)^-1
        gram = directions.double() @ directions.double().T
        coefficients = rounded((x.double() @ directions.double().T @ torch.linalg.inv(gram)).float(), _HALF)
        x = x - coefficients @ directions
    else:
        directions, coefficients = torch.zeros(0, dim), torch.zeros(rows, 0)
    bits = config.row_bits(dim)
    sample = torch.randperm(rows, generator=generator)[:ITQ_SAMPLE] if rows > ITQ_SAMPLE else torch.arange(rows)
    rotation, history = itq(x[sample], bits, config.iterations, generator)
    rotation = rounded(rotation, _HALF)
    packed = torch.empty(rows, bits // 8, dtype=torch.uint8)
    scales = torch.empty(rows)
    for i in range(0, rows, _BLOCK_ROWS):
        xb = x[i : i + _BLOCK_ROWS]
        positive = xb @ rotation >= 0
        packed[i : i + _BLOCK_ROWS] = pack_bits(positive)
        scales[i : i + _BLOCK_ROWS] = _fit_scales(xb, _decode(positive.to(torch.float32) * 2 - 1, rotation))
    table = IIQTable(packed, rotation, rounded(scales, _HALF), mean, directions, coefficients, config, padding_idx)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        info = {"rel_error": relative_error(w, table.dense_weight()), "bits": bits, "remove": config.remove,
                "itq_rel_error": [round(e, 6) for e in history], "itq_rows": int(sample.numel()),
                "seconds": round(seconds, 3)}
    table._info = info
    return table


def _encode(w: torch.Tensor, config: IIQConfig, context: Context) -> IIQTable:
    return encode_iiq(w, config, context)


METHOD = register(Method(
    name="iiq",
    kind=STRUCTURE,
    config=IIQConfig,
    description="isotropic iterative quantization: one bit a dimension, a learnt rotation and per-row scales "
                "(about 0.035 of float32)",
    encode=_encode,
    table=IIQTable,
    budget_options=("bits",),
    takes_storage=False,
))
