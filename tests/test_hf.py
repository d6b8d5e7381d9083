"""Hugging Face folders: tiny random BERT, GPT-2 and T5 models built from configs (no download).

Each family is written with ``save_pretrained`` as transformers writes it (BERT's ``word_embeddings``; GPT-2's
``wte`` with ``lm_head`` tied and not stored; T5's ``shared`` with ``encoder/decoder.embed_tokens`` and ``lm_head``
tied and not stored), then factorized by ``embcompress.factorize`` and read back with ``embcompress.hf.load``.
Skipped when transformers is not installed (the ``[hf]`` extra).
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from embcompress import hf  # noqa: E402
from embcompress.checkpoint import load_checkpoint  # noqa: E402
from embcompress.errors import CheckpointError, DependencyError, InputError  # noqa: E402
from embcompress.factorize import factorize  # noqa: E402
from embcompress.modules import FactorizedEmbedding, TiedFactorizedLinear  # noqa: E402
from embcompress.tables import find_embeddings  # noqa: E402

torch.set_num_threads(1)

V = 300
K = int(0.5 * V * 32 // (V + 32))  # the rank eq. 5 gives at R = 50 % for a V x 32 table
WORDS = ["the", "a", "of", "and", "to", "is", "in", "it", "that", "film", "movie", "good", "bad", "model", "table",
         "low", "rank", "small", "large", "very", "not", "this", "was", "one"]


def vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *WORDS, "##s", "##ing", "##ed"]
    tokens += [f"w{i}" for i in range(V - len(tokens))]
    return {t: i for i, t in enumerate(tokens)}


TEXTS = ["the film is good", "a very bad movie", "low rank tables of a model", "it was not one small film",
         "w1 w2 w3 the w40 w41", "this", "the large model is very good and the small one is not"]


def _save(model: torch.nn.Module, folder: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(str(folder))
    if tokenizer:
        transformers.BertTokenizer(vocab=vocab()).save_pretrained(str(folder))
    return folder


def tiny_bert(folder: Path, cls: str = "BertModel") -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return _save(getattr(transformers, cls)(cfg).eval(), folder)


def tiny_gpt2(folder: Path) -> Path:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
                                  eos_token_id=3)
    return _save(transformers.GPT2LMHeadModel(cfg).eval(), folder, tokenizer=False)


def tiny_t5(folder: Path) -> Path:
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _save(transformers.T5ForConditionalGeneration(cfg).eval(), folder, tokenizer=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    out = {"bert": tiny_bert(base / "bert"), "gpt2": tiny_gpt2(base / "gpt2"), "t5": tiny_t5(base / "t5")}
    for name in list(out):
        factorize(out[name], reduction=0.5, output=base / f"{name}-r50")
        out[f"{name}-r50"] = base / f"{name}-r50"
    return out


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def forward(model: torch.nn.Module, family: str) -> torch.Tensor:
    b = batch()
    with torch.no_grad():
        if family == "t5":
            return model(**b, decoder_input_ids=b["input_ids"][:, :5]).logits
        out = model(**b)
    return out.logits if family == "gpt2" else out.last_hidden_state


def dense_rebuild(original: Path, factorized: Path) -> torch.nn.Module:
    """The original architecture loaded by transformers itself, its table replaced by W_a W_b from the file."""
    with load_checkpoint(factorized) as ckpt:
        (name, entry), = ckpt.embcompress_meta["tables"].items()
        a, b = (ckpt.tensor(n) for n in entry["factors"])
    model = transformers.AutoModel.from_pretrained(str(original)) if "bert" in original.name else getattr(
        transformers, json.loads((original / "config.json").read_text())["architectures"][0]
    ).from_pretrained(str(original))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(a @ b)  # tied copies share the parameter
    return model.eval()


# --- discovery on real layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "table", "tied"), [
    ("bert", "embeddings.word_embeddings.weight", []),
    ("gpt2", "transformer.wte.weight", ["lm_head.weight"]),
    ("t5", "shared.weight", ["lm_head.weight"]),
])
def test_tables_found_in_real_layouts(folders: dict[str, Path], family: str, table: str, tied: list[str]) -> None:
    with load_checkpoint(folders[family]) as ckpt:
        found = find_embeddings(ckpt)
    assert [t.name for t in found] == [table]
    assert found[0].tied == tied
    with load_checkpoint(folders[f"{family}-r50"]) as ckpt:
        entry = ckpt.embcompress_meta["tables"][table]
        assert entry["rank"] == K and table not in ckpt.infos
        assert set(entry["factors"]) <= set(ckpt.infos)


# --- load: factorized modules in place, ties kept, equal to the dense rebuild --------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_load_equals_dense_rebuild(folders: dict[str, Path], family: str) -> None:
    model = hf.load(folders[f"{family}-r50"])
    emb = model.get_input_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and emb.rank == K
    expected = forward(dense_rebuild(folders[family], folders[f"{family}-r50"]), family)
    torch.testing.assert_close(forward(model, family), expected, atol=2e-5, rtol=1e-4)
    # densify gives the same dense model back in memory
    torch.testing.assert_close(forward(hf.densify(copy.deepcopy(model)), family), expected, atol=2e-5, rtol=1e-4)


def test_ties_survive(folders: dict[str, Path]) -> None:
    gpt2 = hf.load(folders["gpt2-r50"])
    assert isinstance(gpt2.lm_head, TiedFactorizedLinear) and gpt2.lm_head.tied_to is gpt2.transformer.wte
    t5 = hf.load(folders["t5-r50"])
    assert t5.encoder.embed_tokens is t5.shared and t5.decoder.embed_tokens is t5.shared
    assert isinstance(t5.lm_head, TiedFactorizedLinear) and t5.lm_head.tied_to is t5.shared
    # one set of factors: training the table moves the output layer too
    with torch.no_grad():
        gpt2.transformer.wte.weight_b.mul_(2.0)
    h = torch.randn(1, 32)
    torch.testing.assert_close(gpt2.lm_head(h), h @ gpt2.transformer.wte.dense_weight().T)
    params = {id(p) for p in t5.parameters()}
    assert len(params) == len(list(t5.parameters()))
    assert "lm_head.weight" in hf.factorized_tables(t5)["shared"]["tied"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_save_round_trip(folders: dict[str, Path], tmp_path: Path, family: str) -> None:
    model = hf.load(folders[f"{family}-r50"])
    with torch.no_grad():
        model.get_input_embeddings().weight_a.add_(0.01)  # a change that must survive
    out = hf.save(model, tmp_path / "again", like=folders[f"{family}-r50"])
    with load_checkpoint(out) as ckpt:
        names = set(ckpt.infos)
        meta = ckpt.embcompress_meta
    (table, entry), = meta["tables"].items()
    assert entry["rank"] == K and set(entry["factors"]) <= names
    assert not any(n.startswith(("lm_head", "encoder.embed_tokens", "decoder.embed_tokens")) for n in names)
    again = hf.load(out)
    torch.testing.assert_close(forward(again, family), forward(model, family))
    assert (out / "config.json").read_text() == (folders[f"{family}-r50"] / "config.json").read_text()


def test_tokenizer_and_embed(folders: dict[str, Path]) -> None:
    model = hf.load(folders["bert-r50"])
    tok = hf.load_tokenizer(folders["bert-r50"])
    emb = hf.embed(model, tok, TEXTS, batch_size=3)
    assert emb.shape == (len(TEXTS), 32) and torch.isfinite(emb).all()
    # batched and sorted-by-length embedding equals one text at a time
    one = torch.cat([hf.embed(model, tok, [t]) for t in TEXTS])
    torch.testing.assert_close(emb, one, atol=1e-5, rtol=1e-4)
    sim = hf.similarity(model, model, tok, TEXTS)
    assert sim.mean == pytest.approx(1.0) and sim.count == len(TEXTS)


def test_sequence_classification_head(folders: dict[str, Path], tmp_path: Path) -> None:
    model = hf.load(folders["bert-r50"], task="sequence-classification", num_labels=3)
    assert isinstance(model.bert.embeddings.word_embeddings, FactorizedEmbedding)
    out = hf.save(model, tmp_path / "cls", like=folders["bert-r50"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and len(cfg["id2label"]) == 3
    again = hf.load(out)
    assert type(again).__name__ == "BertForSequenceClassification"
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, model(**b).logits)
    with load_checkpoint(out) as ckpt:
        assert "bert.embeddings.word_embeddings.weight" in ckpt.embcompress_meta["tables"]


def test_factorize_model_in_memory_keeps_ties(folders: dict[str, Path]) -> None:
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(folders["t5"]))
    swaps = hf.factorize_model(model, rank=8)
    assert [s.name for s in swaps] == ["shared"] and swaps[0].rank == 8
    assert set(swaps[0].tied) == {"encoder.embed_tokens", "decoder.embed_tokens", "lm_head"}
    assert model.encoder.embed_tokens is model.shared
    with pytest.raises(InputError, match="not an nn.Embedding"):
        hf.factorize_model(model, rank=8, tables=["shared"])


@pytest.mark.parametrize("method", ["weighted", "groupreduce"])
def test_factorize_model_in_memory_with_counts(folders: dict[str, Path], tmp_path: Path, method: str) -> None:
    from embcompress.modules import GroupedFactorizedEmbedding
    from embcompress.weighting import count_ids

    model = transformers.GPT2LMHeadModel.from_pretrained(str(folders["gpt2"]))
    tok = hf.load_tokenizer(folders["bert"])
    counts = count_ids(tok(TEXTS * 3)["input_ids"], V, "texts")
    with pytest.raises(InputError, match="token counts"):
        hf.factorize_model(copy.deepcopy(model), reduction=0.9, method=method)
    plain = hf.factorize_model(copy.deepcopy(model), reduction=0.9)
    swaps = hf.factorize_model(model, reduction=0.9, method=method, counts=counts, blocks=4)
    table = model.get_input_embeddings()
    assert isinstance(table, GroupedFactorizedEmbedding if method == "groupreduce" else FactorizedEmbedding)
    assert swaps[0].tied == ["lm_head"] and model.lm_head.embedding[0] is table
    assert sum(p.numel() for p in table.parameters()) <= plain[0].rank * (V + 32)
    with torch.no_grad():
        logits = model(input_ids=batch()["input_ids"]).logits
    hf.save(model, tmp_path / "out", like=folders["gpt2"])
    again = hf.load(tmp_path / "out")
    assert type(again.get_input_embeddings()) is type(table)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch()["input_ids"]).logits, logits)


def test_quantized_folder_loads(folders: dict[str, Path], tmp_path: Path) -> None:
    from embcompress.quant import quantize

    q = quantize(folders["bert-r50"], 8, output=tmp_path / "q8")
    model = hf.load(q.output)
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    ref = forward(hf.load(folders["bert-r50"]), "bert")
    got = forward(model, "bert")
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_onnx_export_parity(folders: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx

    report = export_onnx(folders["bert-r50"], tmp_path / "m.onnx", texts=TEXTS)
    assert report.max_abs_diff_embedding < 1e-4 and report.min_cosine > 0.9999
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.graph.output] == ["last_hidden_state", "sentence_embedding"]
    shapes = [tuple(t.dims) for t in graph.graph.initializer]
    assert (V, K) in shapes and (V, 32) not in shapes  # the factors, not a dense table
    with pytest.raises(Exception, match="already exists"):
        export_onnx(folders["bert-r50"], tmp_path / "m.onnx")


def _no_pad_tokenizer(folder: Path) -> Any:
    """A GPT-2-style tokenizer: word level, an end-of-text token, no padding token."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")
    fast.save_pretrained(str(folder))
    return fast


