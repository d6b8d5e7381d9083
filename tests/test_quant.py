import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embcompress import dequantize_state, factorize, load_checkpoint, quantize, quantize_state
from embcompress.checkpoint import META_KEY
from embcompress.classifier import MODEL_META_KEY, load_classifier
from embcompress.data import iter_batches, read_jsonl
from embcompress.errors import CheckpointError, InputError, OutputError, TableError
from embcompress.modules import FactorizedEmbedding
from embcompress.quant import (
    QUANT_META_KEY,
    dequantize_int8,
    dequantized_state_dict,
    quant_meta,
    quantization_error,
    quantize_int8,
)
from embcompress.train.loop import TrainConfig
from embcompress.train.run import evaluate_classifier, finetune_classifier, train_classifier
from tests.builders import dan_state, write_sentiment_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta(path: Path) -> dict[str, str]:
    file = path / "model.safetensors" if path.is_dir() else path
    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


# --- one tensor ------------------------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 48, generator=g) * torch.logspace(-4, 2, 300).unsqueeze(1)  # rows on very different scales
    w[7] = 0.0  # an all-zero row
    w[8, 3] = -50.0  # an outlier
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (300,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    deq = dequantize_int8(q, scale)
    err = (w - deq).abs()
    bound = scale.unsqueeze(1) / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert scale[7] == 0 and bool((deq[7] == 0).all())
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127)


def test_int8_and_fp16_errors_are_small_and_ordered() -> None:
    w = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    e8, e16 = quantization_error(w, 8), quantization_error(w, 16)
    assert 0 < e16 < e8 < 0.02
    with pytest.raises(InputError):
        quantization_error(w, 4)


# --- a state dict ----------------------------------------------------------------------------------------------


