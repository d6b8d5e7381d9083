"""Vocabulary trimming (``embcompress.trim``): fewer rows, the same outputs for in-corpus text, ties kept.

Classifier tests build a tiny DAN; the Hugging Face tests build tiny BERT, GPT-2 and T5 folders with their tokenizers
(WordPiece, byte-level BPE, sentencepiece-style Unigram) and are skipped without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embcompress.checkpoint import load_checkpoint
from embcompress.classifier import load_classifier
from embcompress.data import UNK_ID, tokenize
from embcompress.errors import CheckpointError, DataError, InputError, OutputError
from embcompress.factorize import factorize
from embcompress.quant import quantize
from embcompress.trim import TRIM_META_KEY, TrimResult, trim
from tests.builders import dan_state, write_classifier

torch.set_num_threads(1)

CORPUS = ["w1 w2 w3 w4 w5", "w5 w7 w1 unknownword", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20",
          "w1 w1 w1 w2"]


def _texts(tmp_path: Path, texts: list[str], name: str = "corpus.txt") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(texts) + "\n")
    return p


def _logits(model_path: Path, texts: list[str]) -> torch.Tensor:
    clf = load_classifier(model_path)
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([clf.vocab.encode(tokenize(text)) or [UNK_ID]])
            rows.append(clf.model(ids, torch.tensor([ids.shape[1]])))
    return torch.cat(rows)


@pytest.fixture
def clf(tmp_path: Path) -> Path:
    return write_classifier(tmp_path / "clf.safetensors")


def _nothing_new(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before


# --- classifiers ----------------------------------------------------------------------------------------------


def test_classifier_trim_keeps_outputs(clf: Path, tmp_path: Path) -> None:
    corpus = _texts(tmp_path, CORPUS)
    out = tmp_path / "dan.trim.safetensors"
    result = trim(clf, corpus, out)
    assert isinstance(result, TrimResult)
    used = {t for text in CORPUS for t in tokenize(text) if t != "unknownword"}
    assert result.rows_before == 122 and result.rows_after == 2 + len(used) == result.tokens_kept
    assert result.corpus_tokens == len(used) and result.special_tokens == 2 and result.texts_changed == 0
    assert result.coverage == 1.0 and result.bytes_after < result.bytes_before
    assert result.file_bytes_after == out.stat().st_size < result.file_bytes_before
    (t,) = result.tensors
    assert t.name == "embedding.weight" and t.shape_before == (122, 8) and t.shape_after == (result.rows_after, 8)
    trimmed = load_classifier(out)
    assert trimmed.vocab.tokens[:2] == ["<pad>", "<unk>"] and set(trimmed.vocab.tokens[2:]) == used
    assert trimmed.model.embedding.weight.shape[0] == result.rows_after
    assert torch.equal(_logits(out, CORPUS), _logits(clf, CORPUS))
    assert torch.equal(_logits(out, ["w99 w1"])[0], _logits(clf, ["unknownword w1"])[0])  # out of corpus -> <unk>
    with load_checkpoint(out) as ckpt:
        record = json.loads(ckpt.metadata[TRIM_META_KEY])
    assert record["rows_before"] == 122 and record["rows_after"] == result.rows_after
    d = result.to_dict()
    assert d["tokens_kept"] == result.rows_after and d["tensors"][0]["role"] == "table"


def test_keep_top_and_min_count(clf: Path, tmp_path: Path) -> None:
    corpus = _texts(tmp_path, CORPUS)
    top = trim(clf, corpus, tmp_path / "top.safetensors", keep_top=3)
    assert top.rows_after == 2 + 3 and top.corpus_tokens == 3 and top.dropped_corpus_tokens == 17 - 3
    assert set(load_classifier(tmp_path / "top.safetensors").vocab.tokens[2:]) == {"w1", "w2", "w5"}
    assert 0 < top.coverage < 1 and top.texts_changed == 3
    frequent = trim(clf, corpus, tmp_path / "min.safetensors", min_count=2)
    assert set(load_classifier(tmp_path / "min.safetensors").vocab.tokens[2:]) == {"w1", "w2", "w5"}
    assert frequent.rows_after == 5
    # texts whose tokens were all kept still give the same logits
    assert torch.equal(_logits(tmp_path / "min.safetensors", ["w1 w2 w5"]), _logits(clf, ["w1 w2 w5"]))


def test_factorized_classifier_trims_w_a(clf: Path, tmp_path: Path) -> None:
    corpus = _texts(tmp_path, CORPUS)
    fact = tmp_path / "dan.k4.safetensors"
    factorize(clf, rank=4, output=fact)
    out = tmp_path / "dan.k4.trim.safetensors"
    result = trim(fact, corpus, out)
    assert [(t.name, t.role) for t in result.tensors] == [("embedding.weight_a", "W_a")]
    with load_checkpoint(out) as ckpt, load_checkpoint(fact) as before:
        assert ckpt.infos["embedding.weight_a"].shape == (result.rows_after, 4)
        assert torch.equal(ckpt.tensor("embedding.weight_b"), before.tensor("embedding.weight_b"))
        assert ckpt.embcompress_meta["tables"]["embedding.weight"]["shape"] == [result.rows_after, 8]
        assert [h["op"] for h in ckpt.embcompress_meta["history"]] == ["factorize", "trim"]
    assert torch.equal(_logits(out, CORPUS), _logits(fact, CORPUS))


def test_trim_then_factorize_then_quantize(clf: Path, tmp_path: Path) -> None:
    corpus = _texts(tmp_path, CORPUS)
    trimmed = tmp_path / "dan.trim.safetensors"
    trim(clf, corpus, trimmed)
    fact = factorize(trimmed, rank=3, output=tmp_path / "dan.trim.k3.safetensors")
    assert fact.tables[0].shape == (trim_rows(trimmed), 8)
    clf_fact = load_classifier(fact.output)
    assert clf_fact.is_factorized and clf_fact.vocab == load_classifier(trimmed).vocab
    logits = _logits(Path(fact.output), CORPUS)
    assert logits.shape == (len(CORPUS), 3) and torch.isfinite(logits).all()
    q = quantize(fact.output, 8, tmp_path / "dan.trim.k3.int8.safetensors", False)
    assert torch.allclose(_logits(Path(q.output), CORPUS), logits, atol=0.05)


def trim_rows(path: Path) -> int:
    with load_checkpoint(path) as ckpt:
        return ckpt.infos["embedding.weight"].shape[0]


def test_bad_inputs_write_nothing(clf: Path, tmp_path: Path, dan_file: Path) -> None:
    corpus = _texts(tmp_path, CORPUS)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(DataError, match="no such corpus"):
        trim(clf, tmp_path / "missing.txt", tmp_path / "o.safetensors")
    with pytest.raises(DataError, match="no token of the corpus is in the vocabulary"):
        trim(clf, _texts(tmp_path, ["zzz yyy", "qqq"], "foreign.txt"), tmp_path / "o.safetensors")
    before.add("foreign.txt")
    with pytest.raises(OutputError, match="overwrite the input"):
        trim(clf, corpus, clf)
    with pytest.raises(InputError, match="tokenizer is unknown"):
        trim(dan_file, corpus, tmp_path / "o.safetensors")
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    before.add("exists.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        trim(clf, corpus, tmp_path / "exists.safetensors")
    with pytest.raises(InputError, match="--keep-top"):
        trim(clf, corpus, tmp_path / "o.safetensors", keep_top=0)
    with pytest.raises(InputError, match="--min-count"):
        trim(clf, corpus, tmp_path / "o.safetensors", min_count=0)
    with pytest.raises(DataError, match="passes --min-count"):
        trim(clf, corpus, tmp_path / "o.safetensors", min_count=1000)
    q = quantize(clf, 8, tmp_path / "dan.int8.safetensors", False)
    before.add("dan.int8.safetensors")
    with pytest.raises(InputError, match="trim before quantizing"):
        trim(q.output, corpus, tmp_path / "o.safetensors")
    _nothing_new(tmp_path, before)
    assert trim(clf, corpus, tmp_path / "exists.safetensors", force=True).rows_after < 122


def test_plain_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(dan_state(), path)
    with pytest.raises(InputError, match="tokenizer is unknown"):
        trim(path, _texts(tmp_path, CORPUS), tmp_path / "o.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file(dan_state(), str(plain), metadata={"embcompress.model": "{not json"})
    with pytest.raises(CheckpointError, match="damaged"):
        trim(plain, _texts(tmp_path, CORPUS), tmp_path / "o.safetensors")


# --- Hugging Face folders -----------------------------------------------------------------------------------

HF_WORDS = ["the", "a", "of", "and", "to", "is", "in", "it", "film", "movie", "good", "bad", "model", "table",
            "run", "##s", "##ing", "##ed", "ab", "##bd", "c"]
HF_CORPUS = ["the film is good", "a bad movie runs", "running the model", "tables of it",
             "abd cbd a", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25",
             "w26 w27 w28 w29 w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 zebra"]


def _bert_vocab(n: int = 200) -> list[str]:
    import string

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *HF_WORDS]
    return tokens + [f"w{i}" for i in range(n - len(tokens))]


def _tiny_bert(folder: Path, *, tokenizer_json: bool = True, vocab_txt: bool = True) -> Path:
    transformers = pytest.importorskip("transformers")
    tokens = _bert_vocab()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=32, max_position_embeddings=64,
                                  pad_token_id=0)
    transformers.BertModel(cfg).eval().save_pretrained(str(folder))
    if tokenizer_json:
        transformers.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(str(folder))
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                  "do_lower_case": True}))
    if vocab_txt:
        (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens))
    return folder


def _tiny_gpt2(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([*HF_CORPUS, "the quick brown fox jumps over the lazy dog", "tokenizers merge pairs"] * 5,
                            trainer)
    tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _tiny_t5_unigram(folder: Path, *, spiece: bool = False) -> Path:
    """A tiny T5 with a sentencepiece-style Unigram tokenizer built in memory (``tokenizer.json``; with ``spiece``,
    also a stand-in ``spiece.model`` that trim must leave out)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    uni.train_from_iterator([*HF_CORPUS, "the quick brown fox jumps over the lazy dog", "pieces of words"] * 5,
                            trainer)
    tok = transformers.T5TokenizerFast(tokenizer_object=uni, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       extra_ids=0)
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    if spiece:
        (folder / "spiece.model").write_bytes(b"not a real sentencepiece model")
    return folder


