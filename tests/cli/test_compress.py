"""``embcompress compress``: a method's own options on the command line, and bad input as one line, exit 2,
nothing written."""

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from embcompress.cli.main import main
from tests.builders import dan_state


def test_pq_subvector_and_centroids(capsys, dan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq.safetensors"
    assert main(["compress", str(dan_file), "--method", "pq", "--subvector", "2", "--centroids", "16",
                 "-o", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["tables"][0]
    assert table["config"]["subvector"] == 2 and table["config"]["centroids"] == 16
    assert table["bytes"] == 600 * 8 + 8 * 16 * 2 * 2  # a byte a code, fp16 codebooks


CASES = {
    "centroids above 256": (["--method", "pq", "--centroids", "300"], "between 2 and 256"),
    "centroids above the rows": (["--method", "pq", "--centroids", "200"], "above the table's 100 rows"),
    "subvector not dividing d": (["--method", "pq", "--subvector", "5"], "does not divide the table's 16 dims"),
    "method not registered": (["--method", "nope"], "unknown method 'nope'"),
    "budget below the smallest": (["--method", "pq", "--budget", "0.0001"], "pq needs at least"),
    "budget at the float32 size": (["--method", "lowbit", "--budget", "1.0"], "must be in (0, 1)"),
    "option of another method": (["--method", "lowbit", "--subvector", "4"], "lowbit has no such option"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, tmp_path: Path, case: str) -> None:
    src = tmp_path / "small.safetensors"
    save_file(dan_state(V=100), str(src), metadata={"format": "pt"})
    args, message = CASES[case]
    before = sorted(tmp_path.iterdir())
    assert main(["compress", str(src), *args, "-o", str(tmp_path / "out.safetensors")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("embcompress: error:") and message in err, err
    assert "Traceback" not in out + err
    assert sorted(tmp_path.iterdir()) == before
