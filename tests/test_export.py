import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from embcompress import export_onnx, factorize  # noqa: E402
from embcompress.classifier import Classifier, load_classifier, save_classifier  # noqa: E402
from embcompress.errors import DataError, DependencyError, InputError, OutputError  # noqa: E402
from embcompress.export import DANExport, LSTMExport, ParityError, make_session  # noqa: E402
from embcompress.models import DAN, LSTMClassifier  # noqa: E402
from embcompress.runtime import MISSING, execution_providers  # noqa: E402
from embcompress.train.loop import TrainConfig  # noqa: E402
from embcompress.train.run import train_classifier  # noqa: E402
from tests.builders import write_sentiment_jsonl  # noqa: E402

ONE_EPOCH = dict(epochs=1, batch_size=16, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny trained classifiers: dense and factorized DAN and LSTM, and a hand-built 2-layer BiLSTM."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export-models")
    data = write_sentiment_jsonl(root / "train.jsonl", 160)
    dan = train_classifier(data, None, root / "dan.safetensors", embed_dim=8, config=TrainConfig(**ONE_EPOCH)).output
    lstm = train_classifier(data, None, root / "lstm.safetensors", arch="lstm", embed_dim=8, hidden_dim=8,
                            config=TrainConfig(**ONE_EPOCH)).output
    clf = load_classifier(lstm)
    torch.manual_seed(0)
    bi = LSTMClassifier(len(clf.vocab), 8, 6, 2, num_layers=2, bidirectional=True).eval()
    save_classifier(Classifier(bi, clf.vocab, clf.labels), root / "bilstm.safetensors")
    return {
        "data": data,
        "dan": Path(dan),
        "dan_k3": Path(factorize(dan, rank=3, output=root / "dan.k3.safetensors").output),
        "lstm": Path(lstm),
        "lstm_k3": Path(factorize(lstm, rank=3, output=root / "lstm.k3.safetensors").output),
        "bilstm": root / "bilstm.safetensors",
    }


def _export(src: Path, out: Path, **kw):
    return export_onnx(src, out, threads=1, device="cpu", **kw)


def _logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    return make_session(path, device="cpu", threads=1).run(["logits"], {"input_ids": ids.numpy()})[0]


def _ids(clf: Classifier, lengths: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, len(clf.vocab), (n,), generator=g)
    return ids


