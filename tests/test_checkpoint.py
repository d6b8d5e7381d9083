import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embcompress.checkpoint import atomic_path, check_output, default_output, load_checkpoint, save_checkpoint
from embcompress.errors import CheckpointError, OutputError


def test_safetensors_file_is_read_lazily_with_dtypes(dan_file: Path) -> None:
    with load_checkpoint(dan_file) as ckpt:
        assert ckpt.kind == "safetensors"
        assert ckpt.infos["embedding.weight"].shape == (600, 16)
        assert ckpt.infos["steps"].dtype == "I64"
        assert ckpt.tensor("steps").dtype == torch.int64
        assert ckpt.total_params == 600 * 16 + 32 * 16 + 32 + 64 + 2 + 1


def test_hf_folder_and_shards_read_the_same_tensors(hf_folder: Path, sharded_folder: Path) -> None:
    with load_checkpoint(hf_folder) as a, load_checkpoint(sharded_folder) as b:
        assert a.kind == b.kind == "hf"
        assert set(a.names) == set(b.names)
        assert len(b.files) == 2
        for name in a.names:
            assert torch.equal(a.tensor(name), b.tensor(name))
        assert a.config["model_type"] == "bert"


def test_pt_state_dict_loads_weights_only(tied_pt: Path) -> None:
    with load_checkpoint(tied_pt) as ckpt:
        assert ckpt.kind == "torch"
        assert ckpt.same_storage("transformer.wte.weight", "lm_head.weight")


def test_nested_state_dict_is_found(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "state_dict": {"emb.weight": torch.randn(4, 2)}}, path)
    with load_checkpoint(path) as ckpt:
        assert ckpt.names == ["emb.weight"]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"emb.weight": torch.randn(3, 2), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.safetensors", "no such file"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "holds no weights"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unknown checkpoint type"),
        (lambda p: (p / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json") and
         p / "bad.safetensors", "not a readable safetensors"),
        (lambda p: (p / "bad.pt").write_bytes(b"garbage") and p / "bad.pt", "not a readable PyTorch"),
    ],
)
def test_bad_inputs_raise_one_line_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(make(tmp_path))
    assert "\n" not in str(info.value)


def test_truncated_safetensors_is_refused(dan_file: Path) -> None:
    data = dan_file.read_bytes()
    dan_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(dan_file)


def test_check_output_rules(tmp_path: Path, dan_file: Path) -> None:
    with pytest.raises(OutputError, match="overwrite the input"):
        check_output(dan_file, [dan_file])
    existing = tmp_path / "exists.safetensors"
    existing.write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        check_output(existing, [dan_file])
    check_output(existing, [dan_file], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "nope" / "out.safetensors", [dan_file])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_is_refused(tmp_path: Path, dan_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="not writable"):
        check_output(locked / "out.safetensors", [dan_file])


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_hf_folder_round_trip_copies_tokenizer_and_replaces_with_force(hf_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    with load_checkpoint(hf_folder) as ckpt:
        save_checkpoint(ckpt.state_dict(), out, like=ckpt, metadata={"k": "v"})
        save_checkpoint(ckpt.state_dict(), out, like=ckpt, metadata={"k": "w"})
    assert (out / "vocab.txt").read_text() == (hf_folder / "vocab.txt").read_text()
    assert (out / "1_Pooling" / "config.json").exists()
    with load_checkpoint(out) as copy:
        assert copy.metadata["k"] == "w"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_default_output_names(tmp_path: Path, hf_folder: Path) -> None:
    assert default_output(tmp_path / "model.safetensors", "r90") == tmp_path / "model.r90.safetensors"
    assert default_output(tmp_path / "model.pt", "r50") == tmp_path / "model.r50.safetensors"
    assert default_output(hf_folder, "r90") == hf_folder.parent / "bert-r90"


def test_non_tensor_pickle_without_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.randn(2)], path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(path)


def test_shard_missing_is_reported(sharded_folder: Path) -> None:
    next(sharded_folder.glob("model-00002*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(sharded_folder)


def test_other_dtypes_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    save_file({"emb.weight": torch.randn(100, 4).bfloat16(), "ids": torch.arange(3)}, str(path))
    with load_checkpoint(path) as ckpt:
        assert ckpt.infos["emb.weight"].dtype == "BF16"
        assert ckpt.infos["emb.weight"].nbytes == 800


def test_outputs_get_the_usual_file_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with atomic_path(out) as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_weights_inside_a_folder_get_the_usual_file_mode(tmp_path: Path) -> None:
    from embcompress.factorize import factorize
    from tests.builders import bert_state, write_hf_folder

    src = write_hf_folder(tmp_path / "bert", bert_state())
    out = Path(factorize(src, reduction=0.5, output=tmp_path / "bert-r50").output)
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
