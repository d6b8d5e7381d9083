"""Model families: each detects its own inputs and answers for them; nothing outside ``families/`` asks which
family it holds."""

import ast
import json
from pathlib import Path

import pytest
import torch

from embcompress import families
from embcompress.errors import CheckpointError, InputError
from embcompress.families.base import Family, _FAMILIES
from tests.builders import bert_state, dan_state, write_classifier, write_hf_folder

PACKAGE = Path(__file__).resolve().parents[2] / "embcompress"


def test_each_family_detects_its_inputs(tmp_path: Path, dan_file: Path) -> None:
    clf = write_classifier(tmp_path / "clf.safetensors")
    folder = write_hf_folder(tmp_path / "bert", bert_state())
    assert families.detect(clf).name == "classifier"
    assert families.detect(folder).name == "transformers"
    assert families.detect(dan_file).name == "statedict"
    assert [f.name for f in families.families()][-1] == "statedict"  # the fallback is asked last


def test_missing_or_damaged_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        families.detect(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        families.detect(bad)


def test_classifier_family_tokenizer_and_tables(tmp_path: Path) -> None:
    clf = write_classifier(tmp_path / "clf.safetensors", words=5)
    family = families.detect(clf)
    assert family.vocabulary(clf)[2:7] == ["w0", "w1", "w2", "w3", "w4"]
    ids = family.token_ids(clf, ["w1 w3 never"])
    assert ids == [[3, 5, 1]]  # w1, w3, <unk>
    from embcompress.checkpoint import load_checkpoint

    with load_checkpoint(clf) as ckpt:
        assert [t.name for t in family.default_tables(ckpt)] == ["embedding.weight"]
    model = family.load_model(clf)
    out = tmp_path / "again.safetensors"
    family.save_model(model, out, like=clf)
    assert families.detect(out).name == "classifier"
    assert family.vocabulary(out) == family.vocabulary(clf)
    with pytest.raises(Exception, match="already exists"):
        family.save_model(model, out, like=clf)


def test_transformers_family_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = write_hf_folder(tmp_path / "bert", bert_state())
    family = families.detect(folder)
    assert family.vocabulary(folder)[:3] == ["[PAD]", "[UNK]", "hello"]
    assert 2 in family.token_ids(folder, ["hello"])[0]  # "hello" is row 2


def test_statedict_family_refuses_what_needs_a_runnable_model(dan_file: Path, tmp_path: Path) -> None:
    family = families.detect(dan_file)
    assert family.vocabulary(dan_file) is None and family.measures is None and not family.protocol
    for call in (lambda: family.token_ids(dan_file, ["a"]), lambda: family.load_model(dan_file),
                 lambda: family.export_onnx(dan_file, tmp_path / "x.onnx"),
                 lambda: family.evaluate_labels(dan_file, tmp_path / "t.jsonl", batch_size=8, device="cpu")):
        with pytest.raises(InputError) as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.onnx").exists()


def test_a_registered_family_is_asked_first(tmp_path: Path) -> None:
    class Marked(Family):
        name, description = "marked", "a state dict with a marker tensor"

        def detect(self, path: Path, ckpt) -> bool:
            return ckpt is not None and "marker" in ckpt.infos

        def vocabulary(self, path: Path) -> list[str] | None:
            return ["only"]

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({**dan_state(V=10, d=4), "marker": torch.zeros(1)}, str(path))
    family = families.register_family(Marked())
    try:
        assert families.detect(path) is family
        assert families.detect(path).vocabulary(path) == ["only"]
        with pytest.raises(ValueError, match="already registered"):
            families.register_family(Marked())
    finally:
        _FAMILIES.remove(family)
    assert families.detect(path).name == "statedict"


def _family_checks(tree: ast.AST) -> list[str]:
    """Calls of ``is_hf_folder`` and tests of the classifier's metadata key."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "is_hf_folder":
                found.append(f"line {node.lineno}: is_hf_folder()")
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if isinstance(node.left, ast.Name) and node.left.id == "MODEL_META_KEY":
                found.append(f"line {node.lineno}: MODEL_META_KEY in ...")
    return found


def test_no_family_branches_outside_the_adapters() -> None:
    # hf.py defines the folder test and distill.py is the transformers family's own recovery: they may use it
    allowed = {PACKAGE / "hf.py", PACKAGE / "distill.py", PACKAGE / "classifier.py"}
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path in allowed or (PACKAGE / "families") in path.parents:
            continue
        found = _family_checks(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


def test_trim_goes_through_the_family(tmp_path: Path) -> None:
    from embcompress.trim import trim

    clf = write_classifier(tmp_path / "clf.safetensors", words=6)
    corpus = tmp_path / "c.txt"
    corpus.write_text("w1 w2\nw2 w5\n")
    result = trim(clf, corpus, tmp_path / "t.safetensors")
    assert result.kind == "classifier" and result.rows_after == 5  # pad, unk, w1, w2, w5
    assert families.detect(tmp_path / "t.safetensors").vocabulary(tmp_path / "t.safetensors")[2:] == ["w1", "w2",
                                                                                                      "w5"]
    meta = json.loads(json.dumps(result.to_dict()))
    assert meta["files_rewritten"] == ["embcompress.model metadata"]