def test_tokenize_pads_a_tokenizer_without_a_pad_token(tmp_path: Path) -> None:
    tok = _no_pad_tokenizer(tmp_path)
    assert tok.pad_token is None
    batch = hf.tokenize(tok, ["the film", "a very bad movie", "this"])
    assert batch["attention_mask"].sum(1).tolist() == [2, 4, 1]
    assert batch["input_ids"][2, 1:].tolist() == [tok.eos_token_id] * 3  # padded with end-of-text, masked
    assert batch["input_ids"][1].tolist() == tok("a very bad movie")["input_ids"]


def test_onnx_export_of_a_gpt2_folder_without_a_pad_token(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx

    folder = tiny_gpt2(tmp_path / "gpt2")
    _no_pad_tokenizer(folder)
    report = export_onnx(folder, tmp_path / "g.onnx", texts=TEXTS)
    assert report.max_abs_diff_embedding < 1e-4 and report.min_cosine > 0.9999


def test_cli_export_of_a_folder(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`embcompress export FOLDER` takes the Hugging Face route: JSON and human output, latency, the record."""
    pytest.importorskip("onnxruntime")
    from embcompress.cli.main import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "m.onnx"
    code = main(["export", str(folders["bert-r50"]), "-o", str(out), "--data", str(texts), "--threads", "1",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["output"] == str(out) and out.is_file() and report["bytes"] == out.stat().st_size
    assert report["parity_texts"] == len(TEXTS) and report["max_abs_diff_embedding"] < 1e-4
    assert report["latency_ms"] > 0
    entry = json.loads(Path("embcompress-workspace.json").read_text())["entries"][-1]
    assert entry["command"] == "export" and entry["outputs"][0]["role"] == "onnx"
    assert entry["figures"]["latency_ms"] == report["latency_ms"] and entry["figures"]["threads"] == 1
    code = main(["export", str(folders["bert-r50"]), "--quantize", "int8", "-o", str(tmp_path / "q.onnx"),
                 "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int8" in captured.out and "latency:" in captured.out and "1 thread)" in captured.out
    assert (tmp_path / "q.onnx").stat().st_size < out.stat().st_size


@pytest.fixture(scope="module")
def lowbit(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny BERT with its table in 2-, 3- and 4-bit groups of 16 (the lowbit storage, loaded packed)."""
    from embcompress.ops.compress import compress

    root = tmp_path_factory.mktemp("hf-lowbit")
    return {bits: Path(compress(folders["bert"], "lowbit", options={"bits": bits, "group_size": 16},
                                output=root / f"bert-{bits}bit").output) for bits in (2, 3, 4)}


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("bits", [2, 4])
def test_onnx_export_of_a_lowbit_table(lowbit: dict[int, Path], tmp_path: Path, bits: int) -> None:
    """The packed table is one GatherBlockQuantized on the stored bytes; the float32 graph matches torch."""
    pytest.importorskip("onnxruntime")
    import onnx

    from embcompress import export_onnx

    report = export_onnx(lowbit[bits], tmp_path / "m.onnx", texts=TEXTS, threads=1, latency=False)
    assert report.max_abs_diff_embedding < 1e-4 and report.min_cosine > 0.9999
    assert _ops(tmp_path / "m.onnx").count("GatherBlockQuantized") == 1
    assert "lowbit" in report.tables["embeddings.word_embeddings"]
    shapes = [tuple(t.dims) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    assert (V, 32 * bits // 8) in shapes and (V, 32) not in shapes  # the packed codes, no float table


@pytest.mark.parametrize("quantize,tune", [(None, 0), ("int4", 0), ("int4", 5)])
def test_onnx_export_decodes_a_pq_table_at_load(folders: dict[str, Path], tmp_path: Path,
                                                quantize: str | None, tune: int) -> None:
    """--decode-at-load on an encoder: the file keeps the pq codes, parity holds, and the layers' int4 pass (tuned
    or not: tuning also trains the codebooks) leaves the decoded table alone (it is no float initializer)."""
    pytest.importorskip("onnxruntime")
    import onnx

    from embcompress import export_onnx
    from embcompress.ops.compress import compress

    model = Path(compress(folders["bert"], "pq", options={"subvector": 4, "centroids": 16},
                          output=tmp_path / "pq").output)
    report = export_onnx(model, tmp_path / "m.onnx", texts=TEXTS, threads=1, latency=False, quantize=quantize,
                         decode_at_load=True, tune=tune)
    assert report.min_cosine > (0.9999 if quantize is None else 0.95) and report.tune_steps == tune
    assert any("decoded at load: 1 table" in note for note in report.notes)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not any(tuple(t.dims) == (V, 32) for t in graph.initializer)  # no float (or int8) table in the file
    assert any(t.data_type == onnx.TensorProto.UINT8 and tuple(t.dims) == (V, 8) for t in graph.initializer)
    assert {"Range", "Abs"} <= {n.op_type for n in graph.node}


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_onnx_weight_only_quantization(folders: dict[str, Path], lowbit: dict[int, Path], tmp_path: Path,
                                       quantize: str) -> None:
    """Weight-only: MatMulNBits (int4) or DequantizeLinear (int8) before float products, never a dynamic
    quantization of the activations; a lowbit table keeps its GatherBlockQuantized."""
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx
    from embcompress.export import MIN_COSINE

    dense = export_onnx(folders["bert"], tmp_path / "d.onnx", texts=TEXTS, quantize=quantize, threads=1)
    ops = _ops(tmp_path / "d.onnx")
    assert not {"DynamicQuantizeLinear", "MatMulInteger"} & set(ops)
    assert ("MatMulNBits" if quantize == "int4" else "DequantizeLinear") in ops
    assert dense.fp32_max_abs_diff_embedding < 1e-4 and dense.mean_cosine >= MIN_COSINE[quantize]
    assert dense.bytes < 0.6 * dense.fp32_bytes and set(dense.latency_batch_ms) == {1, 64}
    # a float table becomes int8 rows (int8) or 4-bit groups (int4: the words' and positions' tables; the two rows
    # of token types, under SMALL_TABLE_ROWS, keep int8 rows)
    assert ops.count("GatherBlockQuantized") == (2 if quantize == "int4" else 0)
    packed = export_onnx(lowbit[2], tmp_path / "p.onnx", texts=TEXTS, quantize=quantize, threads=1, latency=False)
    assert _ops(tmp_path / "p.onnx").count("GatherBlockQuantized") >= 1 and packed.mean_cosine >= MIN_COSINE[quantize]
    assert packed.bytes < dense.bytes


def test_onnx_export_refuses_a_3_bit_table(lowbit: dict[int, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from embcompress.cli.main import main

    code = main(["export", str(lowbit[3]), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "3-bit lowbit table has no onnxruntime kernel" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--quantize", "fp16"], "must be one of int8, int4 for a Hugging Face model"),
    (["--device", "cuda"], "checked on the CPU"),
    (["--opset", "9"], "--opset must be between"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--data", "missing.txt"], "missing.txt: no such file"),
    (["--quantize", "int4", "--calibration", "0"], "--calibration must be at least 1"),
])
def test_cli_export_of_a_folder_refuses(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], message: str) -> None:
    pytest.importorskip("onnxruntime")
    from embcompress.cli.main import main

    code = main(["export", str(folders["bert-r50"]), "-o", str(tmp_path / "m.onnx"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_errors(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        hf.load(tmp_path)
    with pytest.raises(InputError, match="unknown task"):
        hf.load(folders["bert"], task="nope")
    import importlib

    real = importlib.import_module

    def fake(name: str, *a: object) -> object:
        if name == "transformers":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(DependencyError, match=r"embcompress\[hf\]"):
        hf.import_transformers()


# --- GroupReduce tables: per-block factors through load, ties, save, distillation and ONNX ---------------------


@pytest.fixture(scope="module")
def grouped(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import numpy as np

    from embcompress.weighting import Counts

    base = tmp_path_factory.mktemp("hf-groupreduce")
    counts = Counts(np.arange(V, 0, -1, dtype=np.float64), "test", V * (V + 1) // 2)
    return {family: factorize(folders[family], reduction=0.5, method="groupreduce", counts=counts, blocks=3,
                              output=base / family).output for family in ("bert", "gpt2")}


def _grouped_rebuild(original: Path, model: torch.nn.Module) -> torch.nn.Module:
    dense = (transformers.AutoModel if "bert" in original.name else transformers.GPT2LMHeadModel).from_pretrained(
        str(original))
    with torch.no_grad():
        dense.get_input_embeddings().weight.copy_(model.get_input_embeddings().dense_weight())
    return dense.eval()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_groupreduce_folder_loads_saves_and_keeps_ties(folders: dict[str, Path], grouped: dict[str, Path],
                                                      tmp_path: Path, family: str) -> None:
    from embcompress.modules import GroupedFactorizedEmbedding

    model = hf.load(grouped[family])
    emb = model.get_input_embeddings()
    assert isinstance(emb, GroupedFactorizedEmbedding) and len(emb.ranks) == 3
    torch.testing.assert_close(forward(model, family), forward(_grouped_rebuild(folders[family], model), family),
                               atol=2e-5, rtol=1e-4)
    if family == "gpt2":
        assert isinstance(model.lm_head, TiedFactorizedLinear) and model.lm_head.tied_to is emb
    with torch.no_grad():
        emb.weight_a[0].add_(0.01)
    out = hf.save(model, tmp_path / "again", like=grouped[family])
    with load_checkpoint(out) as ckpt:
        (_, entry), = ckpt.embcompress_meta["tables"].items()
        assert entry["method"] == "groupreduce" and set(entry["factors"]) <= set(ckpt.infos)
        assert not any(n.startswith("lm_head") for n in ckpt.infos)
    torch.testing.assert_close(forward(hf.load(out), family), forward(model, family))


def test_groupreduce_folder_distils_and_exports(folders: dict[str, Path], grouped: dict[str, Path],
                                               tmp_path: Path) -> None:
    from embcompress import distill

    student = hf.load(grouped["bert"])
    before = [p.detach().clone() for p in student.get_input_embeddings().weight_a]
    teacher = hf.load(folders["bert"])
    distill.distill_model(student, teacher, hf.load_tokenizer(folders["bert"]), TEXTS * 4,
                          distill.DistillConfig(steps=3, layers=1, batch_size=4, device="cpu"))
    after = list(student.get_input_embeddings().weight_a)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the block factors train
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx

    report = export_onnx(grouped["bert"], tmp_path / "g.onnx", texts=TEXTS)
    assert report.max_abs_diff_embedding < 1e-4 and report.min_cosine > 0.9999
    import onnx

    shapes = [tuple(t.dims) for t in onnx.load(str(tmp_path / "g.onnx")).graph.initializer]
    assert (V, 32) not in shapes and (V,) in shapes  # block factors and the groups map, not a dense table


def test_int4_codes_are_gptq_on_calibration_texts(folders: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 on an encoder: GPTQ on calibration inputs (random vocabulary texts when --data has none beyond the
    parity texts) ends nearer to torch than nearest rounding in the same bytes."""
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx
    from embcompress.export.transformers import EncoderFamily

    gptq = export_onnx(folders["bert"], tmp_path / "g.onnx", texts=TEXTS, quantize="int4", threads=1, latency=False)
    assert any("GPTQ" in note for note in gptq.notes)
    monkeypatch.setattr(EncoderFamily, "calibration_feeds", lambda self: None)
    plain = export_onnx(folders["bert"], tmp_path / "p.onnx", texts=TEXTS, quantize="int4", threads=1, latency=False)
    assert not any("GPTQ" in note for note in plain.notes) and gptq.bytes == plain.bytes
    assert 1 - gptq.mean_cosine < 1 - plain.mean_cosine


def test_int4_calibration_count_reaches_gptq(folders: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--calibration N: N texts of --data after the parity ones, or N random vocabulary texts without --data."""
    pytest.importorskip("onnxruntime")
    from embcompress import export_onnx
    from embcompress.export import transformers as et

    seen: list[int] = []
    feeds = et.EncoderFamily.calibration_feeds
    monkeypatch.setattr(et.EncoderFamily, "calibration_feeds",
                        lambda self: seen.append(sum(int(f["attention_mask"].shape[0]) for f in feeds(self)))
                        or feeds(self))
    export_onnx(folders["bert"], tmp_path / "a.onnx", texts=TEXTS, quantize="int4", threads=1, latency=False,
                calibration=5)
    data = tmp_path / "t.txt"
    data.write_text("\n".join(f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(et.PARITY_TEXT_LIMIT + 20)) + "\n",
                    encoding="utf-8")
    export_onnx(folders["bert"], tmp_path / "b.onnx", data=data, quantize="int4", threads=1, latency=False,
                calibration=6)
    assert seen == [5, 6]


def test_int4_tune_keeps_the_bytes_and_ends_nearer_to_the_model(folders: dict[str, Path], tmp_path: Path) -> None:
    """--tune N: the int4 layers take the bytes they take untuned, every block layer is written with the codes
    chosen in torch, and the mean cosine to the model as given (not the tuned copy) is higher."""
    pytest.importorskip("onnxruntime")
    import onnx

    from embcompress import export_onnx

    def int4_bytes(path: Path) -> int:
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        names = {n for node in model.graph.node if node.op_type == "MatMulNBits" for n in node.input}
        return sum(inits[n].ByteSize() for n in names if n in inits)

    plain = export_onnx(folders["bert"], tmp_path / "g.onnx", texts=TEXTS, quantize="int4", threads=1, latency=False)
    tuned = export_onnx(folders["bert"], tmp_path / "t.onnx", texts=TEXTS, quantize="int4", threads=1, latency=False,
                        tune=60)
    # (the file itself may grow by a few vectors: the untuned tiny model's equal biases share one initializer)
    assert tuned.tune_steps == 60 and int4_bytes(tmp_path / "t.onnx") == int4_bytes(tmp_path / "g.onnx") > 0
    assert any("MatMulNBits (4-bit, blocks of 32, asym, tuned)" in note for note in tuned.notes)
    assert any("distilled for 60 steps" in note for note in tuned.notes)
    assert 1 - tuned.mean_cosine < 1 - plain.mean_cosine


def test_int4_tuned_codes_are_the_files_codes(folders: dict[str, Path], tmp_path: Path) -> None:
    """The stored tensors chosen in torch reach the file by the weight's digest: the int4 graph computes what the
    tuned torch model computes, and the file's MatMulNBits tensors are those tensors."""
    pytest.importorskip("onnxruntime")
    import onnx

    from embcompress.export import transformers as et
    from embcompress.export.onnx import write_export
    from embcompress.export.tune import Int4Linear, tune_int4
    from embcompress.export.weights import weight_digest
    from embcompress.methods.lowbit import unpack

    model = hf.load(folders["bert"], task="base")
    tokenizer = hf.load_tokenizer(folders["bert"])
    family = et.EncoderFamily(model, tokenizer, TEXTS, folders["bert"], 32, TEXTS * 3, 0)
    before = [p.detach().clone() for p in model.parameters()]
    student, fixed = tune_int4(model, tokenizer, family.calibration_texts(), family.calibration_batches(), steps=5,
                               block_size=32, scheme="asym", max_length=32)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model as given is untouched
    assert len(fixed) == 2 * 6 and not any(isinstance(m, Int4Linear) for m in student.modules())
    out = tmp_path / "t.onnx"
    written = write_export(et.EncoderFamily(student, tokenizer, TEXTS, folders["bert"], 32), out, quantize="int4",
                           opset=17, device="cpu", fixed=fixed)
    assert written.quantized is not None and written.quantized.score > 0.99  # (its tables are int8 rows there)
    graph = onnx.load(str(out)).graph
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer}
    cast = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    digests = []
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, nb = attrs["K"], attrs["N"], attrs["K"] // 32
        q = unpack(inits[node.input[1]].reshape(n, -1), 4, k).float().reshape(n, nb, 32)
        z = unpack(inits[node.input[3]].reshape(n, -1), 4, nb).float()
        scales = inits[cast[node.input[2]]].reshape(n, nb).float()
        digests.append(weight_digest(((q - z.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, k).numpy()))
    assert sorted(digests) == sorted(fixed)  # the file's tensors give exactly the tuned torch weights


def test_random_calibration_texts_need_vocabulary_words() -> None:
    """int4 without calibration texts in --data: a tokenizer without alphabetic words is one clear line."""
    from embcompress.export.transformers import random_texts

    class Symbols:
        all_special_tokens = ["<s>"]

        def get_vocab(self) -> dict[str, int]:
            return {"<s>": 0, "1": 1, "!": 2}

    with pytest.raises(InputError, match="no alphabetic vocabulary words"):
        random_texts(Symbols(), 3, 4)


def test_int4_tune_refusals(folders: dict[str, Path], tmp_path: Path) -> None:
    from embcompress import export_onnx

    for options in ({"tune": 5}, {"tune": 5, "quantize": "int8"}, {"tune": -1, "quantize": "int4"}):
        with pytest.raises(InputError, match="--tune"):
            export_onnx(folders["bert"], tmp_path / "x.onnx", texts=TEXTS, latency=False, **options)
    pytest.importorskip("onnxruntime")
    with pytest.raises(InputError, match="--tune: no nn.Linear in the transformer blocks of BertModel takes a "
                                         "multiple of 128 inputs"):
        export_onnx(folders["bert"], tmp_path / "x.onnx", texts=TEXTS, latency=False, quantize="int4", tune=5,
                    block_size=128)
    assert not (tmp_path / "x.onnx").exists()


def test_padded_calibration_batches_give_the_moments_of_their_tokens(folders: dict[str, Path], tmp_path: Path) -> None:
    """GPTQ's statistics from padded batches (the attention mask leaving the padding out) equal those of the texts
    one at a time, unpadded."""
    pytest.importorskip("onnxruntime")
    import onnx

    from embcompress import export_onnx
    from embcompress.export import transformers as et
    from embcompress.export.weights import input_moments

    export_onnx(folders["bert"], tmp_path / "f.onnx", texts=TEXTS, threads=1, latency=False)
    model = onnx.load(str(tmp_path / "f.onnx"))
    weights = {i.name for i in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    family = et.EncoderFamily(hf.load(folders["bert"], task="base"), hf.load_tokenizer(folders["bert"]), TEXTS,
                              folders["bert"], 32, [t * (1 + i % 3) for i, t in enumerate(TEXTS * 3)], 0)
    batched = family.calibration_feeds()
    assert any(int(f["attention_mask"].min()) == 0 for f in batched)  # some padding to leave out
    singles = [{k: v[r : r + 1, : int(f["attention_mask"][r].sum())] for k, v in f.items()}
               for f in batched for r in range(f["input_ids"].shape[0])]
    want = input_moments(model, names, singles)
    got = input_moments(model, names, batched, mask="attention_mask")
    unmasked = input_moments(model, names, batched)
    assert want.keys() == got.keys() and len(want) >= 4
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(unmasked[n], want[n], rtol=1e-4, atol=1e-6) for n in names)


def test_a_classifier_refuses_calibration(tmp_path: Path) -> None:
    from embcompress import export_onnx
    from embcompress.errors import InputError
    from tests.builders import write_classifier

    clf = write_classifier(tmp_path / "c.safetensors")
    with pytest.raises(InputError, match="--calibration is for the int4 export of a Hugging Face encoder"):
        export_onnx(clf, tmp_path / "c.onnx", quantize="int8", calibration=64)
    assert not (tmp_path / "c.onnx").exists()