@pytest.mark.parametrize("name", ["dan", "dan_k3", "lstm", "lstm_k3", "bilstm"])
def test_export_parity_checker_and_dynamic_axes(models, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.onnx"
    report = _export(models[name], out)
    assert out.is_file() and report.output == str(out) and report.file_bytes == out.stat().st_size
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert report.checker == "passed" and report.opset == 17
    assert [(t.name, t.dtype, t.shape) for t in report.inputs] == [("input_ids", "int64", ["batch", "seq"])]
    assert [(t.name, t.dtype, t.shape) for t in report.outputs] == [("logits", "float32", ["batch", 2])]
    assert report.parity.fp32_max_abs_diff <= 1e-4 and report.parity.fp32_agreement == 1.0
    assert len({tuple(b) for b in report.parity.batches}) >= 4  # several batch sizes and lengths
    assert report.factorized == name.endswith("k3") and report.rank == (3 if name.endswith("k3") else None)
    props = {p.key: p.value for p in model.metadata_props}
    clf = load_classifier(models[name])
    assert json.loads(props["embcompress.labels"]) == ["neg", "pos"]
    assert json.loads(props["embcompress.vocab"]) == clf.vocab.tokens
    # two shapes that were never traced, with padding of different lengths
    for lengths in ([3], [11, 1, 6, 11, 4]):
        ids = _ids(clf, lengths, seed=len(lengths))
        expected = clf.model.eval()(ids, torch.tensor(lengths)).detach().numpy()
        np.testing.assert_allclose(_logits(out, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bidirectional,layers", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_padded_lstm_wrapper_equals_packed_model(bidirectional: bool, layers: int) -> None:
    torch.manual_seed(layers)
    model = LSTMClassifier(30, 5, 4, 3, num_layers=layers, bidirectional=bidirectional).eval()
    lengths = [7, 1, 3, 7, 5]
    ids = torch.zeros(5, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, 30, (n,))
    with torch.no_grad():
        torch.testing.assert_close(LSTMExport(model)(ids), model(ids, torch.tensor(lengths)), atol=1e-6, rtol=0)


def test_factorized_wrappers_equal_model_with_and_without_folding(models) -> None:
    ids = torch.tensor([[5, 9, 0, 0], [3, 4, 7, 8], [6, 0, 0, 0]])
    for name, wrapper in (("dan_k3", DANExport), ("lstm_k3", LSTMExport)):
        model = load_classifier(models[name]).model.eval()
        with torch.no_grad():
            expected = model(ids, (ids != 0).sum(1))
            torch.testing.assert_close(wrapper(model)(ids), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(wrapper(model, fold=False)(ids), expected, atol=1e-5, rtol=0)


def _shapes(model) -> tuple[dict[str, list], dict[str, list]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return values, inits


@pytest.mark.parametrize("fold", [True, False])
def test_factorized_dan_projects_after_the_mean(models, tmp_path: Path, fold: bool) -> None:
    """The product with W_b (alone, or folded into the first layer) takes a [batch, k] input: once per example."""
    out = tmp_path / "f.onnx"
    report = _export(models["dan_k3"], out, fold_projection=fold)
    assert "before the projection" in report.graph or "once per example" in report.graph
    model = onnx.load(str(out))
    values, inits = _shapes(model)
    clf = load_classifier(models["dan_k3"])
    V, d, k = len(clf.vocab), clf.model.config["embed_dim"], 3
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and inits.get(n.input[0]) == [V, k]]
    assert len(gathers) == 1  # the lookup reads the k-dim rows of W_a
    assert values[gathers[0].output[0]] == ["batch", "seq", k]
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                and any(inits.get(i, [None])[-1 if n.op_type == "Gemm" else 0] == k for i in n.input[1:2])]
    assert len(products) == 1
    assert values[products[0].input[0]] == ["batch", k]
    weight = inits[products[0].input[1]]
    assert weight == ([1024, k] if fold else [k, d])  # folded: W_1 W_b^T; else W_b itself
    assert not any(dims == [1024, d] for dims in inits.values()) if fold else True


@pytest.mark.parametrize("name", ["dan_k3", "lstm"])
def test_int8_and_fp16_report_agreement(models, tmp_path: Path, name: str) -> None:
    fp32 = _export(models[name], tmp_path / "f32.onnx")
    q = _export(models[name], tmp_path / "q.onnx", quantize="int8")
    h = _export(models[name], tmp_path / "h.onnx", quantize="fp16")
    q4 = _export(models[name], tmp_path / "q4.onnx", quantize="int4")
    for report in (q, h, q4):
        onnx.checker.check_model(str(report.output))
        assert report.parity.fp32_max_abs_diff <= 1e-4  # the float32 graph is always checked first
        assert report.parity.agreement >= 0.9 and report.parity.max_abs_diff < 0.1
        assert report.fp32_file_bytes == fp32.file_bytes and report.notes
        assert [(t.name, t.dtype) for t in report.inputs + report.outputs] == [("input_ids", "int64"),
                                                                               ("logits", "float32")]
    graph = onnx.load(q.output).graph
    ops = {n.op_type for n in graph.node}
    assert "DequantizeLinear" in ops and not {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeLSTM"} & ops
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert gathers  # the embedding table is int8 rows (methods.int8), its scales gathered beside it
    if name == "lstm":
        lstm = next(n for n in graph.node if n.op_type == "LSTM")
        producers = {o: n.op_type for n in graph.node for o in n.output}
        assert producers[lstm.input[1]] == "DequantizeLinear"  # int8 weights, float activations
    ops4 = {n.op_type for n in onnx.load(q4.output).graph.node}
    assert not {"DynamicQuantizeLinear", "MatMulInteger"} & ops4 and "DequantizeLinear" in ops4
    h_types = {i.data_type for i in onnx.load(h.output).graph.initializer if len(i.dims) == 2}
    assert h_types == {onnx.TensorProto.FLOAT16}
    if name.startswith("dan"):  # the LSTM is too small for its size to be dominated by weights
        assert h.file_bytes < 0.6 * fp32.file_bytes and q.file_bytes < 0.35 * fp32.file_bytes


def test_parity_texts_from_data(models, tmp_path: Path) -> None:
    report = _export(models["lstm_k3"], tmp_path / "m.onnx", data=models["data"])
    assert report.parity.examples == 160 and "160 texts" in report.parity.source
    assert report.parity.fp32_max_abs_diff <= 1e-4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good"}\n{"label": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        _export(models["dan"], tmp_path / "n.onnx", data=bad)


def test_outputs_default_force_and_refusals(models, tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    src.write_bytes(models["dan_k3"].read_bytes())
    report = export_onnx(src, quantize="fp16", threads=1, device="cpu")
    assert report.output == str(tmp_path / "m.fp16.onnx")
    with pytest.raises(OutputError, match="already exists"):
        export_onnx(src, quantize="fp16", threads=1)
    export_onnx(src, quantize="fp16", threads=1, force=True)
    with pytest.raises(OutputError, match="overwrite the input"):
        export_onnx(src, src, force=True)
    with pytest.raises(InputError, match="--quantize must be one of int8, int4, fp16"):
        export_onnx(src, tmp_path / "x.onnx", quantize="int2")
    with pytest.raises(InputError, match="--opset"):
        export_onnx(src, tmp_path / "x.onnx", opset=7)
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        export_onnx(src, tmp_path / "x.onnx", device="tpu")
    if "CUDAExecutionProvider" not in execution_providers("cuda"):
        with pytest.raises(InputError, match="no CUDA execution provider"):
            export_onnx(src, tmp_path / "x.onnx", device="cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.safetensors"]  # no temporary left


def test_parity_failure_writes_nothing(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("embcompress.export.onnx.FP32_TOLERANCE", -1.0)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        _export(models["dan"], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_is_a_dependency_error(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing():
        raise DependencyError(MISSING)

    monkeypatch.setattr("embcompress.runtime.import_onnxruntime", missing)
    with pytest.raises(DependencyError, match=r"embcompress\[onnxruntime\]"):
        export_onnx(models["dan"], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_dan_without_padding_index_averages_every_position(tmp_path: Path, models) -> None:
    clf = load_classifier(models["dan"])
    torch.manual_seed(0)
    model = DAN(len(clf.vocab), 4, 2, hidden=(6,), padding_idx=None).eval()
    save_classifier(Classifier(model, clf.vocab, clf.labels), tmp_path / "nopad.safetensors")
    report = _export(tmp_path / "nopad.safetensors", tmp_path / "nopad.onnx")
    assert report.parity.fp32_max_abs_diff <= 1e-4


@pytest.mark.parametrize("bits", [8, 16])
def test_quantized_classifier_file_exports_as_float(models, tmp_path: Path, bits: int) -> None:
    quant = pytest.importorskip("embcompress.quant")
    if not hasattr(quant, "quantize"):
        pytest.skip("embcompress.quant has no quantize() yet")
    small = quant.quantize(models["dan_k3"], bits=bits, output=tmp_path / f"q{bits}.safetensors").output
    report = _export(Path(small), tmp_path / "q.onnx")
    assert report.factorized and report.rank == 3 and report.parity.fp32_max_abs_diff <= 1e-4


@pytest.fixture(scope="module")
def stored(models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The DAN with its table kept in int8 rows, 4-bit and 3-bit groups (registry tables, loaded as stored)."""
    from embcompress.ops.compress import compress

    root = tmp_path_factory.mktemp("export-stored")
    big = root / "dan16.safetensors"  # a 16-dim table, so that groups of 16 fit
    clf = load_classifier(models["dan"])
    torch.manual_seed(0)
    save_classifier(Classifier(DAN(len(clf.vocab), 16, 2, hidden=(12,)).eval(), clf.vocab, clf.labels), big)
    out = {"int8": root / "int8.safetensors", "lowbit4": root / "lowbit4.safetensors",
           "lowbit3": root / "lowbit3.safetensors", "pq": root / "pq.safetensors"}
    compress(models["dan"], "int8", output=out["int8"])
    compress(big, "pq", options={"subvector": 4, "centroids": 8}, output=out["pq"])
    compress(big, "lowbit", options={"bits": 4, "group_size": 16}, output=out["lowbit4"])
    compress(big, "lowbit", options={"bits": 3, "group_size": 16}, output=out["lowbit3"])
    return out


def test_classifier_with_an_int8_table_exports_its_rows(stored, tmp_path: Path) -> None:
    from embcompress.methods.base import StoredTable

    assert isinstance(load_classifier(stored["int8"]).model.embedding, StoredTable)
    report = _export(stored["int8"], tmp_path / "m.onnx", quantize="int8")
    assert report.parity.fp32_max_abs_diff <= 1e-4 and report.parity.agreement >= 0.9
    graph = onnx.load(report.output).graph
    int8 = {i.name: list(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    V = len(load_classifier(stored["int8"]).vocab)
    table = [n for n in graph.node if n.op_type == "Gather" and int8.get(n.input[0], [None])[0] == V]
    assert len(table) == 1  # Gather of the int8 rows as stored (then the scales and a Mul)
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.dims[:1] == [V] for i in graph.initializer
                   if len(i.dims) == 2)


def test_lowbit_table_is_gather_block_quantized_and_3_bits_are_refused(stored, tmp_path: Path) -> None:
    report = _export(stored["lowbit4"], tmp_path / "m.onnx")
    assert report.parity.fp32_max_abs_diff <= 1e-4
    ops = [n.op_type for n in onnx.load(report.output).graph.node]
    assert ops.count("GatherBlockQuantized") == 1
    with pytest.raises(InputError, match="3-bit lowbit table has no onnxruntime kernel"):
        _export(stored["lowbit3"], tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _optimized_ops(path: Path, tmp_path: Path) -> tuple[list[str], list[list[int]]]:
    """The op types and float initializer shapes of the graph onnxruntime runs after loading ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return [n.op_type for n in graph.node], [list(i.dims) for i in graph.initializer
                                             if i.data_type == onnx.TensorProto.FLOAT]


def test_decode_at_load_keeps_the_stored_bytes_and_runs_one_float_gather(stored, tmp_path: Path) -> None:
    clf = load_classifier(stored["pq"])
    V, d = len(clf.vocab), clf.model.embedding.embedding_dim
    plain = _export(stored["pq"], tmp_path / "plain.onnx")
    decoded = _export(stored["pq"], tmp_path / "decoded.onnx", decode_at_load=True)
    assert decoded.parity.fp32_max_abs_diff <= 1e-4 and any("decoded at load: 1 table" in n for n in decoded.notes)
    graph = onnx.load(decoded.output).graph
    assert not any(list(i.dims) == [V, d] and i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer)
    assert any(i.data_type == onnx.TensorProto.UINT8 and i.dims[0] == V for i in graph.initializer)  # the codes
    assert abs(decoded.file_bytes - plain.file_bytes) < 2048  # the decode is a few nodes, not a float table
    ops, floats = _optimized_ops(Path(decoded.output), tmp_path)
    assert [V, d] in floats and "Range" not in ops  # onnxruntime folded the decode into one float32 table
    plain_ops, plain_floats = _optimized_ops(Path(plain.output), tmp_path)
    assert [V, d] not in plain_floats  # the stored lowering decodes at every call
    ids = _ids(clf, [5, 3, 7])
    np.testing.assert_array_equal(_logits(Path(decoded.output), ids), _logits(Path(plain.output), ids))
    assert type(load_classifier(stored["pq"]).model.embedding).__name__ == "PQTable"


def test_decode_at_load_refuses_a_model_it_cannot_help(models, stored, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no compressed table"):
        _export(models["dan"], tmp_path / "a.onnx", decode_at_load=True)
    with pytest.raises(InputError, match="GatherBlockQuantized"):
        _export(stored["lowbit4"], tmp_path / "b.onnx", decode_at_load=True)
    assert list(tmp_path.iterdir()) == []


def test_decoded_at_load_swaps_tables_and_puts_them_back() -> None:
    from torch import nn

    from embcompress.core import compress_, make_spec
    from embcompress.export.onnx import DecodedAtLoad, decoded_at_load

    model = nn.Sequential(nn.Embedding(50, 8), nn.Embedding(50, 16))
    compress_(model, make_spec("pq", {"subvector": 4, "centroids": 4}), tables=["0"])
    compress_(model, make_spec("lowbit", {"bits": 4, "group_size": 16}), tables=["1"])
    table = model[0]
    with decoded_at_load(model) as (decoded, kept):
        assert (decoded, kept) == (1, 1) and isinstance(model[0], DecodedAtLoad)
        ids = torch.tensor([[3, 49, 0]])
        torch.testing.assert_close(model[0](ids), table(ids))
    assert model[0] is table and type(model[1]).__name__ == "StoredTable"


def test_latency_at_batch_1_and_64(models, tmp_path: Path) -> None:
    report = export_onnx(models["dan"], tmp_path / "m.onnx", threads=1, device="cpu", latency=True)
    assert set(report.latency_ms) == {1, 64} and all(v > 0 for v in report.latency_ms.values())


def _matmul_graph(path: Path, w: np.ndarray) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", w.shape[0]])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", w.shape[1]])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                                   [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))


def _decode_float32(stored: dict, config, shape: tuple[int, int]) -> np.ndarray:
    """(q - z) * s in float32, as MatMulNBits computes it (dequantize_lowbit rounds to float16 as the table op)."""
    from embcompress.methods import lowbit as lb

    n, k = shape
    nb = k // config.group_size
    q = lb.unpack(stored[""], config.bits, k).double().reshape(n, nb, -1)
    z = (lb.unpack(stored[lb.ZERO_SUFFIX], config.bits, nb).double() if lb.ZERO_SUFFIX in stored
         else torch.full((n, nb), 2.0 ** (config.bits - 1), dtype=torch.float64))
    return ((q - z.unsqueeze(-1)) * stored[lb.SCALE_SUFFIX].double().unsqueeze(-1)).reshape(n, k).numpy()


@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_matmul_nbits_equals_the_torch_dequantized_product(tmp_path: Path, scheme: str, calibrated: bool) -> None:
    """One MatMulNBits node reads the lowbit bytes as torch decodes them: x @ dequantize(codes of w^T)^T; with
    calibration inputs its codes are GPTQ's on those inputs' moments, and its output error is smaller."""
    from embcompress.export.weights import input_moments, quantize_weights
    from embcompress.methods import lowbit as lb

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 24, generator=g).numpy()
    mix = torch.randn(64, 64, generator=g) / 6 + torch.eye(64)  # correlated channels, a few of them large
    x = ((torch.randn(256, 64, generator=g) @ mix) * (1 + 7 * (torch.rand(64, generator=g) > 0.9))).numpy()
    _matmul_graph(tmp_path / "f.onnx", w)
    feeds = [{"x": x[i : i + 64]} for i in range(0, 256, 64)]
    quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx", "int4", scheme=scheme,
                     calibration=feeds if calibrated else None)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert [n.op_type for n in graph.node] == ["Cast", "MatMulNBits"]  # the fp16 scales widened, then the product
    assert {i.data_type for i in graph.initializer} == {onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16}
    got = make_session(tmp_path / "q.onnx", device="cpu", threads=1).run(["y"], {"x": x})[0]
    config = lb.LowBitConfig(bits=4, group_size=32, scheme=scheme)
    wt = torch.from_numpy(np.ascontiguousarray(w.T))
    if calibrated:
        hessian = torch.from_numpy(input_moments(onnx.load(str(tmp_path / "f.onnx")), ["x"], feeds)["x"])
        assert torch.allclose(hessian, torch.from_numpy(x).double().T @ torch.from_numpy(x).double() / 256)
        stored = lb.quantize_lowbit_gptq(wt, config, hessian)
    else:
        stored = lb.quantize_lowbit(wt, config)
    want = x @ _decode_float32(stored, config, (24, 64)).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    if calibrated:
        plain = x @ _decode_float32(lb.quantize_lowbit(wt, config), config, (24, 64)).T
        assert np.linalg.norm(got - x @ w) < 0.9 * np.linalg.norm(plain - x @ w)
