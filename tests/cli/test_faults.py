"""A new user's worst day, command by command (issue 18): kills and signals mid-write, a full disk, special files,
NaN weights, hostile data, interrupts, library noise and a broken workspace record. Each failure is one line and
the exit code the README gives, and nothing is left half-written."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embcompress import workspace
from embcompress.checkpoint import TMP_MARK
from embcompress.cli.main import main
from tests.builders import write_sentiment_jsonl

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "2", "--batch-size", "16", "--embed-dim", "8", "--device", "cpu"]

# The CLI with its safetensors writer stopped mid-file: it prints "writing" once a temporary of ours holds part of
# the output, then waits to be killed.
_STALLED_WRITE = """
import sys, time
from embcompress import checkpoint
def stalled(tensors, file, metadata):
    with open(file, "wb") as fh:
        fh.write(b"partial")
    print("writing", flush=True)
    time.sleep(600)
checkpoint._write_safetensors = stalled
from embcompress.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def ours(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_MARK in p.name]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def snapshot(path: Path) -> dict[str, bytes]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f.relative_to(path) if path.is_dir() else f.name): f.read_bytes() for f in files if f.is_file()}


def cli(*args: object, preexec_fn=None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embcompress.cli.main", *map(str, args)], capture_output=True,
                          text=True, env={**env(), **(extra_env or {})}, preexec_fn=preexec_fn, timeout=300)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def with_nan(model: Path, name: str, row: int) -> Path:
    """A copy of ``model`` with a NaN in row ``row`` of tensor ``name`` (metadata kept)."""
    with safe_open(str(model), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state[name][row, 0] = float("nan")
    out = model.with_name("nan.safetensors")
    save_file(state, str(out), metadata=meta)
    return out


# --- kills and signals mid-write ------------------------------------------------------------------------------


def _stall(args: list[object]) -> subprocess.Popen:
    # a shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # the child gets the default disposition, as a command typed at a terminal has
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_WRITE, *map(str, args)], env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "writing", proc.communicate()[1]
    return proc


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_sigkill_mid_write_leaves_the_output_as_it_was(tmp_path: Path, dan_file: Path, hf_folder: Path,
                                                       kind: str) -> None:
    src = dan_file if kind == "file" else hf_folder
    out = tmp_path / ("out.safetensors" if kind == "file" else "out-folder")
    assert main(["factorize", str(src), "-r", "0.5", "-o", str(out)]) == 0
    before = snapshot(out)
    proc = _stall(["factorize", src, "-r", "0.9", "-o", out, "--force", "--json"])
    assert ours(tmp_path), "a temporary of ours exists while the output is written"
    proc.kill()
    proc.wait()
    assert snapshot(out) == before
    left = ours(tmp_path)
    assert left and all(p.parent == tmp_path for p in left)  # beside the output, named after it
    assert all(p.name.startswith(f".{out.name}{TMP_MARK}") for p in left)
    assert main(["inspect", str(dan_file), "--json"]) == 0  # any later command in that folder cleans up
    assert ours(tmp_path) == []
    assert snapshot(out) == before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_write_removes_the_temporary(tmp_path: Path, dan_file: Path, signum: int, code: int) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous output")
    proc = _stall(["factorize", dan_file, "-r", "0.5", "-o", out, "--force", "--json"])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert one_line(err) == "embcompress: interrupted; nothing written"
    assert out.read_bytes() == b"the previous output" and ours(tmp_path) == []


# --- a full disk --------------------------------------------------------------------------------------------------


