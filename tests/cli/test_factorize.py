import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embcompress.cli.main import main
from tests.builders import dan_state


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_factorize_json_and_default_output(capsys, dan_file: Path) -> None:
    code, out, err = run(capsys, "factorize", dan_file, "--reduction", "0.9", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["output"] == str(dan_file.parent / "dan.r90.safetensors")
    assert data["tables"][0]["rank"] == 1
    assert Path(data["output"]).exists()


def test_factorize_table_output(capsys, hf_folder: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "factorize", hf_folder, "-r", "0.5", "-o", tmp_path / "small")
    assert code == 0
    assert "embeddings.word_embeddings.weight" in out and "whole file" in out


def test_force_allows_break_even_rank(capsys, dan_file: Path) -> None:
    code, _, err = run(capsys, "factorize", dan_file, "--rank", "16")
    assert code == 2 and "break-even" in err
    code, _, err = run(capsys, "factorize", dan_file, "--rank", "16", "--force")
    assert code == 0, err


def test_tables_comma_list(capsys, dan_file: Path) -> None:
    code, out, err = run(capsys, "factorize", dan_file, "--rank", "2", "--tables", "embedding.weight,fc1.weight",
                         "--json")
    assert code == 0, err
    assert [t["name"] for t in json.loads(out)["tables"]] == ["embedding.weight", "fc1.weight"]


def _corrupt(p: Path) -> Path:
    f = p / "corrupt.safetensors"
    f.write_bytes(b"\xff" * 40)
    return f


def _truncated(p: Path) -> Path:
    f = p / "trunc.safetensors"
    save_file(dan_state(), str(f))
    f.write_bytes(f.read_bytes()[:-64])
    return f


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _evil(p: Path) -> Path:
    f = p / "evil.pt"
    torch.save({"embedding.weight": torch.randn(100, 4), "x": Evil()}, f)
    return f


def _nan(p: Path) -> Path:
    state = dan_state()
    state["embedding.weight"][3, 3] = float("inf")
    f = p / "nan.safetensors"
    save_file(state, str(f))
    return f


def _notable(p: Path) -> Path:
    f = p / "notable.safetensors"
    save_file({"fc.weight": torch.randn(4, 4)}, str(f))
    return f


def _empty_dir(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


CASES = {
    "missing path": (lambda p: [p / "nope.safetensors", "-r", "0.5"], "no such file"),
    "folder with no weights": (lambda p: [_empty_dir(p), "-r", "0.5"], "holds no weights"),
    "corrupt safetensors": (lambda p: [_corrupt(p), "-r", "0.5"], "not a readable safetensors"),
    "truncated safetensors": (lambda p: [_truncated(p), "-r", "0.5"], "not a readable safetensors"),
    "pickle with code": (lambda p: [_evil(p), "-r", "0.5"], "refused"),
    "nan in table": (lambda p: [_nan(p), "-r", "0.5"], "NaN or Inf"),
    "reduction zero": (lambda p: [p / "dan.safetensors", "-r", "0"], "between 0 and 1"),
    "reduction one": (lambda p: [p / "dan.safetensors", "-r", "1"], "between 0 and 1"),
    "k below one": (lambda p: [p / "dan.safetensors", "-r", "0.999"], "below 1"),
    "rank zero": (lambda p: [p / "dan.safetensors", "-k", "0"], "below 1"),
    "break-even": (lambda p: [p / "dan.safetensors", "-k", "16"], "break-even"),
    "no table": (lambda p: [_notable(p), "-r", "0.5"], "no embedding table"),
    "unknown --tables": (lambda p: [p / "dan.safetensors", "-r", "0.5", "--tables", "nope"], "no tensor"),
    "out equals input": (lambda p: [p / "dan.safetensors", "-r", "0.5", "-o", p / "dan.safetensors"], "overwrite"),
    "out exists": (lambda p: [p / "dan.safetensors", "-r", "0.5", "-o", p / "dan.safetensors.bak"], "exists"),
    "out folder missing": (lambda p: [p / "dan.safetensors", "-r", "0.5", "-o", p / "no" / "x.safetensors"],
                           "does not exist"),
    "no rule": (lambda p: [p / "dan.safetensors"], "exactly one"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nonzero_nothing_written(capsys, tmp_path: Path, dan_file: Path, case: str) -> None:
    (tmp_path / "dan.safetensors.bak").write_text("keep")
    make, message = CASES[case]
    args = make(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out, err = run(capsys, "factorize", *args)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("embcompress: error:"), err
    assert message in err
    assert "Traceback" not in err + out
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, nothing touched
    assert (tmp_path / "dan.safetensors.bak").read_text() == "keep"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(capsys, tmp_path: Path, dan_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", locked / "x.safetensors")
    assert code == 3 and "not writable" in err


def test_unwritable_output_folder_as_root_uses_a_file_as_folder(capsys, tmp_path: Path, dan_file: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "-o", blocker / "x.safetensors")
    assert code == 3 and err.count("\n") == 1


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embcompress.cli.main", "factorize", str(tmp_path / "missing.safetensors"), "-r",
         "0.5"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_help_ends_with_examples(capsys) -> None:
    code, out, _ = run(capsys, "factorize", "--help")
    assert code == 0
    assert out.rstrip().splitlines()[-1].strip().startswith("embcompress factorize")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, dan_file: Path) -> None:
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1


def test_max_drop_alone_and_needs_dev(capsys, dan_file: Path) -> None:
    code, _, err = run(capsys, "factorize", dan_file, "--max-drop", "0.01", "-r", "0.5")
    assert code == 2 and "alone" in err
    code, _, err = run(capsys, "factorize", dan_file, "--max-drop", "0.01")
    assert code == 2 and "needs --dev" in err


def test_weighted_with_counts_file(capsys, dan_file: Path, tmp_path: Path) -> None:
    counts = tmp_path / "counts.txt"
    counts.write_text("\n".join(str(i % 7) for i in range(600)) + "\n")
    out = tmp_path / "w.safetensors"
    code, stdout, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "weighted", "--counts",
                            counts, "-o", out)
    assert code == 0, err
    assert "weighted by" in stdout and out.exists()
    code, stdout, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "weighted", "--counts",
                            counts, "--corpus", counts, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "not both" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "weighted", "-o",
                            tmp_path / "x.safetensors")
    assert code == 2 and "needs token counts" in err and not (tmp_path / "x.safetensors").exists()
    code, stdout, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "weighted", "--corpus",
                            counts, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--corpus needs the model's tokenizer" in err


def test_groupreduce_from_counts(capsys, dan_file: Path, tmp_path: Path) -> None:
    counts = tmp_path / "counts.txt"
    counts.write_text("\n".join(str(1000 // (i + 1)) for i in range(600)) + "\n")
    out = tmp_path / "g.safetensors"
    code, stdout, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "groupreduce",
                            "--blocks", "3", "--counts", counts, "-o", out)
    assert code == 0, err
    assert "3 blocks (budget of rank" in stdout and out.exists()
    code, stdout, _ = run(capsys, "inspect", out)
    assert "(3 blocks)" in stdout and "groupreduce" in stdout
    code, _, err = run(capsys, "factorize", dan_file, "--reduction", "0.5", "--method", "groupreduce", "--blocks",
                       "0", "--counts", counts, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--blocks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_default_names_differ_by_method_and_exists_names_another(capsys, dan_file: Path, tmp_path: Path) -> None:
    counts = tmp_path / "counts.txt"
    counts.write_text("\n".join(str(1000 // (i + 1)) for i in range(600)) + "\n")
    code, out, err = run(capsys, "factorize", dan_file, "-r", "0.5", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == str(dan_file.parent / "dan.r50.safetensors")
    outputs = {"exact": dan_file.parent / "dan.r50.safetensors"}
    for method, extra in [("groupreduce", ["--counts", counts]), ("weighted", ["--counts", counts]),
                          ("randomized", []), ("groupreduce", ["--counts", counts, "--blocks", "3"])]:
        code, out, err = run(capsys, "factorize", dan_file, "-r", "0.5", "--method", method, *extra, "--json")
        assert code == 0, err
        outputs[f"{method} {extra[2:]}"] = Path(json.loads(out)["output"])
    assert len(set(outputs.values())) == len(outputs) and all(p.exists() for p in outputs.values())
    assert outputs["groupreduce []"].name == "dan.groupreduce-r50.safetensors"
    assert outputs["groupreduce ['--blocks', '3']"].name == "dan.groupreduce-r50-blocks3.safetensors"
    code, _, err = run(capsys, "factorize", dan_file, "-r", "0.5", "--method", "groupreduce", "--counts", counts)
    assert code == 3 and len(err.strip().splitlines()) == 1
    free = dan_file.parent / "dan.groupreduce-r50-2.safetensors"
    assert "already exists; use --force" in err and f"-o {free}" in err


def test_unstored_config_tie_is_not_reported_as_stored(capsys, tmp_path: Path) -> None:
    from tests.builders import low_rank_table, write_hf_folder

    bare = write_hf_folder(tmp_path / "encoder", {"embeddings.word_embeddings.weight": low_rank_table(500, 16, 4)},
                           {"model_type": "mpnet", "architectures": ["MPNetForMaskedLM"], "tie_word_embeddings": True})
    code, out, err = run(capsys, "factorize", bare, "-r", "0.5")
    assert code == 0, err
    assert "lm_head" not in out
    gpt2 = write_hf_folder(tmp_path / "gpt2", {"transformer.wte.weight": low_rank_table(500, 16, 4)},
                           {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    code, out, err = run(capsys, "factorize", gpt2, "-r", "0.5")
    assert code == 0, err
    assert "lm_head.weight (tied by the config, not stored in the file)" in " ".join(out.split())
