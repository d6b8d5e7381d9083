"""The ``iiq`` structure: bit packing, lookups, file round trip, bytes, error trends, ITQ's descent, options,
budgets, padding, recovery and ONNX parity."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from safetensors.torch import load, save

from embcompress.errors import InputError
from embcompress.methods import iiq
from embcompress.methods.base import BudgetError, Context, get


def _table(rows: int = 800, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Anisotropic rows with a shared offset and two dominant directions, like a trained embedding table."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    scales = torch.linspace(1.0, 0.2, dim)
    scales[:2] = torch.tensor([4.0, 3.0])
    return (torch.randn(rows, dim, generator=g) * scales) @ basis + 0.5 * torch.randn(dim, generator=g)


def _encode(w: torch.Tensor, padding_idx: int | None = None, **options: object) -> iiq.IIQTable:
    return iiq.encode_iiq(w, iiq.IIQConfig(**{"iterations": 20, **options}), Context(padding_idx=padding_idx))


def _entry(table: iiq.IIQTable) -> dict:
    return {"config": table.config().to_dict(), "shape": [table.num_embeddings, table.embedding_dim],
            "padding_idx": table.padding_idx}


def test_registered() -> None:
    method = get("iiq")
    assert method.kind == "structure" and method.config is iiq.IIQConfig and method.table is iiq.IIQTable


def test_pack_unpack() -> None:
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(5, 24, generator=g) > 0.5
    packed = iiq.pack_bits(positive)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3)
    assert torch.equal(iiq.unpack_bits(packed), positive.float() * 2 - 1)
    assert iiq.pack_bits(torch.tensor([[True] + [False] * 7])).tolist() == [[128]]  # most significant bit first


def test_forward_matches_dense_rows() -> None:
    table = _encode(_table())
    ids = torch.randint(0, 800, (2, 5), generator=torch.Generator().manual_seed(1))
    dense = table.dense_weight()
    assert dense.shape == (800, 32)
    torch.testing.assert_close(table(ids), dense[ids], rtol=0, atol=1e-6)
    assert 0 < table.info()["rel_error"] < 1


@pytest.mark.parametrize("options", [{}, {"bits": 64}, {"bits": 16, "remove": 0}])
def test_file_round_trip_identical(options: dict) -> None:
    table = _encode(_table(), **options)
    tensors = table.tensors()
    bits = options.get("bits", 32)
    assert tensors["bits"].dtype == torch.uint8 and tensors["bits"].shape == (800, bits // 8)
    assert tensors["rotation"].dtype == torch.float16 and tensors["rotation"].shape == (32, bits)
    assert tensors["scales"].dtype == torch.float16 and tensors["mean"].dtype == torch.float32
    assert ("directions" in tensors) == (table.remove > 0)
    again = iiq.IIQTable.from_tensors(load(save(tensors)), _entry(table))
    ids = torch.arange(800)
    assert torch.equal(again(ids), table(ids))


@pytest.mark.parametrize("options", [{}, {"bits": 64}, {"bits": 8, "remove": 0}, {"remove": 5}])
def test_stored_bytes_as_planned(options: dict) -> None:
    config = iiq.IIQConfig(**{"iterations": 2, **options})
    table = iiq.encode_iiq(_table(), config, Context())
    nbytes = sum(t.numel() * t.element_size() for t in table.tensors().values())
    assert table.stored_bytes() == nbytes == config.stored_bytes(800, 32)


def test_about_three_hundredths_at_one_bit() -> None:
    rows, dim = 30522, 384
    fraction = iiq.IIQConfig().stored_bytes(rows, dim) / (4 * rows * dim)
    assert 0.031 < fraction < 0.042, fraction
    big = iiq.IIQConfig(remove=0).stored_bytes(250002, 768) / (4 * 250002 * 768)
    assert big < 0.034, big


def test_error_falls_with_bits() -> None:
    w = _table()
    errors = [_encode(w, bits=b).info()["rel_error"] for b in (8, 16, 32, 64, 128)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_itq_descends_and_beats_plain_signs() -> None:
    w = _table()
    table = _encode(w, remove=0, iterations=30)
    history = table.info()["itq_rel_error"]
    assert len(history) > 2
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:])), history  # bits <= d: never increases
    assert history[-1] < 0.97 * history[0]
    # plain binarisation: sign of the centred table, best scale per row
    x = w - w.mean(0)
    b = torch.sign(x)
    s = (x * b).sum(1) / (b * b).sum(1)
    plain = float((x - s.unsqueeze(1) * b).norm() / w.norm())
    assert table.info()["rel_error"] < 0.9 * plain, (table.info()["rel_error"], plain)
    assert _encode(w).info()["rel_error"] < table.info()["rel_error"]  # removing the dominant directions helps


def test_bad_options_refused() -> None:
    for options, message in (({"bits": 12}, "multiple of 8"), ({"bits": 0}, "multiple of 8"),
                             ({"remove": -1}, "at least 0"), ({"iterations": -2}, "at least 0"),
                             ({"bits": "8"}, "integer")):
        with pytest.raises(InputError, match=message):
            iiq.IIQConfig(**options)
    with pytest.raises(InputError, match="remove 32 must be below the table's 32 dims"):
        _encode(_table(), remove=32)
    with pytest.raises(InputError, match="unknown option"):
        iiq.IIQConfig.from_dict({"centroids": 3})
    with pytest.raises(InputError, match="2-D floating"):
        _encode(torch.ones(10, dtype=torch.float32))


def test_for_budget() -> None:
    rows, dim = 30522, 384
    f32 = 4 * rows * dim
    for fraction in (0.04, 0.08, 0.12):
        config = iiq.IIQConfig.for_budget(rows, dim, int(fraction * f32))
        assert config.bits % 8 == 0 and config.stored_bytes(rows, dim) <= fraction * f32
        assert iiq.IIQConfig(bits=config.bits + 8).stored_bytes(rows, dim) > fraction * f32
    assert iiq.IIQConfig.for_budget(rows, dim, int(0.0416 * f32)).bits == 384  # one bit a dimension: 0.0415
    assert iiq.IIQConfig.for_budget(rows, dim, int(0.6 * f32)).bits == 4 * 384  # at most 4 bits a dimension
    assert iiq.IIQConfig.for_budget(rows, dim, int(0.04 * f32), bits=128).bits == 128
    with pytest.raises(BudgetError, match="iiq needs at least"):
        iiq.IIQConfig.for_budget(rows, dim, 3 * rows)
    with pytest.raises(BudgetError, match="over the budget"):
        iiq.IIQConfig.for_budget(rows, dim, int(0.01 * f32), bits=384)


def test_padding_row() -> None:
    w = _table()
    w[3] = 0.0
    table = _encode(w, padding_idx=3)
    assert table.config().zero_padding is True
    assert torch.equal(table.dense_weight()[3], torch.zeros(32))
    kept = _encode(_table(), padding_idx=3)
    assert kept.config().zero_padding is False


def test_recoverable() -> None:
    table = _encode(_table())
    names = {n for n, p in table.named_parameters() if any(p is q for q in table.recoverable())}
    assert names == {"rotation", "scales", "mean", "directions", "coefficients"}
    table(torch.tensor([1, 2])).sum().backward()
    assert table.rotation.grad is not None and table.scales.grad is not None
    assert "bits" not in names


def test_onnx_parity() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Wrap(torch.nn.Module):
        def __init__(self, table: torch.nn.Module) -> None:
            super().__init__()
            self.table = table

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table(ids)

    table = _encode(_table(), bits=40)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(table).eval(), (torch.zeros(2, 3, dtype=torch.int64),), f, dynamo=False,
                          opset_version=17, input_names=["ids"], output_names=["out"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 800, (3, 11), generator=torch.Generator().manual_seed(2))
    got = session.run(None, {"ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), table(ids).detach(), rtol=1e-5, atol=1e-5)