def _encode(folder: Path, texts: list[str]) -> list[list[int]]:
    from embcompress import hf

    return hf.load_tokenizer(folder)(texts, add_special_tokens=True)["input_ids"]


def _bert_states(folder: Path, texts: list[str]) -> list[torch.Tensor]:
    from embcompress import hf

    model, tok = hf.load(folder, task="base"), hf.load_tokenizer(folder)
    with torch.no_grad():
        return [model(**tok([t], return_tensors="pt")).last_hidden_state[0] for t in texts]


def _old_ids(old: Path, new: Path) -> list[int]:
    """The old id of each token of the new vocabulary, in new-id order."""
    from embcompress import hf

    before = hf.load_tokenizer(old).get_vocab()
    after = hf.load_tokenizer(new).get_vocab()
    return [before[t] for t, _ in sorted(after.items(), key=lambda kv: kv[1])]


@pytest.mark.parametrize("files", ["both", "tokenizer.json", "vocab.txt"])
def test_bert_wordpiece_trim(tmp_path: Path, files: str) -> None:
    src = _tiny_bert(tmp_path / "bert", tokenizer_json=files != "vocab.txt", vocab_txt=files != "tokenizer.json")
    corpus = _texts(tmp_path, HF_CORPUS)
    out = tmp_path / "bert-trim"
    result = trim(src, corpus, out)
    assert result.kind == "hf" and "WordPiece" in result.tokenizer and result.texts_changed == 0
    assert result.rows_before == 200 and result.rows_after < 110 and result.special_tokens == 5
    assert [t.name for t in result.tensors] == ["embeddings.word_embeddings.weight"]
    expected = {"config.json", *(["tokenizer.json"] if files != "vocab.txt" else []),
                *(["vocab.txt"] if files != "tokenizer.json" else [])}
    assert expected <= set(result.files_rewritten)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == result.rows_after
    keep = _old_ids(src, out)
    assert len(keep) == result.rows_after and keep == sorted(keep)
    assert [[keep[i] for i in ids] for ids in _encode(out, HF_CORPUS)] == _encode(src, HF_CORPUS)
    for before, after in zip(_bert_states(src, HF_CORPUS), _bert_states(out, HF_CORPUS), strict=True):
        assert torch.allclose(before, after, atol=1e-6)
    # "abd" is [UNK] before (the walk takes "ab" then fails); keeping "ab" keeps it [UNK] after
    assert _encode(out, ["abd"])[0][1] == _encode(out, ["[UNK]"])[0][1]
    assert _encode(out, ["xylophone"])[0][1:-1] == _encode(out, ["[UNK]"])[0][1:-1]  # out of corpus -> [UNK]


