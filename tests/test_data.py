"""embcompress.data: JSON Lines reading and its errors, tokenizer, vocabulary, labels, batches, word vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embcompress.data import (
    PAD_ID,
    UNK_ID,
    Example,
    LabelSet,
    Vocab,
    collate,
    encode_examples,
    iter_batches,
    load_vectors,
    read_jsonl,
    tokenize,
)
from embcompress.errors import DataError, InputError

GLOVE = Path("/work/shared/data/glove/glove.6B.50d.sst2.txt")


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# read_jsonl


def test_read_jsonl_reads_string_labels_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.jsonl",
        '{"text": "good film", "label": "pos"}\n\n{"text": "bad", "label": "neg", "id": 7}\n   \n',
    )
    examples = read_jsonl(path)
    assert examples == [Example("good film", "pos"), Example("bad", "neg")]
    assert examples[0].source == f"{path}:1"
    assert examples[1].source == f"{path}:3"


@pytest.mark.parametrize(
    ("lines", "bad_line", "needle"),
    [
        (['{"text": "a", "label": 0}', '{"text": "b", "label": 1'], 2, "not valid JSON"),
        (['["a", 0]'], 1, "JSON object"),
        (['{"text": "a", "label": 0}', "", '{"label": 0}'], 3, "'text'"),
        (['{"text": "a"}'], 1, "'label'"),
        (['{"text": 5, "label": 0}'], 1, "'text' must be a string"),
        (['{"text": "a", "label": 0.5}'], 1, "'label' must be"),
        (['{"text": "a", "label": true}'], 1, "'label' must be"),
        (['{"text": "a", "label": null}'], 1, "'label' must be"),
        (['{"text": "a", "label": [1]}'], 1, "'label' must be"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], bad_line: int, needle: str) -> None:
    path = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{bad_line}:")
    assert needle in message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_read_jsonl_empty_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "empty.jsonl", content)
    with pytest.raises(DataError, match="no examples") as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_read_jsonl_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file") as info:
        read_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)
    with pytest.raises(DataError):
        read_jsonl(tmp_path)


def test_read_jsonl_bad_encoding_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "latin.jsonl", b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match="UTF-8") as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_read_real_sst2_dev() -> None:
    examples = read_jsonl("/work/shared/data/sst2/dev.jsonl")
    assert len(examples) == 872
    assert {ex.label for ex in examples} == {0, 1}


# tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("Don't stop; it's fine.", ["do", "n't", "stop", ";", "it", "'s", "fine", "."]),
        ("wo n't", ["wo", "n't"]),
        ("a re-imagining of the U.S. film", ["a", "re-imagining", "of", "the", "u.s.", "film"]),
        ("writer\\/director -lrb- 2002 -rrb-", ["writer\\/director", "-lrb-", "2002", "-rrb-"]),
        ("``quoted'' ... --", ["``", "quoted", "''", "...", "--"]),
        ("3,000 fans (O'Brien)", ["3,000", "fans", "(", "o'brien", ")"]),
        ("Mr. J. Smith", ["mr.", "j.", "smith"]),
        ("crème brûlée", ["crème", "brûlée"]),
        ("  ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_tokenize_keeps_sst_tokens_whole() -> None:
    # SST-2 is already PTB-tokenised: its tokens should come back as they are (they key the GloVe file)
    text = "it 's a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror"
    assert tokenize(text) == text.split()


# Vocab


def test_vocab_build_orders_by_count_then_token() -> None:
    vocab = Vocab.build(["b a c", "a b", "a d"])
    assert vocab.tokens == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert vocab.encode(["a", "zzz", "d"]) == [2, UNK_ID, 5]
    assert len(vocab) == 6
    assert "c" in vocab and "zzz" not in vocab


def test_vocab_min_count_max_size_and_token_lists() -> None:
    texts = [["x", "y", "y", "z", "z", "z"], "w w w w"]
    assert Vocab.build(texts, min_count=2).tokens == ["<pad>", "<unk>", "w", "z", "y"]
    assert Vocab.build(texts, max_size=2).tokens == ["<pad>", "<unk>", "w", "z"]
    with pytest.raises(InputError):
        Vocab.build(texts, min_count=0)


def test_vocab_round_trips_through_json() -> None:
    vocab = Vocab.build(["the cat sat on the mat", "crème brûlée"])
    again = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab
    assert again.tokens == vocab.tokens


@pytest.mark.parametrize("bad", [{}, {"tokens": ["a", "b"]}, {"tokens": ["<pad>", "<unk>", "a", "a"]}, {"tokens": 3}])
def test_vocab_from_dict_rejects_bad_metadata(bad: dict) -> None:
    with pytest.raises(InputError):
        Vocab.from_dict(bad)


# LabelSet


def test_labelset_sorts_and_keeps_types() -> None:
    assert LabelSet.build([1, 0, 1, 2]).labels == [0, 1, 2]
    assert LabelSet.build(["pos", "neg"]).labels == ["neg", "pos"]
    with pytest.raises(InputError, match="mix integers and strings"):
        LabelSet.build(["b", 3, 1])
    labels = LabelSet.build([10, 2])
    assert labels.index(10) == 1 and labels[0] == 2


def test_labelset_unseen_label_names_location() -> None:
    labels = LabelSet.build([0, 1])
    with pytest.raises(DataError) as info:
        labels.index(7, "dev.jsonl:12")
    assert str(info.value).startswith("dev.jsonl:12:")
    assert "7" in str(info.value)
    with pytest.raises(DataError):
        labels.index("1")  # a string is not the int label


def test_labelset_round_trips_through_json() -> None:
    for labels in (LabelSet.build([0, 1]), LabelSet.build(["ABBR", "DESC"])):
        assert LabelSet.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels
    with pytest.raises(InputError):
        LabelSet.from_dict({"labels": []})


# encoding and batches


def test_encode_examples_and_collate(tmp_path: Path) -> None:
    train = [Example("good good film", 1), Example("bad", 0), Example("", 0)]
    vocab = Vocab.build(ex.text for ex in train)
    ds = encode_examples(train, vocab, LabelSet.from_examples(train))
    assert len(ds) == 3
    assert ds[0][0].tolist() == vocab.encode(["good", "good", "film"])
    assert ds[2][0].tolist() == [UNK_ID]  # an empty text becomes one <unk>
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch.ids.dtype == torch.long and batch.ids.shape == (3, 3)
    assert batch.lengths.tolist() == [3, 1, 1]
    assert batch.ids[1, 1:].tolist() == [PAD_ID, PAD_ID]
    assert batch.labels.tolist() == [1, 0, 0]
    capped = collate([ds[0], ds[1]], max_len=2)
    assert capped.ids.shape == (2, 2) and capped.lengths.tolist() == [2, 1]
    short = encode_examples(train, vocab, LabelSet.from_examples(train), max_len=1)
    assert [len(s) for s, _ in short] == [1, 1, 1]
    sizes = [len(b) for b in iter_batches(ds, 2)]
    assert sizes == [2, 1]


def test_encode_examples_unseen_label_names_file_and_line(tmp_path: Path) -> None:
    train = read_jsonl(write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'))
    dev_path = write(tmp_path / "dev.jsonl", '{"text": "a", "label": 0}\n{"text": "c", "label": 2}\n')
    vocab = Vocab.build(ex.text for ex in train)
    with pytest.raises(DataError) as info:
        encode_examples(read_jsonl(dev_path), vocab, LabelSet.from_examples(train))
    assert str(info.value).startswith(f"{dev_path}:2:")


# load_vectors

TINY_GLOVE = "the 1.0 2.0 3.0\ncat 0.5 -0.5 0.25\nDog 4 5 6\nzebra 9 9 9\n"


def test_load_vectors_fills_known_rows_and_zero_pad(tmp_path: Path) -> None:
    path = write(tmp_path / "v.txt", TINY_GLOVE)
    vocab = Vocab.build(["the cat dog mouse"])
    table, found = load_vectors(path, vocab)
    assert table.shape == (len(vocab), 3) and table.dtype == torch.float32
    assert found == 3  # the, cat, and dog through lower-casing of "Dog"
    assert table[vocab.index("the")].tolist() == [1.0, 2.0, 3.0]
    assert table[vocab.index("cat")].tolist() == [0.5, -0.5, 0.25]
    assert table[vocab.index("dog")].tolist() == [4.0, 5.0, 6.0]
    assert torch.all(table[PAD_ID] == 0)
    mouse = table[vocab.index("mouse")]
    assert torch.all(mouse != 0)
    again, _ = load_vectors(path, vocab, seed=0)
    other, _ = load_vectors(path, vocab, seed=1)
    assert torch.equal(again, table) and not torch.equal(other[vocab.index("mouse")], mouse)


def test_load_vectors_random_rows_follow_the_vectors_scale(tmp_path: Path) -> None:
    lines = [f"w{i} " + " ".join(str(100.0 + 0.01 * ((i * 7 + j) % 13)) for j in range(4)) for i in range(50)]
    path = write(tmp_path / "v.txt", "\n".join(lines) + "\n")
    vocab = Vocab.build([[f"w{i}" for i in range(50)] + [f"new{i}" for i in range(200)]])
    table, found = load_vectors(path, vocab)
    assert found == 50
    missing = torch.stack([table[vocab.index(f"new{i}")] for i in range(200)])
    assert (missing.mean() - 100.06).abs() < 0.05  # centred on the pretrained vectors, not on zero
    assert missing.std() < 0.2


def test_load_vectors_header_and_explicit_dim(tmp_path: Path) -> None:
    path = write(tmp_path / "w2v.txt", "2 3\nthe 1 2 3\ncat 4 5 6\n")
    table, found = load_vectors(path, Vocab.build(["the cat"]), dim=3)
    assert found == 2 and table.shape[1] == 3
    with pytest.raises(DataError) as info:
        load_vectors(path, Vocab.build(["the"]), dim=4)
    assert str(info.value).startswith(f"{path}:1:")


@pytest.mark.parametrize(
    ("content", "bad_line", "needle"),
    [
        ("the 1 2 3\ncat 1 2\n", 2, "expected 3"),
        ("the 1 2 3\ncat 1 2 3 4\n", 2, "expected 3"),
        ("the 1 2 3\ncat 1 x 3\n", 2, "not a number"),
        ("the 1 2 3\n\ncat 1 nan 3\n", 3, "not finite"),
        ("the\n", 1, "word followed by numbers"),
    ],
)
def test_load_vectors_malformed_lines_name_file_and_line(
    tmp_path: Path, content: str, bad_line: int, needle: str
) -> None:
    path = write(tmp_path / "v.txt", content)
    with pytest.raises(DataError) as info:
        load_vectors(path, Vocab.build(["the cat"]))
    assert str(info.value).startswith(f"{path}:{bad_line}:")
    assert needle in str(info.value)


def test_load_vectors_empty_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no vectors"):
        load_vectors(write(tmp_path / "e.txt", ""), Vocab.build(["a"]))
    with pytest.raises(DataError, match="no such file"):
        load_vectors(tmp_path / "missing.txt", Vocab.build(["a"]))


@pytest.mark.skipif(not GLOVE.exists(), reason="the shared GloVe file is not present")
def test_load_vectors_real_glove_file() -> None:
    vocab = Vocab.build(["the film 's writer\\/director does n't -lrb- really -rrb- care zzqxj"])
    table, found = load_vectors(GLOVE, vocab)
    assert table.shape == (len(vocab), 50)
    assert found == len(vocab) - 3  # all but <pad>, <unk> and the made-up word
    assert table[vocab.index("the"), :3].tolist() == pytest.approx([0.418, 0.24968, -0.41242])
