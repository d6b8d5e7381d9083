import json
import math
from pathlib import Path

import pytest

from embcompress import inspect_checkpoint
from embcompress.cli.main import main
from embcompress.cost import (
    beats_quantization_in_bytes,
    compare_layouts,
    dense_cost,
    equal_bytes_rank,
    equal_bytes_reduction,
    factorized_cost,
    factorized_quantized_cost,
    lookup_extra_macs,
    output_flops_break_even_rank,
    params_break_even_rank,
    quantized_cost,
    saves_output_flops,
    saves_params,
)

V, D, K = 1000, 100, 10


def test_hand_computed_costs() -> None:
    dense = dense_cost(V, D)
    assert (dense.params, dense.scales, dense.bytes) == (100_000, 0, 400_000)
    assert (dense.lookup_macs, dense.output_macs) == (0, 100_000)
    assert (dense.lookup_scale_mults, dense.output_scale_mults) == (0, 0)

    int8 = quantized_cost(V, D, 8)
    assert (int8.params, int8.scales, int8.bytes) == (100_000, 1000, 100_000 + 4000)
    assert (int8.lookup_macs, int8.lookup_scale_mults, int8.output_macs, int8.output_scale_mults) == (0, 100, 100_000,
                                                                                                      1000)
    fp16 = quantized_cost(V, D, 16)
    assert (fp16.bytes, fp16.scales, fp16.output_scale_mults) == (200_000, 0, 0)

    fact = factorized_cost(V, D, K)
    assert (fact.params, fact.bytes) == (11_000, 44_000)
    assert (fact.lookup_macs, fact.output_macs) == (1000, 11_000)
    assert fact.lookup_flops == 1000 and fact.output_flops == 11_000

    both = factorized_quantized_cost(V, D, K, 8)
    assert (both.params, both.scales, both.bytes) == (11_000, 1010, 11_000 + 4040)
    assert (both.lookup_macs, both.lookup_scale_mults, both.output_macs, both.output_scale_mults) == (1000, 20, 11_000,
                                                                                                     1010)
    assert factorized_quantized_cost(V, D, K, 16).bytes == 22_000


def test_params_and_flops_break_even() -> None:
    assert params_break_even_rank(V, D) == pytest.approx(100_000 / 1100)
    assert output_flops_break_even_rank(V, D) == params_break_even_rank(V, D)
    assert saves_params(V, D, 90) and not saves_params(V, D, 91)
    # the identity: at an integer break-even rank the factors hold exactly as many numbers (and MACs) as W
    assert params_break_even_rank(6, 3) == 2 and not saves_params(6, 3, 2) and saves_params(6, 3, 1)
    assert factorized_cost(6, 3, 2).params == dense_cost(6, 3).params
    assert factorized_cost(6, 3, 2).output_macs == dense_cost(6, 3).output_macs
    for v, d in ((1000, 100), (50, 300), (7, 7), (30522, 384)):
        be = params_break_even_rank(v, d)
        for k in range(1, min(v, d) + 1):
            assert saves_params(v, d, k) == (k < be) == saves_output_flops(v, d, k)
            assert factorized_cost(v, d, k).lookup_macs == lookup_extra_macs(d, k) > dense_cost(v, d).lookup_macs


def test_equal_bytes_against_quantization() -> None:
    # without scales (float16 against float32 factors): (q / f) V d / (V + d), i.e. R = 1 - q / f exactly
    assert equal_bytes_rank(V, D, 16, 32) == pytest.approx(0.5 * V * D / (V + D))
    assert equal_bytes_reduction(V, D, 16, 32) == pytest.approx(0.5)
    # int8 against float32 factors: the dense code carries V scales, R = 1 - 8/32 - 1/d
    assert equal_bytes_rank(V, D, 8, 32) == pytest.approx((V * D * 8 + V * 32) / ((V + D) * 32))
    assert equal_bytes_reduction(V, D, 8, 32) == pytest.approx(0.75 - 1 / D)
    for q, f in ((8, 32), (16, 32), (8, 16), (8, 8), (16, 16)):
        k_eq = equal_bytes_rank(V, D, q, f)
        for k in range(1, D + 1):
            assert beats_quantization_in_bytes(V, D, k, q, f) == (k < k_eq), (q, f, k)
    # an integer equal-bytes rank gives equal bytes
    k_eq = equal_bytes_rank(6, 3, 16, 32)
    assert k_eq == 1 and factorized_cost(6, 3, 1, 32).bytes == quantized_cost(6, 3, 16).bytes
    # at equal width, "beats quantization" is the parameter break-even
    assert equal_bytes_rank(V, D, 16, 16) == pytest.approx(params_break_even_rank(V, D))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        factorized_cost(V, D, 0)
    with pytest.raises(ValueError):
        dense_cost(0, D)
    with pytest.raises(ValueError):
        quantized_cost(V, D, 0)


