"""Label-free recovery (``embcompress.distill``) and the similarity report, on a tiny random BERT (no download).

Skipped when transformers is not installed (the ``[hf]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from embcompress import distill, hf  # noqa: E402
from embcompress.checkpoint import load_checkpoint  # noqa: E402
from embcompress.cli.main import main  # noqa: E402
from embcompress.errors import DataError, InputError, Interrupted  # noqa: E402
from embcompress.factorize import factorize  # noqa: E402
from embcompress.groupreduce import group_reduce  # noqa: E402
from embcompress.modules import FactorizedEmbedding, GroupedFactorizedEmbedding  # noqa: E402
from tests.test_hf import TEXTS, WORDS, tiny_bert, tiny_gpt2, tiny_t5  # noqa: E402

torch.set_num_threads(1)


def sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    pool = WORDS + [f"w{i}" for i in range(120)]
    return [" ".join(pool[int(j)] for j in torch.randint(0, len(pool), (int(k),), generator=g))
            for k in torch.randint(3, 12, (n,), generator=g)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("distill")
    teacher = tiny_bert(base / "bert")
    # a random BERT's embeddings (std 0.02) hardly move its sentence embeddings; scaled up, token identity
    # dominates them, as in a trained model, and a rank-4 table starts far from the original (cosine ~0.5)
    model = transformers.BertModel.from_pretrained(str(teacher))
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(20.0)
    model.save_pretrained(str(teacher))
    factorize(teacher, rank=4, output=base / "bert-k4")
    (base / "train.txt").write_text("\n".join(sentences(200, 0)) + "\n")
    (base / "dev.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in sentences(40, 1)))
    return {"teacher": teacher, "student": base / "bert-k4", "train": base / "train.txt", "dev": base / "dev.jsonl"}


def test_read_texts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\n two words \n")
    assert hf.read_texts(tmp_path / "a.txt") == ["one", " two words "]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n\n{"text": "y"}\n')
    assert hf.read_texts(tmp_path / "b.jsonl") == ["x", "y"]
    assert hf.read_texts(tmp_path / "b.jsonl", limit=1) == ["x"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        hf.read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no texts"):
        hf.read_texts(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such file"):
        hf.read_texts(tmp_path / "missing.txt")


def test_distill_recovers_and_writes_a_loadable_folder(pair: dict[str, Path], tmp_path: Path) -> None:
    config = distill.DistillConfig(steps=60, sentence_steps=10, layers=1, batch_size=16, lr=5e-3, device="cpu")
    seen: list[tuple[str, int]] = []
    report = distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "out", config=config,
                             dev_path=pair["dev"], on_step=lambda phase, step, total, loss: seen.append((phase, step)))
    assert [p["phase"] for p in report.phases] == ["layer", "sentence"]
    assert seen[-1] == ("sentence", 10) and len(seen) == 70
    assert report.phases[0]["loss_last"] < report.phases[0]["loss_first"]
    assert report.before["mean"] < 0.7 and report.after["mean"] > report.before["mean"] + 0.05
    model = hf.load(report.output)
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding) and model.get_input_embeddings().rank == 4
    with load_checkpoint(report.output) as ckpt:
        meta = ckpt.embcompress_meta
    assert meta["distilled"]["dev_cosine_after"] == pytest.approx(report.after["mean"])
    assert meta["tables"]["embeddings.word_embeddings.weight"]["rank"] == 4
    sim = distill.similarity_to(report.output, pair["teacher"], pair["dev"], device="cpu")
    assert sim.mean == pytest.approx(report.after["mean"], abs=1e-6) and sim.count == 40


def test_layer_phase_leaves_upper_layers_alone(pair: dict[str, Path]) -> None:
    student, teacher = hf.load(pair["student"]), hf.load(pair["teacher"])
    top = {k: v.clone() for k, v in student.encoder.layer[1].state_dict().items()}
    bottom = {k: v.clone() for k, v in student.encoder.layer[0].state_dict().items()}
    tok = hf.load_tokenizer(pair["student"])
    config = distill.DistillConfig(steps=5, layers=1, batch_size=8, lr=1e-3, vocab_mix=0.5, device="cpu")
    distill.distill_model(student, teacher, tok, sentences(30, 2), config)
    assert all(torch.equal(v, student.encoder.layer[1].state_dict()[k]) for k, v in top.items())
    assert not all(torch.equal(v, student.encoder.layer[0].state_dict()[k]) for k, v in bottom.items())
    assert len(student.encoder.layer) == 2 and all(p.requires_grad for p in student.parameters())


def test_sentence_only_mse(pair: dict[str, Path]) -> None:
    student, teacher = hf.load(pair["student"]), hf.load(pair["teacher"])
    tok = hf.load_tokenizer(pair["student"])
    config = distill.DistillConfig(steps=4, layers=0, loss="mse", batch_size=8, device="cpu")
    phases = distill.distill_model(student, teacher, tok, sentences(20, 3), config)
    assert [p["phase"] for p in phases] == ["sentence"] and phases[0]["loss"] == "mse"


def test_vocabulary_words(pair: dict[str, Path]) -> None:
    words = distill.vocabulary_words(hf.load_tokenizer(pair["student"]))
    assert "film" in words and "[PAD]" not in words and not any(w.startswith("##") for w in words)


def test_config_and_input_errors(pair: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--loss"):
        distill.DistillConfig(loss="l1").validate()
    with pytest.raises(InputError, match="--vocab-mix"):
        distill.DistillConfig(vocab_mix=1.0).validate()
    with pytest.raises(InputError, match="--layers must be between 1 and 2"):
        distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "o",
                        config=distill.DistillConfig(layers=5, steps=1, device="cpu"))
    with pytest.raises(InputError, match="Hugging Face model folder"):
        distill.distill(pair["student"], pair["train"], pair["train"], tmp_path / "o")
    other = tiny_bert(tmp_path / "other", "BertModel")
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):  # noqa: B017 - a teacher of another shape is refused one way or another
        distill.similarity_to(pair["student"], other, pair["dev"], device="cpu")


def test_coverage_groups_split_the_texts_by_their_rarest_token() -> None:
    groups = distill.coverage_groups([0.9, 0.8, 0.7, 1.0, 0.6], [0, 1, 2, 12, 0])
    assert [(g["group"], g["texts"]) for g in groups] == [("0", 2), ("1-2", 2), ("3-9", 0), ("10+", 1)]
    assert groups[0]["mean"] == pytest.approx(0.75) and groups[1]["mean"] == pytest.approx(0.75)
    assert groups[2]["mean"] is None and groups[3]["mean"] == pytest.approx(1.0)


def test_rarest_counts(pair: dict[str, Path]) -> None:
    tok = hf.load_tokenizer(pair["teacher"])
    counts = distill.token_counts(tok, ["the film is good", "the film is bad", "the film"])
    assert counts[tok.convert_tokens_to_ids("film")] == 3 and counts[tok.cls_token_id] == 3
    assert distill.rarest_counts(tok, ["the film", "the good film", "a film"], counts) == [3, 1, 0]


def test_cli_finetune_teacher_and_evaluate_similarity(pair: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    code = main(["finetune", str(pair["student"]), "--teacher", str(pair["teacher"]), "--data", str(pair["train"]),
                 "--dev", str(pair["dev"]), "--steps", "8", "--vocab-steps", "3", "--layers", "1", "--batch-size", "8",
                 "--device", "cpu", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["output"] == str(out) and data["after"]["mean"] > 0
    assert [(p["phase"], p["steps"]) for p in data["phases"]] == [("layer", 8), ("vocab", 3)]
    assert data["phases"][1]["tokens"] > 0 and data["options"]["vocab_steps"] == 3
    code = main(["evaluate", str(out), "--similarity-to", str(pair["teacher"]), "--data", str(pair["dev"]),
                 "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sim = json.loads(captured.out)
    assert sim["mean"] == pytest.approx(data["after"]["mean"], abs=1e-6) and sim["count"] == 40
    code = main(["evaluate", str(out), "--similarity-to", str(pair["teacher"]), "--data", str(pair["dev"]),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "mean cosine" in captured.out
    # the workspace record names what was written, with the cosine
    record = json.loads(Path("embcompress-workspace.json").read_text())
    assert [e["command"] for e in record["entries"]] == ["finetune", "evaluate", "evaluate"]
    assert record["entries"][-1]["figures"]["cosine_mean"] == pytest.approx(sim["mean"], abs=1e-6)
    assert [a["role"] for a in record["entries"][-1]["inputs"]] == ["model", "original", "texts"]
    # --coverage-of: the same cosines, grouped by how often each text's rarest token occurs in the recovery texts
    code = main(["evaluate", str(out), "--similarity-to", str(pair["teacher"]), "--data", str(pair["dev"]),
                 "--coverage-of", str(pair["train"]), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    cov = json.loads(captured.out)["coverage"]
    assert [g["group"] for g in cov] == ["0", "1-2", "3-9", "10+"] and sum(g["texts"] for g in cov) == 40
    assert sum(g["texts"] * g["mean"] for g in cov if g["texts"]) / 40 == pytest.approx(sim["mean"], abs=1e-5)
    code = main(["evaluate", str(out), "--similarity-to", str(pair["teacher"]), "--data", str(pair["dev"]),
                 "--coverage-of", str(pair["train"]), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "rarest token occurs in" in captured.out and "10+" in captured.out
    code = main(["evaluate", str(out), "--data", str(pair["dev"]), "--coverage-of", str(pair["train"])])
    captured = capsys.readouterr()
    assert code == 2 and "--coverage-of needs --similarity-to" in captured.err and "Traceback" not in captured.err
    code = main(["evaluate", str(out), "--similarity-to", str(pair["teacher"]), "--data", str(pair["dev"]),
                 "--coverage-of", str(tmp_path / "nope.txt"), "--device", "cpu"])
    assert code != 0 and "nope.txt" in capsys.readouterr().err
    code = main(["finetune", str(pair["student"]), "--teacher", str(pair["teacher"]), "--data",
                 str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    code = main(["finetune", str(pair["student"]), "--teacher", str(pair["teacher"]), "--data", str(pair["train"]),
                 "--vocab-steps", "-1", "-o", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "--vocab-steps must be 0 or more" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_finetune_with_labels_cli(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.builders import write_sentiment_jsonl

    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 48, seed=0)
    dev = write_sentiment_jsonl(tmp_path / "dev.jsonl", 16, seed=1)
    code = main(["finetune", str(pair["student"]), "--data", str(train), "--dev", str(dev), "--epochs", "2",
                 "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", "-o", str(tmp_path / "cls"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["labels"] == ["neg", "pos"] and len(report["history"]) == 2
    model = hf.load(tmp_path / "cls")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert isinstance(model.bert.embeddings.word_embeddings, FactorizedEmbedding)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    code = main(["evaluate", str(tmp_path / "cls"), "--data", str(dev), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["accuracy"] == pytest.approx(report["dev_after"])


def test_unseen_tokens(pair: dict[str, Path]) -> None:
    tok = hf.load_tokenizer(pair["student"])
    unseen = distill.unseen_tokens(tok, ["the film is good"], len(tok), 32)
    ids = tok.convert_tokens_to_ids(["the", "film", "movie", "w7", "[PAD]", "[CLS]", "[MASK]"])
    assert ids[2] in unseen and ids[3] in unseen
    assert not {ids[0], ids[1], *ids[4:]} & set(unseen)


def test_row_parameters_hold_exactly_those_rows() -> None:
    torch.manual_seed(0)
    W = torch.randn(30, 8)
    gr = group_reduce(W, torch.rand(30) + 0.1, budget=4 * 38, blocks=3, rounds=0)
    tables = [torch.nn.Embedding(30, 8), FactorizedEmbedding.from_dense(W, 3),
              GroupedFactorizedEmbedding.from_factors(gr.a, gr.b, gr.groups)]
    ids = torch.tensor([1, 7, 22, 29])
    for table in tables:
        before = table(torch.arange(30)).detach().clone()
        with torch.no_grad():
            for p, mask in distill.row_parameters(table, ids):
                p.add_(mask * torch.randn_like(p))
        moved = (table(torch.arange(30)) - before).abs().sum(1) > 0
        assert moved.nonzero().squeeze(1).tolist() == ids.tolist(), type(table).__name__
    with pytest.raises(InputError, match="cannot train the rows"):
        distill.row_parameters(torch.nn.Identity(), ids)


def test_vocab_phase_trains_only_the_rows_of_unseen_tokens(pair: dict[str, Path]) -> None:
    teacher, tok = hf.load(pair["teacher"]), hf.load_tokenizer(pair["student"])
    # training texts use part of the w-words; held-out texts lean on others, which the layer phase never trains:
    # their stale rows no longer fit the moved W_b and first layer, and the vocab phase fits them again
    pool = WORDS + [f"w{i}" for i in range(60)]
    texts = [" ".join(pool[(7 * i + 3 * j) % len(pool)] for j in range(8)) for i in range(120)]
    held = [" ".join(["the", f"w{60 + (5 * i + j) % 60}", "film", f"w{60 + (11 * i + 3 * j) % 60}"])
            for i in range(20) for j in range(2)]
    ref = hf.embed(teacher, tok, held)
    students, cosines = [], []
    for vocab_steps in (0, 80):
        student = hf.load(pair["student"])
        config = distill.DistillConfig(steps=60, vocab_steps=vocab_steps, layers=1, batch_size=16, lr=5e-3,
                                       device="cpu")
        phases = distill.distill_model(student, teacher, tok, texts, config)
        students.append(student)
        cosines.append(float(torch.nn.functional.cosine_similarity(hf.embed(student, tok, held), ref).mean()))
    assert [p["phase"] for p in phases] == ["layer", "vocab"]
    unseen = distill.unseen_tokens(tok, texts, len(tok), 128)
    assert phases[1]["tokens"] == len(unseen) > 100
    assert cosines[1] > cosines[0] + 0.02
    plain, completed = (s.state_dict() for s in students)
    assert {k for k, v in plain.items() if not torch.equal(v, completed[k])} == {"embeddings.word_embeddings.weight_a"}
    ids = torch.arange(len(tok))
    moved = (students[1].get_input_embeddings()(ids) - students[0].get_input_embeddings()(ids)).abs().sum(1) > 0
    assert set(moved.nonzero().squeeze(1).tolist()) == set(unseen)
    assert all(p.requires_grad for p in students[1].parameters())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5], ids=["gpt2", "t5"])
def test_vocab_phase_on_tied_tables(make, pair: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2's table tied to lm_head and T5's shared table: the vocab phase moves the table's W_a rows only."""
    original = make(tmp_path / "m")
    factorize(original, rank=4, output=tmp_path / "m-k4")
    student, teacher = hf.load(tmp_path / "m-k4"), hf.load(original)
    tok = hf.load_tokenizer(pair["student"])  # the tiny BERT's word-piece vocabulary has the same size
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = distill.DistillConfig(steps=0, layers=1, vocab_steps=3, batch_size=4, device="cpu")
    phases = distill.distill_model(student, teacher, tok, TEXTS, config)
    assert phases[0]["phase"] == "vocab" and phases[0]["tokens"] > 200
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("weight_a") for k in changed)


