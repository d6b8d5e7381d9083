from pathlib import Path

import pytest

from embcompress import workspace
from embcompress.errors import InputError


def test_record_and_take(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"abc")
    out = tmp_path / "m.r90.safetensors"
    out.write_bytes(b"de")
    workspace.record("factorize", options={"reduction": 0.9}, inputs=[("model", model)], outputs=[("model", out)])
    assert workspace.last_artifact("model") == tmp_path / "m.r90.safetensors"
    assert workspace.take(None, "model", what="model") == (tmp_path / "m.r90.safetensors", True)
    explicit = tmp_path / "other"
    assert workspace.take(explicit, "model", what="model") == (explicit, False)
    out.unlink()  # a recorded output that is gone is skipped
    assert workspace.last_artifact("model") is None


def test_take_without_record_names_what_is_missing() -> None:
    with pytest.raises(InputError, match="no model given"):
        workspace.take(None, "model", what="model")


def test_sha256_of_folder_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    h1 = workspace.sha256_of(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    assert workspace.sha256_of(tmp_path / "d") != h1
