"""Faults in the library: the one write path, stale temporaries, special files, concurrent workspace records,
damaged resume states, hostile JSON and mixed label types (issue 18)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from embcompress import workspace
from embcompress.checkpoint import (
    TMP_MARK,
    atomic_path,
    cannot_write,
    check_finite,
    check_output,
    load_checkpoint,
    remove_stale_temporaries,
    save_safetensors,
    temporary_name,
)
from embcompress.data import LabelSet, read_jsonl
from embcompress.errors import CheckpointError, DataError, InputError, OutputError
from embcompress.train.run import _load_resume

ROOT = Path(__file__).resolve().parents[1]


def ours(folder: Path) -> list[Path]:
    """The temporaries of our naming in ``folder``."""
    return [p for p in folder.iterdir() if TMP_MARK in p.name]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the write path ---------------------------------------------------------------------------------------------


def test_temporary_is_named_after_the_output_and_carries_the_pid(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        assert tmp.name.startswith(f".model.safetensors{TMP_MARK}{os.getpid()}-")
        tmp.write_text("x")
    assert out.read_text() == "x" and ours(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, ValueError])
def test_temporary_removed_on_every_exit(tmp_path: Path, exc: type[BaseException]) -> None:
    out = tmp_path / "out.bin"
    out.write_text("before")
    with pytest.raises(exc):
        with atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise exc()
    assert out.read_text() == "before" and ours(tmp_path) == []


def test_folder_replaced_by_a_swap_leaves_no_old_copy(tmp_path: Path) -> None:
    out = tmp_path / "folder"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and ours(tmp_path) == []


def test_file_output_onto_a_folder_is_refused_and_the_folder_kept(tmp_path: Path) -> None:
    out = tmp_path / "folder"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match="is a folder") as info:
        with atomic_path(out) as tmp:
            tmp.write_text("x")
    assert TMP_MARK not in str(info.value)
    assert (out / "keep.txt").read_text() == "keep" and ours(tmp_path) == []


def test_safetensors_writer_round_trips_every_dtype_and_metadata(tmp_path: Path) -> None:
    shared = torch.randn(5, 3)
    tensors = {"a": shared, "tied": shared, "bf16": torch.randn(4).bfloat16(), "half": torch.randn(3).half(),
               "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
               "ids": torch.arange(7), "transposed": torch.randn(4, 6).t()}
    out = tmp_path / "x.safetensors"
    save_safetensors(tensors, out, {"k": "v"})
    back = load_file(str(out))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_cannot_write_maps_full_disk_and_leaves_other_errors() -> None:
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    full.__context__ = OSError(28, "No space left on device")
    err = cannot_write(Path("out.pt"), full)
    assert isinstance(err, OutputError) and err.exit_code == 3 and "out.pt" in str(err) and "No space" in str(err)
    assert cannot_write(Path("x"), RuntimeError("Error while serializing: I/O error (os error 122)")) is not None
    assert cannot_write(Path("x"), ValueError("shape mismatch")) is None


# --- stale temporaries ------------------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".m.safetensors{TMP_MARK}{dead_pid()}-0a1b2c3d"
    dead.write_text("left by a killed run")
    dead_folder = tmp_path / f".m-r90{TMP_MARK}{dead_pid()}-deadbeef"
    dead_folder.mkdir()
    (dead_folder / "model.safetensors").write_text("x")
    mine = temporary_name(tmp_path / "m.safetensors")
    mine.write_text("being written")
    parent = tmp_path / f".m.safetensors{TMP_MARK}{os.getppid()}-00000000"
    parent.write_text("a live process")
    unrelated = tmp_path / ".m.safetensors.12345.tmp"
    unrelated.write_text("not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, dead_folder])
    assert mine.exists() and parent.exists() and unrelated.exists()


def test_check_output_removes_stale_temporaries_beside_the_output(tmp_path: Path) -> None:
    stale = tmp_path / f".out.safetensors{TMP_MARK}{dead_pid()}-00ff00ff"
    stale.write_text("x")
    check_output(tmp_path / "out.safetensors", [])
    assert not stale.exists()


# --- special files ----------------------------------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_special_outputs_refused_even_with_force(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "out.safetensors")
    sock_path = tmp_path / "s.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for out, kind in ((fifo, "FIFO"), (sock_path, "socket")):
            with pytest.raises(OutputError, match=kind):
                check_output(out, [], force=True)
            with pytest.raises(OutputError, match=kind):
                save_safetensors({"a": torch.zeros(2)}, out)
        assert fifo.is_fifo() and sock_path.is_socket()
    finally:
        sock.close()


def test_special_inputs_refused_before_reading(tmp_path: Path) -> None:
    # each would block forever in open() if it were opened
    with pytest.raises(InputError, match="FIFO"):
        load_checkpoint(_fifo(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match="FIFO"):
        read_jsonl(_fifo(tmp_path / "train.jsonl"))


# --- workspace record ---------------------------------------------------------------------------------------------


def test_check_record_refuses_an_unreadable_record_and_a_missing_folder(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / workspace.RECORD_NAME).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        workspace.check_record()
    monkeypatch.setenv(workspace.ENV_VAR, str(tmp_path / "gone" / "record.json"))
    with pytest.raises(OutputError, match="does not exist"):
        workspace.check_record()


_RECORDER = """
import sys
from pathlib import Path
from embcompress import workspace
go, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    pass
for i in range(n):
    workspace.record(name, options={"i": i}, inputs=[], outputs=[])
"""


def test_concurrent_records_keep_every_entry(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    go = tmp_path / "go"
    env = {**os.environ, workspace.ENV_VAR: str(record), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RECORDER, str(go), f"c{k}", "15"], env=env,
                              stdout=subprocess.PIPE, text=True) for k in range(3)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        assert p.wait() == 0
    entries = json.loads(record.read_text())["entries"]
    assert len(entries) == 45
    assert sorted((e["command"], e["options"]["i"]) for e in entries) == sorted(
        (f"c{k}", i) for k in range(3) for i in range(15))
    assert ours(tmp_path) == []


# --- hostile inputs -----------------------------------------------------------------------------------------------


def test_deeply_nested_json_line_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "a", "label": 0}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl:2: JSON nested too deeply"):
        read_jsonl(path)


def test_mixed_label_types_name_the_first_conflict(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": "0"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:3: label '0' is a string, but .*mixed.jsonl:1 has label 0"):
        read_jsonl(path)
    with pytest.raises(InputError, match="mix integers and strings"):
        LabelSet.build([0, "0"])


@pytest.mark.parametrize("field, value", [("epoch", "three"), ("history", 7), ("model", None), ("epoch", -1)])
def test_resume_state_with_a_bad_field_is_refused(tmp_path: Path, field: str, value: object) -> None:
    state = {"version": 1, "epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {},
             "best": {}, "history": [], "signature": {}, field: value}
    path = tmp_path / "m.safetensors.resume.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"field '{field}'") as info:
        _load_resume(path)
    assert info.value.exit_code == 2


def test_check_finite_names_the_tensor_and_first_bad_row() -> None:
    t = torch.zeros(10, 4)
    t[7, 2] = float("inf")
    t[9, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"tensor 'emb' holds 2 NaN or Inf value\(s\), the first in row 7; "
                                              "refusing to score it"):
        check_finite("emb", t, what="tensor", action="score it")
