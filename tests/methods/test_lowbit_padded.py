"""The ``lowbit`` storage on a dimension its group size does not divide (a 50-d LSTM, a 300-d GloVe DAN): rows
padded to a whole number of groups, the padded bytes counted, only the first d columns returned, in torch, through a
saved file and in onnxruntime (the table alone: test_lowbit.py's test_onnx_parity); GPTQ: test_lowbit.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embcompress.classifier import Classifier, load_classifier, save_classifier
from embcompress.data import PAD, UNK, LabelSet, Vocab
from embcompress.methods import lowbit as lb
from embcompress.methods.base import BudgetError, StoredTable, get
from embcompress.models import DAN, LSTMClassifier
from embcompress.ops.compress import compress


def _table(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * (0.5 + torch.rand(rows, 1, generator=g))


def _nbytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("dim, group", [(50, 16), (50, 32), (50, 64), (300, 32), (300, 128), (8, 16)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_padded_layout_bytes_and_error_bound(dim: int, group: int, bits: int, scheme: str) -> None:
    w = _table(40, dim, seed=bits)
    w[1, -2:] = torch.tensor([3.0, 2.5])  # a padded group whose real values do not span 0
    config = lb.LowBitConfig(bits=bits, group_size=group, scheme=scheme)
    width, nb = config.width(dim), config.groups(dim)
    assert width == -(-dim // group) * group and width % group == 0 and width > dim
    stored = lb.quantize_lowbit(w, config)
    assert stored[""].shape == (40, width * bits // 8) and stored["_scale"].shape == (40, nb)
    assert _nbytes(stored) == config.stored_bytes(40, dim) == 40 * (width * bits // 8 + 2 * nb +
                                                                     config.zero_bytes(dim))
    deq = lb.dequantize_lowbit(stored, config, (40, dim))
    assert deq.shape == (40, dim)
    s = stored["_scale"].float().abs().repeat_interleave(group, dim=1)[:, :dim]
    slack = 1.0 if scheme == "asym" else 2.0
    assert bool(((w - deq).abs() <= s * (slack / 2) * (1 + 1e-3) + deq.abs() * 2.0**-11 + 1e-7).all())
    # the padding is zeros, stored as the code that decodes to exactly 0 (the zero point)
    codes = lb.unpack(stored[""], bits, width)[:, dim:]
    z = (lb.unpack(stored["_zero"], lb._zero_bits(bits), nb)[:, -1:] if scheme == "asym"
         else torch.full((40, 1), 1 << (bits - 1), dtype=torch.uint8))
    assert torch.equal(codes, z.expand_as(codes))


@pytest.mark.parametrize("refine", [False, True])
def test_padding_changes_no_whole_group_and_fits_the_last_on_its_real_values(refine: bool) -> None:
    """The whole groups of a 50-d table are stored as those of its first 48 columns alone; the padded group's plain
    scale is its real values' range (the zeros add nothing), and refinement does not lose to it there."""
    w = _table(300, 50, seed=5)
    config = lb.LowBitConfig(bits=2, group_size=16, refine=refine)
    full = lb.dequantize_lowbit(lb.quantize_lowbit(w, config), config, (300, 50))
    assert torch.equal(full[:, :48], lb.dequantize_lowbit(lb.quantize_lowbit(w[:, :48], config), config, (300, 48)))
    plain = lb.LowBitConfig(bits=2, group_size=16)
    scale = lb.quantize_lowbit(w, plain)["_scale"][:, -1]
    last = w[:, 48:]
    expected = lb._fp16_up((last.amax(1).clamp(min=0) - last.amin(1).clamp(max=0)) / 3)
    assert torch.equal(scale, expected)
    plain_err = (lb.dequantize_lowbit(lb.quantize_lowbit(w, plain), plain, (300, 50))[:, 48:] - last).pow(2).sum()
    assert float((full[:, 48:] - last).pow(2).sum()) <= float(plain_err) * (1 + 1e-6)