def test_gpt2_bpe_trim_keeps_tie_and_logits(tmp_path: Path) -> None:
    from embcompress import hf

    src = _tiny_gpt2(tmp_path / "gpt2")
    corpus = _texts(tmp_path, HF_CORPUS)
    out = tmp_path / "gpt2-trim"
    result = trim(src, corpus, out)
    assert "BPE" in result.tokenizer and result.texts_changed == 0 and result.rows_after < result.rows_before
    assert result.structural_tokens > 0  # the byte alphabet and the merges' parts
    keep = _old_ids(src, out)
    assert [[keep[i] for i in ids] for ids in _encode(out, HF_CORPUS)] == _encode(src, HF_CORPUS)
    before, after = hf.load(src), hf.load(out)
    assert after.lm_head.weight.data_ptr() == after.transformer.wte.weight.data_ptr()
    assert after.lm_head.weight.shape[0] == result.rows_after
    for text in HF_CORPUS:
        old = torch.tensor([_encode(src, [text])[0]])
        new = torch.tensor([_encode(out, [text])[0]])
        with torch.no_grad():
            lo, ln = before(old).logits, after(new).logits
        assert torch.allclose(lo[..., keep], ln, atol=1e-5)
    assert _encode(out, ["completely new text!"])[0]  # the byte alphabet still covers any text


