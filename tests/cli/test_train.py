import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embcompress.cli.main import main
from tests.builders import write_sentiment_jsonl

FAST = ["--epochs", "2", "--batch-size", "16", "--embed-dim", "8", "--device", "cpu"]


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return write_sentiment_jsonl(tmp_path / "train.jsonl", 120), write_sentiment_jsonl(tmp_path / "dev.jsonl", 30, 1)


def test_user_commands_as_typed(capsys, tmp_path: Path, data) -> None:
    train, dev = data
    assert main(["train", "--data", str(train), "--dev", str(dev), "-o", "m.safetensors", *FAST]) == 0
    assert main(["factorize", "m.safetensors", "--reduction", "0.5"]) == 0
    capsys.readouterr()
    # no model, no --dev: both come from the workspace record
    assert main(["finetune", "--data", str(train), "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"].endswith("m.r50.ft.safetensors") and report["factorized"] is True
    assert report["dev_before"] is not None
    assert main(["evaluate", "--data", str(dev), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["model"].endswith("m.r50.ft.safetensors") and 0 <= ev["accuracy"] <= 1
    assert {c["label"] for c in ev["per_class"]} == {"neg", "pos"}
    assert main(["history", "--json"]) == 0
    assert [e["command"] for e in json.loads(capsys.readouterr().out)["entries"]] == ["train", "factorize",
                                                                                      "finetune", "evaluate"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no examples"),
        ('{"text": "a", "label": "pos"}\n{oops\n', "train.jsonl:2"),
        ('{"text": "a"}\n', "train.jsonl:1"),
    ],
)
def test_bad_data_is_one_line(capsys, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    assert main(["train", "--data", str(path), "-o", "m.safetensors", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "m.safetensors").exists()


def test_evaluate_needs_a_classifier(capsys, dan_file: Path, data) -> None:
    assert main(["evaluate", str(dan_file), "--data", str(data[1])]) == 2
    assert "not an embcompress classifier" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(tmp_path: Path, data) -> None:
    train, dev = data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBCOMPRESS_WORKSPACE": "off"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "embcompress.cli.main", "train", "--data", str(train), "--dev", str(dev), "-o",
         str(tmp_path / "ddp.safetensors"), "--json", *FAST],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # only rank 0 prints and writes
    assert report["dev_after"] is not None
    assert (tmp_path / "ddp.safetensors").exists()
    assert not list(tmp_path.glob("*.resume.pt"))


def test_finetune_reassigns_pq_codes(capsys, tmp_path: Path, data) -> None:
    train, dev = data
    assert main(["train", "--data", str(train), "--dev", str(dev), "-o", "m.safetensors", *FAST]) == 0
    assert main(["compress", "m.safetensors", "--method", "pq", "--subvector", "2", "--centroids", "8",
                 "-o", "m.pq.safetensors"]) == 0
    capsys.readouterr()
    assert main(["finetune", "m.pq.safetensors", "--teacher", "m.safetensors", "--data", str(train),
                 "--reassign-codes", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["reassign_codes"] is True and report["table"] == "pq"


def test_finetune_with_a_classifier_teacher(capsys, tmp_path: Path, data) -> None:
    train, dev = data
    assert main(["train", "--data", str(train), "--dev", str(dev), "-o", "m.safetensors", *FAST]) == 0
    assert main(["factorize", "m.safetensors", "--reduction", "0.5"]) == 0
    capsys.readouterr()
    assert main(["finetune", "m.r50.safetensors", "--teacher", "m.safetensors", "--data", str(train), "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--temperature", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["temperature"] == 3.0 and report["options"]["label_weight"] == 0.5
    assert main(["history", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][-1]
    assert entry["command"] == "finetune" and any(i["role"] == "teacher" for i in entry["inputs"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--label-weight", "0.3"], "need a classifier --teacher"),
        (["--teacher", "m.safetensors", "--label-weight", "2"], "label weight must be in [0, 1]"),
        (["--reassign-codes"], "trains the codes of a table that stores codes (pq)"),
    ],
)
def test_finetune_teacher_options_are_one_line(capsys, tmp_path: Path, data, args: list[str], message: str) -> None:
    train, _ = data
    assert main(["train", "--data", str(train), "-o", "m.safetensors", *FAST]) == 0
    capsys.readouterr()
    assert main(["finetune", "m.safetensors", "--data", str(train), "-o", "ft.safetensors", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "ft.safetensors").exists()
