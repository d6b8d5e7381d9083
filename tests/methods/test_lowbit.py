"""The ``lowbit`` storage: packing, error bounds, row subsets, options, byte budgets, ONNX parity, refinement."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from embcompress.errors import InputError
from embcompress.methods import lowbit as lb
from embcompress.methods.base import BudgetError, StoredTable, get

GLOVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glove" / "glove.6B.50d.sst2.npy"


def _table(rows: int = 300, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * (0.5 + torch.rand(rows, 1, generator=g))


def _rel(w: torch.Tensor, config: lb.LowBitConfig) -> float:
    d = lb.dequantize_lowbit(lb.quantize_lowbit(w, config), config, tuple(w.shape))
    return float((w - d).norm() / w.norm())


def test_registered() -> None:
    assert get("lowbit").config is lb.LowBitConfig
    assert get("lowbit").gather is lb.gather_lowbit


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 64), generator=g, dtype=torch.uint8)
    packed = lb.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 64 * bits // 8)
    assert torch.equal(lb.unpack(packed, bits, 64), codes)
    zb = lb._zero_bits(bits)
    for n in (1, 3, 5, 12):  # zero points: any number of groups, padded to whole bytes
        z = torch.randint(0, 1 << zb, (4, n), generator=g, dtype=torch.uint8)
        assert torch.equal(lb.unpack(lb.pack_padded(z, zb), zb, n), z)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_big_endian_fallback(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    codes = torch.randint(0, 1 << bits, (3, 32), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    fast = lb.pack(codes, bits)
    monkeypatch.setattr(lb.sys, "byteorder", "big")
    assert torch.equal(lb.pack(codes, bits), fast)


def test_threads_restored_and_same_result() -> None:
    w = _table(rows=3000, dim=256)
    config = lb.LowBitConfig(bits=2, group_size=32)
    before = torch.get_num_threads()
    many = lb.quantize_lowbit(w, config)  # several blocks, on worker threads when torch has more than one
    assert torch.get_num_threads() == before
    one = {k: torch.cat([lb.quantize_lowbit(w[i : i + 500], config)[k] for i in range(0, 3000, 500)]) for k in many}
    assert all(torch.equal(many[k], one[k]) for k in many)


def test_layout_low_bits_first() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert lb.pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 255]]
    assert lb.pack(torch.tensor([[1, 15, 7, 0]], dtype=torch.uint8), 4).tolist() == [[0xF1, 0x07]]
    c3 = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    v = sum(i << (3 * i) for i in range(8))
    assert lb.pack(c3, 3).tolist() == [[v & 255, (v >> 8) & 255, v >> 16]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_error_bound(bits: int, scheme: str) -> None:
    w = _table()
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = torch.linspace(0.1, 2.0, 32)  # a group that does not span 0
    config = lb.LowBitConfig(bits=bits, group_size=32, scheme=scheme)
    stored = lb.quantize_lowbit(w, config)
    assert set(stored) == ({"", "_scale", "_zero"} if scheme == "asym" else {"", "_scale"})
    assert stored["_scale"].dtype == torch.float16
    assert sum(t.numel() * t.element_size() for t in stored.values()) == config.stored_bytes(*w.shape)
    deq = lb.dequantize_lowbit(stored, config, tuple(w.shape))
    s = stored["_scale"].float().abs().repeat_interleave(32, dim=1)
    # plain min/max: |w - deq| <= s/2 (asym; sym: s for the values opposite the largest one), plus the fp16
    # rounding of the decoded value
    slack = 1.0 if scheme == "asym" else 2.0
    bound = s * (slack / 2) * (1 + 1e-3) + deq.abs() * 2.0**-11 + 1e-7
    assert bool(((w - deq).abs() <= bound).all())
    assert float(deq[0, :32].abs().max()) == 0.0


def test_rows_subset_equals_full() -> None:
    w = _table(rows=200, dim=96)
    for config in (lb.LowBitConfig(bits=3, group_size=32), lb.LowBitConfig(bits=2, group_size=16, scheme="sym")):
        stored = lb.quantize_lowbit(w, config)
        full = lb.dequantize_lowbit(stored, config, (200, 96))
        ids = torch.tensor([5, 0, 199, 5, 77])
        sub = lb.dequantize_lowbit({k: v[ids] for k, v in stored.items()}, config, (5, 96))
        assert torch.equal(sub, full[ids])
        table = StoredTable(get("lowbit"), config, stored, 200, 96)
        assert torch.equal(table(ids.reshape(1, 5)), full[ids].reshape(1, 5, 96))
        assert torch.equal(table.dense_weight(), full)


def test_leading_dims_kept() -> None:
    w = torch.randn(4, 5, 32)
    config = lb.LowBitConfig(bits=4, group_size=16)
    stored = lb.quantize_lowbit(w, config)
    assert stored[""].shape == (20, 16)
    assert lb.dequantize_lowbit(stored, config, (4, 5, 32)).shape == (4, 5, 32)


@pytest.mark.parametrize("options, message", [
    ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
    ({"bits": 16}, "bits must be one of"),
    ({"bits": True}, "bits must be one of"),
    ({"group_size": 8}, "power of 2 and at least 16"),
    ({"group_size": 48}, "power of 2 and at least 16"),
    ({"scheme": "nf4"}, "scheme must be one of asym, sym"),
    ({"refine": "yes"}, "refine must be true or false"),
])
def test_bad_options_refused(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        lb.LowBitConfig.from_dict(options)


def test_bad_tensors_refused() -> None:
    with pytest.raises(InputError, match="dimension of at least 1, got 0") as e:
        lb.quantize_lowbit(torch.randn(3, 0), lb.LowBitConfig(group_size=32))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="NaN or Inf"):
        lb.quantize_lowbit(torch.tensor([[float("nan")] * 16]), lb.LowBitConfig(group_size=16))
    with pytest.raises(InputError, match="floating"):
        lb.quantize_lowbit(torch.ones(2, 16, dtype=torch.int64), lb.LowBitConfig(group_size=16))


def test_stored_bytes_and_fraction() -> None:
    rows, dim = 30522, 384
    two = lb.LowBitConfig(bits=2, group_size=32)
    nb = dim // 32
    assert two.stored_bytes(rows, dim) == rows * (dim // 4 + 2 * nb + nb // 4)
    assert two.stored_bytes(rows, dim) / (4 * rows * dim) <= 0.094
    assert lb.LowBitConfig(bits=3, group_size=32).stored_bytes(rows, dim) == rows * (dim * 3 // 8 + 2 * nb + nb // 2)
    assert lb.LowBitConfig(bits=8, group_size=128, scheme="sym").stored_bytes(rows, dim) == rows * (dim + 2 * 3)
    # 2-bit zero points of 3 groups still take one byte a row
    assert lb.LowBitConfig(bits=2, group_size=128).stored_bytes(1, 384) == 96 + 6 + 1


def test_for_budget() -> None:
    rows, dim = 1000, 384
    cfg = lambda **kw: lb.LowBitConfig(**kw).stored_bytes(rows, dim)  # noqa: E731
    # the most bits first, then the finest group whose bytes fit
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=8, group_size=16)) == lb.LowBitConfig(8, 16)
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=8, group_size=64)) == lb.LowBitConfig(8, 64)
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=8, group_size=128) - 1) == lb.LowBitConfig(4, 16)
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=4, group_size=32) - 1) == lb.LowBitConfig(4, 64)
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=3, group_size=32)).bits == 3
    assert lb.LowBitConfig.for_budget(rows, dim, cfg(bits=2, group_size=128)) == lb.LowBitConfig(2, 128)
    with pytest.raises(BudgetError, match="lowbit needs at least"):
        lb.LowBitConfig.for_budget(rows, dim, cfg(bits=2, group_size=128) - 1)
    # options given are kept
    fixed = lb.LowBitConfig.for_budget(rows, dim, 10**9, bits=2, scheme="sym")
    assert fixed == lb.LowBitConfig(2, 16, "sym")
    assert lb.LowBitConfig.for_budget(rows, dim, 10**9, group_size=32).group_size == 32
    # no power of 2 >= 16 divides 50: the rows are padded (see test_lowbit_padded.py)
    assert lb.LowBitConfig.for_budget(rows, 50, 10**9) == lb.LowBitConfig(8, 16)


def _relative_errors(w: torch.Tensor, bits: int, group_size: int) -> tuple[float, float]:
    plain = _rel(w, lb.LowBitConfig(bits=bits, group_size=group_size))
    refined = _rel(w, lb.LowBitConfig(bits=bits, group_size=group_size, refine=True))
    return plain, refined


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_refine_lowers_error_gaussian(bits: int) -> None:
    w = torch.randn(400, 128, generator=torch.Generator().manual_seed(1))
    plain, refined = _relative_errors(w, bits, 32)
    assert refined < plain * (0.93 if bits == 2 else 0.99), (plain, refined)


def test_refine_sym_never_worse() -> None:
    w = _table(rows=200, dim=64)
    for bits in (2, 4):
        plain = _rel(w, lb.LowBitConfig(bits=bits, group_size=16, scheme="sym"))
        refined = _rel(w, lb.LowBitConfig(bits=bits, group_size=16, scheme="sym", refine=True))
        assert refined < plain


@pytest.mark.skipif(not GLOVE.exists(), reason="GloVe rows (../shared/data/glove) absent")
def test_refine_lowers_error_glove() -> None:
    w = torch.from_numpy(np.load(GLOVE)[:3000, :48].copy())  # 50-d vectors: 48 columns, groups of 16
    for bits in (2, 4):
        plain, refined = _relative_errors(w, bits, 16)
        assert refined < plain * 0.995, (bits, plain, refined)


def _export(table: torch.nn.Module, ids: torch.Tensor, opset: int) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(table, (ids,), f, dynamo=False, opset_version=opset, input_names=["ids"],
                          output_names=["out"], dynamic_axes={"ids": {0: "batch", 1: "seq"}},
                          custom_opsets={"com.microsoft": 1})
    return f.getvalue()


@pytest.mark.parametrize("dim, bits, scheme, opset", [
    (96, 2, "asym", 17), (96, 4, "asym", 18), (96, 8, "asym", 20), (96, 2, "sym", 17), (96, 4, "sym", 19),
    # no group of 32 divides 50 or 300: rows padded to 64 and 320, then a Slice to d columns after the Cast
    (50, 2, "asym", 17), (50, 4, "sym", 18), (300, 2, "asym", 17), (300, 4, "asym", 20), (300, 8, "sym", 19),
])
def test_onnx_parity(dim: int, bits: int, scheme: str, opset: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    rows = 257
    config = lb.LowBitConfig(bits=bits, group_size=32, scheme=scheme)
    stored = lb.quantize_lowbit(_table(rows, dim, seed=bits + dim), config)
    table = StoredTable(get("lowbit"), config, stored, rows, dim)
    data = _export(table, torch.zeros(2, 3, dtype=torch.long), opset)
    model = onnx.load_from_string(data)
    ops = [n.op_type for n in model.graph.node if n.op_type != "Constant"]
    assert ops == ["GatherBlockQuantized", "Cast"] + (["Slice"] if dim % 32 else [])
    # the file holds the stored bytes themselves
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert sorted(inits) == sorted(f"weight{k}" for k in stored)
    for k, v in stored.items():
        assert np.array_equal(inits[f"weight{k}"], v.numpy()), k
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, rows, (4, 9), generator=torch.Generator().manual_seed(3))
    ids[0, 0], ids[-1, -1] = 0, rows - 1
    out = session.run(None, {"ids": ids.numpy()})[0]
    assert out.dtype == np.float32 and out.shape == (4, 9, dim)
    np.testing.assert_array_equal(out, table(ids).numpy())


def test_onnx_three_bits_refused() -> None:
    pytest.importorskip("onnx")
    config = lb.LowBitConfig(bits=3, group_size=32)
    table = StoredTable(get("lowbit"), config, lb.quantize_lowbit(_table(20, 64), config), 20, 64)
    with pytest.raises(InputError, match="3-bit lowbit table has no onnxruntime kernel"):
        _export(table, torch.zeros(1, 2, dtype=torch.long), 17)


@pytest.mark.parametrize("dim", [128, 50])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_gptq_keeps_the_product_better_than_rounding_in_the_same_layout(scheme: str, act_order: bool,
                                                                        dim: int) -> None:
    """GPTQ's codes give a smaller output error (w - w_q) @ x than nearest rounding on inputs with large and
    correlated channels, in tensors of the very shapes and dtypes quantize_lowbit stores (for 50 columns, padded to
    64 as quantize_lowbit pads them, the padding at the zero point)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / 8 + torch.eye(dim)
    x = (torch.randn(2000, dim, generator=g) @ mix) * (1 + 9 * (torch.rand(dim, generator=g) > 0.9))
    hessian = (x.T.double() @ x.double()) / x.shape[0]
    config = lb.LowBitConfig(bits=4, group_size=32, scheme=scheme)
    plain = lb.quantize_lowbit(w, config)
    gptq = lb.quantize_lowbit_gptq(w, config, hessian, act_order=act_order)
    assert {k: (v.shape, v.dtype) for k, v in gptq.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    width, nb = config.width(dim), config.groups(dim)
    pad = lb.unpack(gptq[""], 4, width)[:, dim:]
    z = lb.unpack(gptq["_zero"], 4, nb)[:, -1:] if scheme == "asym" else torch.full((48, 1), 8, dtype=torch.uint8)
    assert pad.shape[1] == width - dim and torch.equal(pad, z.expand_as(pad))

    def out_error(stored: dict[str, torch.Tensor]) -> float:
        return float(((w - lb.dequantize_lowbit(stored, config, tuple(w.shape))) @ x.T).norm())

    bar = 0.8 if dim == 128 else 0.85  # 50 columns: fewer left to take each rounding error
    assert out_error(gptq) < bar * out_error(plain)
    with pytest.raises(InputError, match=f"{dim} x {dim} Hessian"):
        lb.quantize_lowbit_gptq(w, config, hessian[:16, :16])