def test_quantize_state_int8_round_trip() -> None:
    state = dan_state()
    qs = quantize_state(state, 8, roles={"embedding.weight": "table"})
    t = qs.tensors
    assert t["embedding.weight"].dtype == torch.int8 and t["embedding.weight_scale"].shape == (600,)
    assert t["fc1.weight"].dtype == torch.int8 and t["out.weight"].dtype == torch.int8
    assert t["fc1.bias"] is state["fc1.bias"] and t["steps"] is state["steps"]  # 1-D and integers pass through
    assert sorted(qs.passed_through) == ["fc1.bias", "out.bias", "steps"]
    entries = qs.meta["tensors"]
    assert entries["embedding.weight"]["scheme"] == "int8_symmetric_per_row"
    assert entries["fc1.weight"]["scheme"] == "int8_symmetric_per_channel"
    assert entries["embedding.weight"]["scale"] == "embedding.weight_scale"
    back = dequantize_state(t, qs.meta)
    assert set(back) == set(state)
    for name, w in state.items():
        assert back[name].dtype == w.dtype and back[name].shape == w.shape
        if name in entries:
            step = t[f"{name}_scale"].unsqueeze(1)
            assert bool(((w - back[name]).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all())
            r = next(r for r in qs.results if r.name == name)
            assert r.rel_error == pytest.approx(float((w - back[name]).norm() / w.norm()), rel=1e-4)
        else:
            assert torch.equal(back[name], w)
    assert {g.name for g in qs.groups} == {"embedding", "fc1", "out"}


def test_quantize_state_fp16_and_filter_fn() -> None:
    state = {**dan_state(), "half.weight": torch.randn(4, 4).half(), "bf.weight": torch.randn(4, 4).bfloat16()}
    qs = quantize_state(state, 16, filter_fn=lambda name, t: not name.startswith("out"))
    t = qs.tensors
    assert t["embedding.weight"].dtype == torch.float16 and t["fc1.bias"].dtype == torch.float16  # 1-D too
    assert t["out.weight"].dtype == torch.float32  # filtered out
    assert t["half.weight"] is state["half.weight"] and t["bf.weight"] is state["bf.weight"]  # already 16-bit
    back = dequantize_state(t, json.dumps(qs.meta))
    assert back["embedding.weight"].dtype == torch.float32
    assert torch.allclose(back["embedding.weight"], state["embedding.weight"], rtol=1e-3, atol=1e-4)


def test_quantize_state_refusals() -> None:
    with pytest.raises(InputError, match="8 .int8. or 16"):
        quantize_state(dan_state(), 4)
    bad = dan_state()
    bad["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        quantize_state(bad, 8)
    big = dan_state()
    big["fc1.weight"][0, 0] = 1e6
    with pytest.raises(CheckpointError, match="float16's range"):
        quantize_state(big, 16)
    quantize_state(big, 8)  # int8 scales any range
    taken = {**dan_state(), "fc1.weight_scale": torch.ones(32)}
    with pytest.raises(InputError, match="already exists"):
        quantize_state(taken, 8)
    with pytest.raises(TableError, match="nothing to quantize"):
        quantize_state({"b": torch.ones(3), "i": torch.arange(3)}, 8)
    with pytest.raises(TableError, match="nothing to quantize"):
        quantize_state({"one_column": torch.randn(100, 1)}, 8)  # int8 + a scale per row would be larger


def test_dequantize_state_refuses_damaged_records() -> None:
    qs = quantize_state(dan_state(), 8)
    missing = {k: v for k, v in qs.tensors.items() if k != "fc1.weight_scale"}
    with pytest.raises(CheckpointError, match="missing"):
        dequantize_state(missing, qs.meta)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        dequantize_state(qs.tensors, "{oops")
    meta = json.loads(json.dumps(qs.meta))
    meta["tensors"]["fc1.weight"]["scheme"] = "int3"
    with pytest.raises(CheckpointError, match="unknown quantization"):
        dequantize_state(qs.tensors, meta)


# --- a checkpoint ----------------------------------------------------------------------------------------------


def test_int8_file_is_really_smaller_on_disk(tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    save_file(dan_state(V=3000, d=64), str(src), metadata={"format": "pt"})
    result = quantize(src)
    out = Path(result.output)
    assert out == tmp_path / "big.int8.safetensors"
    assert out.stat().st_size < 0.3 * src.stat().st_size
    assert result.file_bytes_after == out.stat().st_size and result.file_ratio < 0.3
    fp16 = quantize(src, bits=16)
    assert Path(fp16.output) == tmp_path / "big.fp16.safetensors"
    assert Path(fp16.output).stat().st_size < 0.51 * src.stat().st_size


def test_metadata_records_tensors_and_keeps_other_keys(tmp_path: Path, dan_file: Path) -> None:
    small = Path(factorize(dan_file, rank=4).output)
    meta_before = _meta(small)
    extra = tmp_path / "extra.safetensors"
    with load_checkpoint(small) as ckpt:
        save_file(ckpt.state_dict(), str(extra), metadata={**meta_before, MODEL_META_KEY: '{"x": 1}'})
    result = quantize(extra, 8)
    meta = _meta(Path(result.output))
    assert meta[MODEL_META_KEY] == '{"x": 1}' and QUANT_META_KEY not in meta  # one record: "embcompress"
    before, record = json.loads(meta_before[META_KEY]), json.loads(meta[META_KEY])
    assert record["tables"] == before["tables"] and record["format_version"] == 2
    assert [h["op"] for h in record["history"]] == ["factorize", "quantize"]
    assert record["history"][-1]["options"] == {"bits": 8, "tables": None}
    assert record["quantized"]["bits"] == 8 and record["quantized"]["scale_dtype"] == "F32"
    a = record["tensors"]["embedding.weight_a"]
    assert a == {**a, "storage": "int8", "dtype": "F32", "shape": [600, 4], "stored": "I8",
                 "scheme": "int8_symmetric_per_row", "axis": 0, "scale": "embedding.weight_a_scale", "role": "factor"}
    assert record["tensors"]["embedding.weight_b"]["role"] == "factor"
    assert record["tensors"]["fc1.weight"]["scheme"] == "int8_symmetric_per_channel"
    assert "fc1.bias" not in record["tensors"]
    assert record["quantized"]["bytes_after"] == result.bytes_after
    with load_checkpoint(result.output) as ckpt:  # the readers' view is the same as 0.1's record
        q = quant_meta(ckpt)
    assert q["bits"] == 8 and q["tensors"] == record["tensors"] and q["file"]["bytes_after"] == result.bytes_after
    fp16 = json.loads(_meta(Path(quantize(dan_file, 16).output))[META_KEY])
    assert fp16["tensors"]["fc1.weight"]["storage"] == "fp16" and fp16["tensors"]["fc1.weight"]["scale"] is None
    assert "tables" in fp16 and not fp16["tables"] and [h["op"] for h in fp16["history"]] == ["quantize"]


def test_factorized_then_int8(dan_file: Path) -> None:
    small = Path(factorize(dan_file, rank=4).output)
    result = quantize(small)
    assert [t.name for t in result.tables] == ["embedding.weight_a", "embedding.weight_b"]
    with load_checkpoint(small) as f, load_checkpoint(result.output) as q:
        ref = f.state_dict()
        back = dequantized_state_dict(q)
    assert set(back) == set(ref)
    W = ref["embedding.weight_a"] @ ref["embedding.weight_b"]
    Wq = back["embedding.weight_a"] @ back["embedding.weight_b"]
    assert float((W - Wq).norm() / W.norm()) < 0.02


def test_hf_folder_gives_a_folder(hf_folder: Path) -> None:
    result = quantize(hf_folder)
    out = Path(result.output)
    assert out == hf_folder.parent / "bert-int8" and result.kind == "hf"
    assert all((out / name).is_file() for name in ("config.json", "vocab.txt", "1_Pooling/config.json"))
    with load_checkpoint(out) as ckpt:
        assert ckpt.infos["embeddings.word_embeddings.weight"].dtype == "I8"
        assert ckpt.infos["embeddings.position_ids"].dtype == "I64"
        assert ckpt.infos["embeddings.LayerNorm.weight"].dtype == "F32"
        assert ckpt.infos["pooler.dense.weight"].dtype == "I8"  # float16 matrices are quantized too
        back = dequantized_state_dict(ckpt)
    assert back["pooler.dense.weight"].dtype == torch.float16
    roles = {t.name: t.role for t in result.tensors}
    assert roles["embeddings.word_embeddings.weight"] == "table"
    assert roles["encoder.layer.0.attention.self.query.weight"] == "linear"


def test_torch_state_dict_gives_safetensors(tied_pt: Path) -> None:
    result = quantize(tied_pt, bits=16)
    assert Path(result.output).name == "gpt.fp16.safetensors"
    with load_checkpoint(result.output) as ckpt:
        assert ckpt.infos["lm_head.weight"].dtype == "F16"


def test_tables_option_selects(dan_file: Path, tmp_path: Path) -> None:
    result = quantize(dan_file, tables=["embedding"], output=tmp_path / "e.safetensors")
    assert [t.name for t in result.tensors] == ["embedding.weight"]
    with pytest.raises(TableError, match="no tensor"):
        quantize(dan_file, tables=["nope"], output=tmp_path / "x.safetensors")
    with pytest.raises(TableError, match="1-D"):
        quantize(dan_file, tables=["fc1.bias"], output=tmp_path / "x.safetensors")
    fc1 = quantize(dan_file, tables=["fc1.*"], output=tmp_path / "g.safetensors")  # a glob skips the bias
    assert [t.name for t in fc1.tensors] == ["fc1.weight"]
    small = Path(factorize(dan_file, rank=4).output)
    by_table = quantize(small, tables=["embedding.weight"], output=tmp_path / "f.safetensors")
    assert sorted(t.name for t in by_table.tensors) == ["embedding.weight_a", "embedding.weight_b"]
    assert not (tmp_path / "x.safetensors").exists()


def test_file_refusals_write_nothing(dan_file: Path, tmp_path: Path) -> None:
    out = Path(quantize(dan_file).output)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InputError, match="already quantized"):
        quantize(out, output=tmp_path / "twice.safetensors")
    with pytest.raises(InputError, match="factorize before quantizing"):
        factorize(out, rank=2)
    with pytest.raises(OutputError, match="already exists"):
        quantize(dan_file)
    with pytest.raises(OutputError, match="overwrite the input"):
        quantize(dan_file, output=dan_file, force=True)
    with pytest.raises(InputError, match="--bits"):
        quantize(dan_file, bits=4, output=tmp_path / "x.safetensors")
    assert sorted(tmp_path.iterdir()) == before
    assert quantize(dan_file, force=True).output == str(out)


# --- loading a quantized classifier ----------------------------------------------------------------------------


def _logits(clf, ds) -> torch.Tensor:
    clf.model.eval()
    with torch.inference_mode():
        return torch.cat([clf.model(b.ids, b.lengths) for b in iter_batches(ds, 64)])


def test_quantized_classifier_predicts_like_the_float_one(tmp_path: Path) -> None:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 160)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 40, 1)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=5e-3, device="cpu")
    model = train_classifier(train, dev, tmp_path / "m.safetensors", embed_dim=16, config=cfg).output
    ref = load_classifier(model)
    ds = ref.encode(read_jsonl(dev))
    ref_logits = _logits(ref, ds)
    for bits, tol in ((8, 0.05), (16, 1e-3)):
        out = quantize(model, bits=bits).output
        clf = load_classifier(out)
        assert all(p.dtype == torch.float32 for p in clf.model.parameters())
        logits = _logits(clf, ds)
        assert float((logits - ref_logits).abs().max()) < tol * float(ref_logits.abs().max())
        assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
        ev = evaluate_classifier(out, dev, device="cpu")
        assert ev.result.predictions == evaluate_classifier(model, dev, device="cpu").result.predictions
    # low rank + int8: the factors are quantized; the classifier loads with a FactorizedEmbedding
    small = factorize(model, rank=4).output
    both = quantize(small).output
    fclf, qclf = load_classifier(small), load_classifier(both)
    assert isinstance(qclf.model.embedding, FactorizedEmbedding) and qclf.model.embedding.rank == 4
    assert qclf.factorization is not None
    f_logits, q_logits = _logits(fclf, ds), _logits(qclf, ds)
    assert float((q_logits - f_logits).abs().max()) < 0.05 * float(f_logits.abs().max())
    # finetune accepts a quantized file; the result is float again and keeps the factorized shape
    ft = finetune_classifier(both, train, dev, tmp_path / "ft.safetensors",
                             config=TrainConfig(epochs=1, batch_size=16, lr=2e-3, device="cpu"))
    tuned = load_classifier(ft.output)
    assert QUANT_META_KEY not in _meta(Path(ft.output)) and tuned.model.embedding.rank == 4
    record = json.loads(_meta(Path(ft.output))[META_KEY])  # float again: no per-tensor storage, one more op
    assert "tensors" not in record and "quantized" not in record
    assert [h["op"] for h in record["history"]] == ["factorize", "quantize", "finetune"]
    entry = record["tables"]["embedding.weight"]
    assert entry["structure"] == "svd" and entry["rank"] == 4 and entry["trained"] is True