def test_compare_layouts() -> None:
    def energy(k: int) -> float:
        return k / D  # a flat spectrum: error sqrt(1 - k/d)

    report = compare_layouts(V, D, bits=32, energy_kept=energy, quant_errors={8: 0.01, 16: 0.0002})
    names = [r.name for r in report.rows]
    assert names == ["dense fp32", "int8", "fp16", "R 50 %", "R 50 % + int8", "R 50 % + fp16", "R 70 %",
                     "R 70 % + int8", "R 70 % + fp16", "R 90 %", "R 90 % + int8", "R 90 % + fp16"]
    rows = {r.name: r for r in report.rows}
    assert rows["dense fp32"].ratio == 1 and rows["int8"].bytes == 104_000 and rows["int8"].rel_error == 0.01
    assert rows["R 90 %"].rank == 9 and rows["R 90 %"].rel_error == pytest.approx(math.sqrt(1 - 9 / D))
    assert rows["R 90 % + int8"].bytes == 9 * 1100 + 4 * 1009 and rows["R 90 % + int8"].rel_error is None
    assert report.params_break_even_rank == pytest.approx(90.909, abs=1e-3) and report.lookup_extra_macs_per_rank == D
    int8, fp16 = report.equal_bytes
    assert int8.quant_bits == 8 and int8.factor_rank == math.floor(equal_bytes_rank(V, D, 8, 32))
    assert int8.winner == "quantization" and int8.factor_rel_error == pytest.approx(math.sqrt(1 - int8.factor_rank / D))
    # a table of rank 1 compresses losslessly by factorization: it wins at equal bytes
    exact = compare_layouts(V, D, energy_kept=lambda k: 1.0, quant_errors={8: 0.01, 16: 0.0002})
    assert [e.winner for e in exact.equal_bytes] == ["factorization", "factorization"]
    # a float16 table: no fp16 layout, int8 against 16-bit factors
    half = compare_layouts(V, D, bits=16)
    assert [r.name for r in half.rows][:2] == ["dense fp16", "int8"] and len(half.equal_bytes) == 1
    assert half.equal_bytes[0].winner is None
    json.dumps(report.to_dict())


def test_inspect_shows_the_cost_model(hf_folder: Path, capsys) -> None:
    report = inspect_checkpoint(hf_folder)
    cost = report.tables[0].cost
    assert cost["V"] == 1000 and cost["d"] == 32 and cost["bits"] == 32
    rows = {r["name"]: r for r in cost["rows"]}
    assert rows["int8"]["rel_error"] is not None and 0 < rows["fp16"]["rel_error"] < rows["int8"]["rel_error"] < 0.02
    assert rows["R 90 %"]["rel_error"] == pytest.approx(report.tables[0].projections[2].rel_error)
    assert [e["quant_bits"] for e in cost["equal_bytes"]] == [8, 16]
    assert main(["inspect", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    assert "Cost model" in out and "R 90 % + int8" in out and "iff k <" in out
    assert main(["inspect", str(hf_folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tables"][0]["cost"]["rows"][0]["name"] == "dense fp32"


def test_inspect_a_quantized_file(dan_file: Path, capsys) -> None:
    assert main(["quantize", str(dan_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["output"]
    report = inspect_checkpoint(out)
    assert report.quantized["bits"] == 8 and report.tables == [] and "quantized" in report.note
    assert main(["inspect", out]) == 0
    assert "quantized (8-bit)" in capsys.readouterr().out
