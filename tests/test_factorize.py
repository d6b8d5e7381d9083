import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from embcompress import factorize, load_checkpoint
from embcompress.checkpoint import META_KEY
from embcompress.errors import CheckpointError, InputError, OutputError, TableError


def _optimum(W: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(W.double())
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def test_file_to_file_with_metadata(dan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dan.r50.safetensors"
    result = factorize(dan_file, reduction=0.5, output=out)
    assert result.output == str(out)
    t = result.tables[0]
    assert t.name == "embedding.weight" and t.rank == 7  # floor(0.5 * 600*16/616)
    with load_checkpoint(out) as ckpt:
        assert "embedding.weight" not in ckpt.names
        a, b = ckpt.tensor("embedding.weight_a"), ckpt.tensor("embedding.weight_b")
        assert a.shape == (600, 7) and b.shape == (7, 16) and a.dtype == torch.float32
        assert torch.equal(ckpt.tensor("steps"), torch.tensor([7]))  # int64 passes through
        meta = ckpt.embcompress_meta
    entry = meta["tables"]["embedding.weight"]
    assert entry["shape"] == [600, 16] and entry["dtype"] == "F32" and entry["rank"] == 7
    assert entry["reduction_requested"] == 0.5 and entry["reduction_achieved"] >= 0.5
    assert entry["method"] == "exact"
    assert meta["file"]["reduction_achieved"] == pytest.approx(result.reduction_achieved)
    with load_checkpoint(dan_file) as src:
        W = src.tensor("embedding.weight")
    err = float((W.double() - (a @ b).double()).norm() / W.double().norm())
    assert err == pytest.approx(entry["rel_error"], rel=1e-3, abs=1e-7)
    assert err == pytest.approx(_optimum(W, 7), rel=1e-4)


def test_default_output_beside_input(dan_file: Path) -> None:
    result = factorize(dan_file, reduction=0.9)
    assert Path(result.output) == dan_file.parent / "dan.r90.safetensors"


def test_hf_folder_to_folder(hf_folder: Path) -> None:
    result = factorize(hf_folder, rank=8)
    out = Path(result.output)
    assert out == hf_folder.parent / "bert-k8"
    assert (out / "vocab.txt").exists() and (out / "config.json").exists() and (out / "1_Pooling").is_dir()
    with load_checkpoint(out) as ckpt:
        assert ckpt.kind == "hf"
        assert ckpt.infos["pooler.dense.weight"].dtype == "F16"
        assert ckpt.infos["embeddings.word_embeddings.weight_a"].shape == (1000, 8)
        assert ckpt.infos["embeddings.position_ids"].dtype == "I64"


def test_factors_keep_the_table_dtype(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bf.safetensors"
    save_file({"emb.weight": torch.randn(400, 8).bfloat16()}, str(path))
    result = factorize(path, rank=2)
    with safe_open(result.output, "pt") as f:
        assert f.get_tensor("emb.weight_a").dtype == torch.bfloat16


def test_tie_survives_and_is_recorded(tied_safetensors: Path) -> None:
    result = factorize(tied_safetensors, reduction=0.5)
    with load_checkpoint(result.output) as ckpt:
        assert "output.weight" not in ckpt.names
        assert ckpt.embcompress_meta["tables"]["tok_embeddings.weight"]["tied"] == {"output.weight": "identical bytes"}


def test_energy_rule(dan_file: Path) -> None:
    result = factorize(dan_file, energy=0.99)
    t = result.tables[0]
    assert t.energy_kept >= 0.99 and t.rank <= 8


def test_refactorizing_finds_no_new_table(dan_file: Path) -> None:
    first = factorize(dan_file, reduction=0.5)
    with pytest.raises(TableError, match="already factorized"):
        factorize(first.output, reduction=0.5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"reduction": 0.0}, InputError, "between 0 and 1"),
        ({"reduction": 1.0}, InputError, "between 0 and 1"),
        ({"reduction": 0.999}, InputError, "below 1"),
        ({"rank": 0}, InputError, "below 1"),
        ({"rank": 16}, InputError, "break-even"),
        ({"reduction": 0.5, "tables": ["nope"]}, TableError, "no tensor"),
        ({"reduction": 0.5, "method": "magic"}, InputError, "--method"),
        ({}, InputError, "exactly one"),
    ],
)
def test_bad_options(dan_file: Path, tmp_path: Path, kwargs, error, message: str) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(error, match=message):
        factorize(dan_file, output=out, **kwargs)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dan.safetensors"]


def test_output_rules(dan_file: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="overwrite the input"):
        factorize(dan_file, reduction=0.5, output=dan_file)
    out = tmp_path / "o.safetensors"
    out.write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        factorize(dan_file, reduction=0.5, output=out)
    assert out.read_text() == "keep me"
    factorize(dan_file, reduction=0.5, output=out, force=True)
    with load_checkpoint(out) as ckpt:
        assert ckpt.embcompress_meta is not None


def test_nan_table_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    W = torch.randn(300, 8)
    W[5, 3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"embedding.weight": W}, str(path))
    with pytest.raises(CheckpointError, match="'embedding.weight' holds 1 NaN"):
        factorize(path, reduction=0.5)
    assert not (tmp_path / "nan.r50.safetensors").exists()


def test_metadata_is_json_under_one_key(dan_file: Path) -> None:
    result = factorize(dan_file, rank=3)
    with safe_open(result.output, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta[META_KEY])["tables"]["embedding.weight"]["rank"] == 3


def test_record_is_format_2_with_the_legacy_fields(dan_file: Path, tmp_path: Path) -> None:
    """factorize writes the registry's entry (structure, config, history), readable by core, and keeps 0.1's."""
    from embcompress import core

    result = factorize(dan_file, reduction=0.5, method="randomized", output=tmp_path / "r.safetensors")
    with load_checkpoint(result.output) as ckpt:
        meta = ckpt.embcompress_meta
        tensors = {n[len("embedding."):]: ckpt.tensor(n) for n in ckpt.names if n.startswith("embedding.")}
    entry = meta["tables"]["embedding.weight"]
    assert meta["format_version"] == 2 and core.is_v2_entry(entry)
    assert entry["structure"] == "svd" and entry["config"]["algorithm"] == "randomized"
    assert entry["config"]["rank"] == entry["rank"] == 7 and entry["storage"] is None
    assert entry["method"] == "randomized" and entry["rank_rule"] == "reduction"
    assert entry["factors"] == ["embedding.weight_a", "embedding.weight_b"]
    assert entry["bytes"] == result.tables[0].bytes_after == 4 * 7 * (600 + 16)
    assert entry["energy_kept"] == pytest.approx(1 - entry["rel_error"] ** 2)
    assert [h["op"] for h in entry["history"]] == ["factorize"]
    assert meta["history"][-1]["op"] == "factorize" and meta["history"][-1]["options"]["reduction"] == 0.5
    table = core.table_from_tensors(entry, tensors)
    with load_checkpoint(dan_file) as src:
        W = src.tensor("embedding.weight")
    rel = float((table.dense_weight().detach() - W).norm() / W.norm())
    assert rel == pytest.approx(entry["rel_error"], rel=1e-5)


def test_energy_rule_records_the_spectrum_energy(dan_file: Path, tmp_path: Path) -> None:
    result = factorize(dan_file, energy=0.99, output=tmp_path / "e.safetensors")
    with load_checkpoint(result.output) as ckpt:
        entry = ckpt.embcompress_meta["tables"]["embedding.weight"]
    assert entry["rank_rule"] == "energy" and entry["energy_kept"] >= 0.99
    assert entry["energy_kept"] == result.tables[0].energy_kept