def test_vocab_phase_config_errors() -> None:
    with pytest.raises(InputError, match="--vocab-steps"):
        distill.DistillConfig(vocab_steps=-1).validate()
    with pytest.raises(InputError, match="vocab_rate"):
        distill.DistillConfig(vocab_rate=0.0).validate()


def test_trimmed_student_against_its_original(pair: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A trimmed model has another vocabulary: evaluate --similarity-to and finetune --teacher read the texts with
    each model's own tokenizer (they used to refuse: "differ in vocab_size")."""
    trimmed = tmp_path / "trim"
    assert main(["trim", str(pair["teacher"]), "--corpus", str(pair["train"]), "-o", str(trimmed), "--json"]) == 0
    capsys.readouterr()
    assert json.loads((trimmed / "config.json").read_text())["vocab_size"] < 300
    code = main(["evaluate", str(trimmed), "--similarity-to", str(pair["teacher"]), "--data", str(pair["train"]),
                 "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["mean"] > 0.99999  # the same pieces, the same rows: the same embeddings
    factorize(trimmed, rank=4, output=tmp_path / "trim-k4")
    out = tmp_path / "trim-k4-ft"
    code = main(["finetune", str(tmp_path / "trim-k4"), "--teacher", str(pair["teacher"]), "--data", str(pair["train"]),
                 "--dev", str(pair["dev"]), "--steps", "20", "--layers", "1", "--batch-size", "8", "--lr", "5e-3",
                 "--device", "cpu", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # said before training: how long, measured here; and plain progress lines, stderr being no terminal
    assert "about " in captured.err and "min for 20 steps on cpu (measured on the first steps)" in captured.err
    assert "--device cuda" in captured.err
    assert "layer phase: step 20/20" in captured.err and "sentence-level loss only" not in captured.err
    before = distill.similarity_to(tmp_path / "trim-k4", pair["teacher"], pair["dev"], device="cpu")
    after = distill.similarity_to(out, pair["teacher"], pair["dev"], device="cpu")
    assert after.mean > before.mean + 0.02


def test_tokenizers_cutting_texts_differently_use_the_sentence_loss_only(pair: dict[str, Path]) -> None:
    words = transformers.BertTokenizer(vocab={**vocab_without_film(), "fi": 9, "##lm": 299})
    student, teacher = hf.load(pair["student"]), hf.load(pair["teacher"])
    tok = hf.load_tokenizer(pair["student"])
    pairing = distill.pair_tokenizers(tok, words, ["the film", "a movie"], 32)
    assert not pairing.tokens and pairing.differ == 1
    assert distill.pair_tokenizers(tok, tok, ["the film"], 32).tokenizer is None
    notes: list[str] = []
    config = distill.DistillConfig(steps=3, layers=1, vocab_steps=2, batch_size=4, device="cpu")
    phases = distill.distill_model(student, teacher, tok, ["the film is good", "a bad movie"], config,
                                   teacher_tokenizer=words, on_note=notes.append)
    assert [p["phase"] for p in phases] == ["sentence"] and len(notes) == 1
    assert "1 of 2 texts" in notes[0] and "sentence-level loss only" in notes[0]


def vocab_without_film() -> dict[str, int]:
    from tests.test_hf import vocab

    v = vocab()
    film = v.pop("film")
    return {t: i for t, i in v.items() if i not in (film, 299)}


def test_distill_resumes_after_an_interruption(pair: dict[str, Path], tmp_path: Path) -> None:
    config = distill.DistillConfig(steps=7, layers=1, vocab_steps=4, batch_size=8, lr=5e-3, save_every=3,
                                   device="cpu")
    straight = distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "a", config=config)

    def stop(phase: str, step: int, total: int, loss: float) -> None:
        if phase == "vocab" and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="resume with --resume"):
        distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "b", config=config, on_step=stop)
    assert (tmp_path / "b.resume.pt").exists() and not (tmp_path / "b").exists()
    resumed = distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "b", config=config,
                              resume=True)
    assert resumed.resumed_from_step == 7 and not (tmp_path / "b.resume.pt").exists()
    assert [p["loss_first"] for p in resumed.phases] == [p["loss_first"] for p in straight.phases]
    a, b = hf.load(straight.output).state_dict(), hf.load(resumed.output).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="cannot resume"):
        _resume_other(pair, tmp_path)


def _resume_other(pair: dict[str, Path], tmp_path: Path) -> None:
    """Interrupt a run, then resume it with other steps: refused."""
    config = distill.DistillConfig(steps=4, layers=1, batch_size=8, save_every=2, device="cpu")

    def stop(phase: str, step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "d", config=config, on_step=stop)
    distill.distill(pair["student"], pair["teacher"], pair["train"], tmp_path / "d", resume=True,
                    config=distill.DistillConfig(steps=5, layers=1, batch_size=8, save_every=2, device="cpu"))


def test_torchrun_two_cpu_processes_distil(pair: dict[str, Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBCOMPRESS_WORKSPACE": "off"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "embcompress.cli.main", "finetune", str(pair["student"]), "--teacher", str(pair["teacher"]),
         "--data", str(pair["train"]), "--steps", "4", "--layers", "1", "--batch-size", "8", "--device", "cpu",
         "-o", str(tmp_path / "ddp"), "--json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # only rank 0 prints and writes
    assert [(p["phase"], p["steps"]) for p in report["phases"]] == [("layer", 4)]
    assert hf.load(tmp_path / "ddp") is not None and not list(tmp_path.glob("*.resume.pt"))
