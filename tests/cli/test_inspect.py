import json
from pathlib import Path

from embcompress.cli.main import main


def test_inspect_table_and_json(capsys, hf_folder: Path) -> None:
    assert main(["inspect", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    assert "embeddings.word_embeddings.weight" in out and "energy kept" in out and "encoder.layer.*" in out
    assert main(["inspect", str(hf_folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tables"][0]["shape"] == [1000, 32]
    assert [p["reduction"] for p in data["tables"][0]["projections"]] == [0.5, 0.7, 0.9]


def test_inspect_missing_path(capsys, tmp_path: Path) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_lists_commands_and_examples(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "factorize" in out and "history" in out
    assert main(["inspect", "--help"]) == 0
    assert "embcompress inspect model.safetensors" in capsys.readouterr().out


def test_inspect_warns_when_low_rank_loses_to_low_bit(capsys, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "flat.safetensors"
    save_file({"embedding.weight": torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))}, str(path))
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Low-bit storage or low rank, at equal bytes" in out
    assert "warning: embedding.weight: low rank would wreck this table" in out
    assert f"embcompress quantize {path} --bits 4" in out and "--method lowbit --budget" in out
    assert main(["inspect", str(path), "--json"]) == 0
    (table,) = json.loads(capsys.readouterr().out)["tables"]
    assert [o["storage"] for o in table["storage"]] == ["int8", "lowbit4", "lowbit2"]
    assert table["warning"].startswith("embedding.weight: low rank would wreck this table")


def test_inspect_bare_encoder_reports_no_unstored_head(capsys, tmp_path: Path) -> None:
    from tests.builders import bert_state, write_hf_folder

    config = {"model_type": "mpnet", "architectures": ["MPNetForMaskedLM"], "tie_word_embeddings": True}
    folder = write_hf_folder(tmp_path / "encoder", bert_state(), config)
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tables"][0]["tied"] == {}
    assert main(["inspect", str(folder)]) == 0
    assert "lm_head" not in capsys.readouterr().out