@pytest.mark.parametrize("spiece", [False, True], ids=["tokenizer.json", "with spiece.model"])
def test_t5_unigram_trim_keeps_ties_and_states(tmp_path: Path, spiece: bool) -> None:
    from embcompress import hf

    src = _tiny_t5_unigram(tmp_path / "t5", spiece=spiece)
    corpus = _texts(tmp_path, HF_CORPUS)
    out = tmp_path / "t5-trim"
    result = trim(src, corpus, out)
    assert "Unigram" in result.tokenizer and result.texts_changed == 0 and result.rows_after < result.rows_before
    assert not (out / "spiece.model").exists()
    keep = _old_ids(src, out)
    assert [[keep[i] for i in ids] for ids in _encode(out, HF_CORPUS)] == _encode(src, HF_CORPUS)
    before, after = hf.load(src), hf.load(out)
    assert after.shared.weight.shape[0] == result.rows_after
    assert after.encoder.embed_tokens.weight.data_ptr() == after.shared.weight.data_ptr()
    for text in HF_CORPUS:
        old = torch.tensor([_encode(src, [text])[0]])
        new = torch.tensor([_encode(out, [text])[0]])
        with torch.no_grad():
            assert torch.allclose(before.encoder(input_ids=old).last_hidden_state,
                                  after.encoder(input_ids=new).last_hidden_state, atol=1e-5)
    assert _encode(out, ["completely new text"])[0]  # unknown pieces fall back to <unk>


def test_factorized_bert_and_trim_then_factorize(tmp_path: Path) -> None:
    from embcompress import hf

    src = _tiny_bert(tmp_path / "bert")
    corpus = _texts(tmp_path, HF_CORPUS)
    fact = tmp_path / "bert-r50"
    factorize(src, reduction=0.5, output=fact)
    ft = trim(fact, corpus, tmp_path / "bert-r50-trim")
    assert [t.role for t in ft.tensors] == ["W_a"]
    for before, after in zip(_bert_states(fact, HF_CORPUS), _bert_states(tmp_path / "bert-r50-trim", HF_CORPUS),
                             strict=True):
        assert torch.allclose(before, after, atol=1e-6)
    trimmed = tmp_path / "bert-trim"
    trim(src, corpus, trimmed)
    result = factorize(trimmed, rank=4, output=tmp_path / "bert-trim-k4")
    assert result.tables[0].shape[0] == json.loads((trimmed / "config.json").read_text())["vocab_size"]
    model = hf.load(tmp_path / "bert-trim-k4", task="base")
    assert model.get_input_embeddings().weight_a.shape == (result.tables[0].shape[0], 4)
    assert all(torch.isfinite(s).all() for s in _bert_states(tmp_path / "bert-trim-k4", HF_CORPUS))


def test_hf_folder_without_tokenizer_is_refused(tmp_path: Path, hf_folder: Path) -> None:
    pytest.importorskip("transformers")
    (hf_folder / "vocab.txt").unlink()
    with pytest.raises(InputError, match="tokenizer is unknown"):
        trim(hf_folder, _texts(tmp_path, HF_CORPUS), tmp_path / "o")
    assert not (tmp_path / "o").exists()
