import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embcompress import load_checkpoint
from embcompress.errors import DataError, InputError
from embcompress.factorize import factorize
from embcompress.svd import factorize_matrix, factorize_weighted
from embcompress.weighting import Counts, count_corpus, load_counts, read_counts


def _weighted_err(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    return float(((W.double() - a.double() @ b.double()) ** 2).sum(1).mul(w).sum())


def test_weighted_svd_is_optimal_for_its_weights() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 24, generator=g)
    w = torch.rand(300, generator=g).pow(4) * 1000 + 1  # a few heavy rows, like word frequencies
    k = 5
    weighted = factorize_weighted(W, k, w)
    plain = factorize_matrix(W, k)
    assert weighted.a.shape == (300, k) and weighted.b.shape == (k, 24) and weighted.method == "weighted"
    # each wins on its own objective
    assert _weighted_err(W, weighted.a, weighted.b, w) < 0.9 * _weighted_err(W, plain.a, plain.b, w)
    assert weighted.rel_error > plain.rel_error
    measured = float((W.double() - weighted.a.double() @ weighted.b.double()).norm() / W.double().norm())
    assert weighted.rel_error == pytest.approx(measured, rel=1e-5)
    # against the closed form: the SVD of diag(sqrt(w)) W, scaled back
    s = w.double().sqrt()
    U, S, Vh = torch.linalg.svd(W.double() * s[:, None], full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k] / s[:, None]
    assert _weighted_err(W, weighted.a, weighted.b, w) == pytest.approx(_weighted_err(W, best, torch.eye(24), w),
                                                                        rel=1e-4)
    # equal weights give the plain SVD
    same = factorize_weighted(W, k, torch.full((300,), 7.0))
    assert same.rel_error == pytest.approx(plain.rel_error, rel=1e-5)


@pytest.mark.parametrize("weights, match", [(torch.ones(10), "10 row weights"), (torch.zeros(300), "positive"),
                                            (torch.full((300,), float("nan")), "finite")])
def test_weighted_svd_refuses_bad_weights(weights: torch.Tensor, match: str) -> None:
    with pytest.raises(InputError, match=match):
        factorize_weighted(torch.randn(300, 8), 2, weights)


def test_read_counts_formats(tmp_path: Path) -> None:
    plain = tmp_path / "c.txt"
    plain.write_text("5\n0\n2\n")
    assert read_counts(plain, 3).counts.tolist() == [5, 0, 2]
    keyed = tmp_path / "k.txt"
    keyed.write_text("b 4\nzzz 9\na 1\nb 1\n")
    c = read_counts(keyed, 3, ["<pad>", "a", "b"])
    assert c.counts.tolist() == [0, 1, 5] and c.unmatched == 1 and c.tokens_counted == 6
    ids = tmp_path / "ids.txt"
    ids.write_text("2 3\n0 1\n")
    assert read_counts(ids, 3).counts.tolist() == [1, 0, 3]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"a": 2, "b": 3}))
    assert read_counts(js, 3, ["<pad>", "a", "b"]).counts.tolist() == [0, 2, 3]
    js.write_text(json.dumps([1, 2, 3]))
    assert read_counts(js, 3).counts.tolist() == [1, 2, 3]
    w = Counts(np.array([0.0, 3.0]), "x", 3).weights(0.5)
    assert w.tolist() == [0.5, 3.5]
    assert Counts(np.array([0.0, 3.0]), "x", 3).weights(1.0, 0.5).tolist() == [1.0, 2.0]
    with pytest.raises(InputError, match="weight-power"):
        Counts(np.array([1.0]), "x", 1).weights(1.0, -1.0)


@pytest.mark.parametrize("text, match", [("1\n2\n", "2 counts"), ("a -1\n", "non-negative"), ("a b c\n", "3 fields"),
                                         ("zzz 4\n", "no count matched"), ("7 1\n", "beyond"), ("x\ny\nz\n", "number")])
def test_read_counts_refuses_bad_files(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.txt"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_counts(p, 3, None if "7 1" in text or "x\n" in text or "1\n2" in text else ["<pad>", "a", "b"])


def test_count_corpus_uses_the_classifiers_vocabulary(classifier, tmp_path: Path) -> None:
    model, train = classifier
    with load_checkpoint(model) as ckpt:
        V = ckpt.infos["embedding.weight"].shape[0]
    c = count_corpus(model, train, V)
    assert c.counts.shape == (V,) and c.counts[0] == 0 and c.counts[2:].sum() > 0
    assert load_counts(model, None, None, train).counts.tolist() == c.counts.tolist()
    assert load_counts(model, None, None, None) is None
    with pytest.raises(InputError, match="not both"):
        load_counts(model, None, train, train)


def test_factorize_weighted_records_its_weighting(classifier, tmp_path: Path) -> None:
    model, train = classifier
    counts = load_counts(model, None, None, train)
    out = tmp_path / "w.safetensors"
    result = factorize(model, reduction=0.5, method="weighted", counts=counts, output=out)
    table = result.tables[0]
    assert table.method == "weighted" and table.weighting["tokens_counted"] == counts.tokens_counted
    with load_checkpoint(out) as ckpt:
        meta = ckpt.embcompress_meta["tables"]["embedding.weight"]
    assert meta["method"] == "weighted" and meta["weighting"]["smoothing"] == 1.0
    with pytest.raises(InputError, match="needs token counts"):
        factorize(model, reduction=0.5, method="weighted", output=tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="need --method weighted"):
        factorize(model, reduction=0.5, counts=counts, output=tmp_path / "x.safetensors")
    short = Counts(np.ones(5), "short", 5)
    with pytest.raises(InputError, match="5 token counts"):
        factorize(model, reduction=0.5, method="weighted", counts=short, output=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_corpus_needs_a_tokenizer_in_a_hf_folder(tmp_path: Path) -> None:
    from tests.builders import bert_state, write_hf_folder

    folder = write_hf_folder(tmp_path / "bert", bert_state())
    texts = tmp_path / "t.txt"
    texts.write_text("hello world\n")
    assert count_corpus(folder, texts, 1000).tokens_counted > 0  # vocab.txt is there
    (folder / "vocab.txt").unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        count_corpus(folder, texts, 1000)
