import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embcompress.cli.main import main
from embcompress.workspace import load_record
from tests.builders import dan_state


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_json_default_output_and_record(capsys, dan_file: Path) -> None:
    code, out, err = run(capsys, "quantize", dan_file, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["output"] == str(dan_file.parent / "dan.int8.safetensors") and data["bits"] == 8
    assert data["file_bytes_after"] == Path(data["output"]).stat().st_size < data["file_bytes_before"]
    (table,) = data["tables"]
    assert table["name"] == "embedding.weight" and table["stored"] == "I8" and 0 < table["rel_error"] < 0.02
    assert {g["name"] for g in data["groups"]} == {"embedding", "fc1", "out"}
    entry = load_record()[-1]
    assert entry["command"] == "quantize" and entry["options"]["bits"] == 8
    assert entry["outputs"][0]["path"] == "dan.int8.safetensors" and entry["figures"]["file_bytes_after"] > 0


def test_quantize_table_output(capsys, hf_folder: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, "quantize", hf_folder, "--bits", "16", "-o", tmp_path / "half")
    assert code == 0, err
    assert "embeddings.word_embeddings.weight" in out and "By group" in out and "whole file" in out
    assert (tmp_path / "half" / "config.json").is_file()
    code, out, err = run(capsys, "quantize", hf_folder, "-b", "int8")
    assert code == 0, err
    assert (tmp_path / "bert-int8" / "model.safetensors").is_file()


def test_low_rank_then_int8(capsys, dan_file: Path) -> None:
    assert run(capsys, "factorize", dan_file, "--rank", "4")[0] == 0
    code, out, err = run(capsys, "quantize", dan_file.parent / "dan.k4.safetensors", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [t["role"] for t in data["tables"]] == ["factor", "factor"]
    assert data["output"].endswith("dan.k4.int8.safetensors")


def test_force_replaces(capsys, dan_file: Path) -> None:
    assert run(capsys, "quantize", dan_file)[0] == 0
    code, _, err = run(capsys, "quantize", dan_file)
    assert code == 3 and "already exists" in err
    assert run(capsys, "quantize", dan_file, "--force")[0] == 0


def _corrupt(p: Path) -> Path:
    f = p / "corrupt.safetensors"
    f.write_bytes(b"\xff" * 40)
    return f


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _evil(p: Path) -> Path:
    f = p / "evil.pt"
    torch.save({"embedding.weight": torch.randn(100, 4), "x": Evil()}, f)
    return f


def _with(p: Path, name: str, value: float) -> Path:
    state = dan_state()
    state[name][3, 3] = value
    f = p / "bad.safetensors"
    save_file(state, str(f))
    return f


def _quantized(p: Path) -> Path:
    f = p / "q.safetensors"
    save_file(dan_state(), str(f))
    assert main(["quantize", str(f), "-o", str(p / "already.int8.safetensors")]) == 0
    f.unlink()
    return p / "already.int8.safetensors"


def _ints_only(p: Path) -> Path:
    f = p / "ints.safetensors"
    save_file({"ids": torch.arange(10), "norm.weight": torch.ones(4)}, str(f))
    return f


def _empty_dir(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


CASES = {
    "missing path": (lambda p: [p / "nope.safetensors"], "no such file"),
    "folder with no weights": (lambda p: [_empty_dir(p)], "holds no weights"),
    "corrupt safetensors": (lambda p: [_corrupt(p)], "not a readable safetensors"),
    "pickle with code": (lambda p: [_evil(p)], "refused"),
    "bits 5": (lambda p: [p / "dan.safetensors", "--bits", "5"], "--bits must be 2, 3, 4, 8"),
    "group size not a power of 2": (lambda p: [p / "dan.safetensors", "--bits", "2", "--group-size", "48"],
                                    "group size must be a power of 2"),
    "bits not a number": (lambda p: [p / "dan.safetensors", "--bits", "abc"], "--bits must be 2, 3, 4, 8"),
    "nan in a table": (lambda p: [_with(p, "embedding.weight", float("nan"))], "NaN or Inf"),
    "inf in a linear weight": (lambda p: [_with(p, "fc1.weight", float("inf")), "--bits", "16"], "NaN or Inf"),
    "beyond float16": (lambda p: [_with(p, "fc1.weight", 1e6), "--bits", "16"], "float16's range"),
    "already quantized": (lambda p: [_quantized(p)], "already quantized"),
    "nothing to quantize": (lambda p: [_ints_only(p)], "nothing to quantize"),
    "unknown --tables": (lambda p: [p / "dan.safetensors", "--tables", "nope"], "no tensor"),
    "1-D --tables": (lambda p: [p / "dan.safetensors", "--tables", "fc1.bias"], "1-D"),
    "out equals input": (lambda p: [p / "dan.safetensors", "-o", p / "dan.safetensors"], "overwrite"),
    "out exists": (lambda p: [p / "dan.safetensors", "-o", p / "dan.safetensors.bak"], "exists"),
    "out folder missing": (lambda p: [p / "dan.safetensors", "-o", p / "no" / "x.safetensors"], "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nonzero_nothing_written(capsys, tmp_path: Path, dan_file: Path, case: str) -> None:
    (tmp_path / "dan.safetensors.bak").write_text("keep")
    make, message = CASES[case]
    args = make(tmp_path)
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out, err = run(capsys, "quantize", *args)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("embcompress: error:"), err
    assert message in err
    assert "Traceback" not in err + out
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, nothing touched
    assert (tmp_path / "dan.safetensors.bak").read_text() == "keep"
    assert not (tmp_path / "pwned").exists()


def test_factorize_refuses_a_quantized_file(capsys, dan_file: Path) -> None:
    assert run(capsys, "quantize", dan_file)[0] == 0
    code, _, err = run(capsys, "factorize", dan_file.parent / "dan.int8.safetensors", "-r", "0.5")
    assert code == 2 and err.count("\n") == 1 and "factorize before quantizing" in err


def test_help_lists_quantize(capsys) -> None:
    assert main(["--help"]) == 0
    assert "quantize" in capsys.readouterr().out
    assert main(["quantize", "--help"]) == 0
    assert "embcompress quantize model.safetensors" in capsys.readouterr().out


def test_two_bit_groups_shrink_the_file_and_load_packed(hf_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from embcompress import core
    from embcompress.checkpoint import load_checkpoint

    out = tmp_path / "bert-2b"
    assert main(["quantize", str(hf_folder), "--bits", "2", "--refine", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (entry,) = result["tables"]
    assert entry["storage_config"]["bits"] == 2 and entry["fraction"] <= 0.094
    assert (out / "model.safetensors").stat().st_size < (hf_folder / "model.safetensors").stat().st_size
    with load_checkpoint(out) as ckpt:
        record = ckpt.embcompress_meta["tables"]["embeddings.word_embeddings.weight"]
        mine = {k.removeprefix("embeddings.word_embeddings."): ckpt.tensor(k) for k in ckpt.names
                if k.startswith("embeddings.word_embeddings.")}
        original = load_checkpoint(hf_folder).tensor("embeddings.word_embeddings.weight")
    table = core.table_from_tensors(record, mine)
    assert table.weight.dtype == torch.uint8 and table.weight.shape == (1000, 32 * 2 // 8)
    err = float((table.dense_weight() - original).norm() / original.norm())
    assert err == pytest.approx(entry["info"]["rel_error"], rel=1e-4) and err < 0.5