def _small_disk() -> None:
    """In the child: files may not grow past 4 KiB, and the write fails with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_is_exit_3_with_the_path(tmp_path: Path, dan_file: Path) -> None:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 40)
    cases = [  # safetensors (our writer) and torch.save (the resume state)
        (["factorize", dan_file, "-r", "0.5", "-o", "f.safetensors"], "f.safetensors"),
        (["train", "--data", train, "-o", "t.safetensors", *FAST], "t.safetensors.resume.pt"),
    ]
    procs = [(subprocess.Popen([sys.executable, "-m", "embcompress.cli.main", *map(str, args)], env=env(),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_small_disk),
              path) for args, path in cases]
    for proc, path in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 3, err
        line = one_line(err)
        assert line.startswith(f"embcompress: error: {path}: cannot write (File too large)"), line
    assert not any((tmp_path / name).exists() for name in ("f.safetensors", "t.safetensors"))
    assert ours(tmp_path) == []


def test_full_disk_in_the_onnx_exporter_is_exit_3_with_the_path(capsys, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path, classifier: tuple[Path, Path]) -> None:
    from embcompress.export import onnx as export

    def no_space(wrapper, path, opset):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("ONNX export failed") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "write_fp32_graph", no_space)
    code, _, err = run(capsys, "export", classifier[0], "-o", "m.onnx")
    assert code == 3 and one_line(err) == "embcompress: error: m.onnx: cannot write (No space left on device)"
    assert not (tmp_path / "m.onnx").exists() and ours(tmp_path) == []


# --- special files ------------------------------------------------------------------------------------------------


def _hang(_signum, _frame):
    raise TimeoutError("blocked on a FIFO")


def test_inspect_on_a_fifo_is_refused_without_hanging(capsys, tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, _hang)  # an open() that blocks is interrupted, and the test fails
    signal.alarm(60)
    try:
        code, _, err = run(capsys, "inspect", fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 2 and "is a FIFO" in one_line(err)


def test_output_onto_a_fifo_is_refused_even_with_force(capsys, tmp_path: Path, dan_file: Path) -> None:
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", fifo, "--force")
    assert code == 3 and "is a FIFO" in one_line(err)
    assert fifo.is_fifo()


def test_file_output_onto_an_existing_folder_names_the_output(capsys, tmp_path: Path, dan_file: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", folder, "--force")
    line = one_line(err)
    assert code == 3 and str(folder) in line and TMP_MARK not in line
    assert (folder / "keep.txt").read_text() == "keep" and ours(tmp_path) == []


# --- NaN weights ----------------------------------------------------------------------------------------------


def test_nan_weights_are_refused_by_every_command_that_reads_weights(capsys, tmp_path: Path,
                                                                     classifier: tuple[Path, Path]) -> None:
    model, train = classifier
    nan = with_nan(model, "embedding.weight", 5)
    commands = {
        "trim": ["trim", nan, "--corpus", train],
        "evaluate": ["evaluate", nan, "--data", train, "--device", "cpu"],
        "export": ["export", nan, "-o", "nan.onnx"],
        "finetune": ["finetune", nan, "--data", train, "--epochs", "1", "--device", "cpu"],
        "compare": ["compare", nan, "--train", train, "--data", train, "--no-latency", "--device", "cpu"],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for command, args in commands.items():
        code, _, err = run(capsys, *args)
        line = one_line(err)
        assert code == 2, (command, err)
        assert "'embedding.weight'" in line and "row 5" in line and "NaN or Inf" in line, (command, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no compare work folder


# --- hostile data, labels, resume state -----------------------------------------------------------------------


def test_deeply_nested_json_line_is_exit_2(capsys, tmp_path: Path) -> None:
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": ' + "[" * 50000 + "]" * 50000 + ', "label": "y"}\n')
    code, _, err = run(capsys, "train", "--data", data, "-o", "m.safetensors", *FAST)
    assert code == 2 and "deep.jsonl:2: JSON nested too deeply" in one_line(err)


def test_mixed_label_types_are_refused(capsys, tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    rows = [{"text": "good", "label": 0}, {"text": "bad", "label": 1}, {"text": "fine", "label": "0"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(capsys, "train", "--data", data, "-o", "m.safetensors", *FAST)
    line = one_line(err)
    assert code == 2 and "mixed.jsonl:3: label '0' is a string" in line and "mixed.jsonl:1" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_compare_refuses_bad_train_data_before_its_work_folder(capsys, tmp_path: Path,
                                                               classifier: tuple[Path, Path]) -> None:
    model, train = classifier
    unlabelled = tmp_path / "texts.jsonl"
    unlabelled.write_text('{"text": "good"}\n')
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": 0}\n')
    for bad in (unlabelled, mixed):
        code, _, err = run(capsys, "compare", model, "--train", bad, "--data", train, "--no-latency",
                           "--device", "cpu")
        assert code == 2 and bad.name in one_line(err)
        assert not list(tmp_path.glob("*.compare"))


def test_resume_state_with_a_bad_field_is_exit_2(capsys, tmp_path: Path) -> None:
    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 40)
    state = {"version": 1, "epoch": "one", "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {},
             "rng": {}, "best": {}, "history": [], "signature": {}}
    torch.save(state, tmp_path / "m.safetensors.resume.pt")
    code, _, err = run(capsys, "train", "--data", train, "-o", "m.safetensors", "--resume", *FAST)
    assert code == 2 and "field 'epoch'" in one_line(err)


# --- interrupts in training -----------------------------------------------------------------------------------


def test_ctrl_c_in_train_says_where_to_resume_and_resume_works(capsys, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from embcompress.train import run as train_run

    train = write_sentiment_jsonl(tmp_path / "train.jsonl", 60)
    real_save = train_run._save_resume

    def save_then_interrupt(state, path):  # Ctrl-C arrives once epoch 1's state is safe
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_run, "_save_resume", save_then_interrupt)
    code, _, err = run(capsys, "train", "--data", train, "-o", "m.safetensors", *FAST)
    assert code == 130
    assert one_line(err) == "embcompress: interrupted after epoch 1; resume with --resume"
    assert not (tmp_path / "m.safetensors").exists() and (tmp_path / "m.safetensors.resume.pt").exists()
    monkeypatch.setattr(train_run, "_save_resume", real_save)
    code, out, err = run(capsys, "train", "--data", train, "-o", "m.safetensors", "--resume", "--json", *FAST)
    assert code == 0, err
    report = json.loads(out)
    assert report["resumed_from_epoch"] == 1 and [h["epoch"] for h in report["history"]] == [1, 2]
    assert not (tmp_path / "m.safetensors.resume.pt").exists()


def test_ctrl_c_in_finetune_before_an_epoch_writes_nothing(capsys, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path, classifier: tuple[Path, Path]) -> None:
    from embcompress.train import run as train_run

    model, train = classifier

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_run, "fit", interrupted)
    code, _, err = run(capsys, "finetune", model, "--data", train, "-o", "ft.safetensors", "--device", "cpu")
    assert code == 130 and one_line(err) == "embcompress: interrupted; nothing written"
    assert not (tmp_path / "ft.safetensors").exists()


# --- noise ----------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_library_warnings_stay_off_the_terminal_unless_debug(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from embcompress.errors import CheckpointError

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh, protocol=4)  # torch warns "Detected pickle protocol 4" reading it
    quiet = cli("inspect", evil)
    assert quiet.returncode == 2 and "not a readable PyTorch checkpoint" in one_line(quiet.stderr)
    monkeypatch.setenv("EMBCOMPRESS_DEBUG", "1")
    with pytest.warns(UserWarning, match="Detected pickle protocol 4"), pytest.raises(CheckpointError):
        main(["inspect", str(evil)])


# --- the workspace record -------------------------------------------------------------------------------------


def test_broken_workspace_record_is_refused_before_any_output(capsys, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path, dan_file: Path) -> None:
    record = tmp_path / workspace.RECORD_NAME
    record.write_text("{broken")
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", "out.safetensors")
    assert code == 2 and "workspace record is unreadable" in one_line(err)
    assert not (tmp_path / "out.safetensors").exists()
    record.unlink()
    monkeypatch.setenv(workspace.ENV_VAR, str(tmp_path / "no-such-folder" / "record.json"))
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", "out.safetensors")
    assert code == 3 and "does not exist" in one_line(err)
    assert not (tmp_path / "out.safetensors").exists()