def test_for_budget_on_padded_widths() -> None:
    rows = 100
    per_row = {g: lb.LowBitConfig(bits=4, group_size=g).stored_bytes(1, 300) for g in (16, 32, 64, 128)}
    assert per_row == {16: 200, 32: 185, 64: 173, 128: 200}  # 304, 320, 320, 384 columns stored
    # the finest group whose padded bytes fit, not the first power of 2 that happens to be smaller
    assert lb.LowBitConfig.for_budget(rows, 300, 200 * rows) == lb.LowBitConfig(4, 16)
    assert lb.LowBitConfig.for_budget(rows, 300, 199 * rows) == lb.LowBitConfig(4, 32)
    assert lb.LowBitConfig.for_budget(rows, 300, 184 * rows) == lb.LowBitConfig(4, 64)
    assert lb.LowBitConfig.for_budget(rows, 300, 172 * rows).bits == 3
    assert lb.LowBitConfig.for_budget(rows, 50, 19 * rows) == lb.LowBitConfig(2, 64)
    with pytest.raises(BudgetError, match=f"at least {92 * rows} bytes"):  # 2 bits in groups of 64: 92 a row
        lb.LowBitConfig.for_budget(rows, 300, 92 * rows - 1)
    # a group of 16 still divides 96: it is tried before the padded 64 and 128
    assert lb.LowBitConfig.for_budget(rows, 96, 10**9, bits=4) == lb.LowBitConfig(4, 16)


def _vocab(words: int) -> Vocab:
    return Vocab([PAD, UNK, *(f"w{i}" for i in range(words))])


def _classifier(arch: str, dim: int, path: Path) -> Path:
    torch.manual_seed(dim)
    vocab = _vocab(1000)
    model = (DAN(len(vocab), dim, 2, hidden=(12,)) if arch == "dan" else LSTMClassifier(len(vocab), dim, 6, 2)).eval()
    save_classifier(Classifier(model, vocab, LabelSet(["neg", "pos"])), path)
    return path


@pytest.mark.parametrize("arch, dim", [("lstm", 50), ("dan", 300)])
@pytest.mark.parametrize("bits", [2, 4])
def test_compress_save_load_round_trip(arch: str, dim: int, bits: int, tmp_path: Path) -> None:
    """compress writes the padded tensors and counts their bytes; the loaded classifier computes what its table
    decodes to (the first d columns), in the original's own model."""
    src = _classifier(arch, dim, tmp_path / "dense.safetensors")
    config = lb.LowBitConfig(bits=bits, group_size=32)
    result = compress(src, "lowbit", options={"bits": bits, "group_size": 32}, output=tmp_path / "lb.safetensors")
    original = load_classifier(src)
    V = len(original.vocab)
    table = result.tables[0]
    assert table["bytes"] == config.stored_bytes(V, dim) == V * (config.width(dim) * bits // 8 + 2 * config.groups(
        dim) + config.zero_bytes(dim))
    loaded = load_classifier(result.output)
    emb = loaded.model.embedding
    assert isinstance(emb, StoredTable) and emb.weight.shape == (V, config.width(dim) * bits // 8)
    assert _nbytes({k: v for k, v in emb.tensors().items()}) == table["bytes"]
    W = original.model.embedding.weight.detach()
    decoded = lb.dequantize_lowbit(lb.quantize_lowbit(W, config), config, (V, dim))
    assert torch.equal(emb.dense_weight(), decoded)
    ids = torch.randint(0, V, (5, 7), generator=torch.Generator().manual_seed(1))
    original.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        original.model.embedding.weight.copy_(decoded)
        assert torch.equal(loaded.model(ids), original.model(ids))
    again = load_classifier(result.output)  # a second load reads the same bytes
    again.model.eval()
    with torch.no_grad():
        assert torch.equal(again.model(ids), loaded.model(ids))


def test_classifier_with_a_padded_table_exports(tmp_path: Path) -> None:
    """The whole 50-d LSTM through export_onnx: its parity check passes on the padded GatherBlockQuantized table."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from embcompress import export_onnx

    src = _classifier("lstm", 50, tmp_path / "dense.safetensors")
    out = compress(src, "lowbit", options={"bits": 2, "group_size": 32}, output=tmp_path / "lb.safetensors").output
    report = export_onnx(out, tmp_path / "m.onnx", threads=1, device="cpu", latency=False)
    assert report.parity.fp32_max_abs_diff <= 1e-4
    ops = [n.op_type for n in onnx.load(report.output).graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Slice" in ops
