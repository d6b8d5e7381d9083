from pathlib import Path

import pytest

from embcompress.checkpoint import load_checkpoint
from embcompress.errors import TableError
from embcompress.tables import find_embeddings, is_embedding_candidate


def test_bert_word_embeddings_chosen_positions_left_alone(hf_folder: Path) -> None:
    with load_checkpoint(hf_folder) as ckpt:
        tables = find_embeddings(ckpt)
    assert [t.name for t in tables] == ["embeddings.word_embeddings.weight"]
    assert "word_embeddings" in tables[0].reason
    assert tables[0].tied == []


def test_same_storage_tie_is_found_once(tied_pt: Path) -> None:
    with load_checkpoint(tied_pt) as ckpt:
        tables = find_embeddings(ckpt)
    assert [t.name for t in tables] == ["transformer.wte.weight"]
    assert tables[0].tie_reasons == {"lm_head.weight": "same storage"}


def test_identical_bytes_tie(tied_safetensors: Path) -> None:
    with load_checkpoint(tied_safetensors) as ckpt:
        tables = find_embeddings(ckpt)
    assert [t.name for t in tables] == ["tok_embeddings.weight"]
    assert tables[0].tie_reasons == {"output.weight": "identical bytes"}


def test_config_tie_recorded_for_unstored_head(tmp_path: Path) -> None:
    from tests.builders import low_rank_table, write_hf_folder  # noqa: PLC0415

    folder = write_hf_folder(tmp_path / "gpt2", {"transformer.wte.weight": low_rank_table(500, 16, 4)},
                             {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with load_checkpoint(folder) as ckpt:
        tables = find_embeddings(ckpt)
    assert "lm_head.weight" in tables[0].tied


def test_tables_override_and_errors(dan_file: Path) -> None:
    with load_checkpoint(dan_file) as ckpt:
        assert [t.name for t in find_embeddings(ckpt, ["fc1.*"])] == ["fc1.weight"]
        assert [t.name for t in find_embeddings(ckpt, ["embedding"])] == ["embedding.weight"]
        with pytest.raises(TableError, match="no tensor of that name"):
            find_embeddings(ckpt, ["nope"])
        with pytest.raises(TableError, match="not a 2-D floating"):
            find_embeddings(ckpt, ["steps"])


def test_no_table_found(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    save_file({"fc.weight": torch.randn(4, 4)}, str(path))
    with load_checkpoint(path) as ckpt, pytest.raises(TableError, match="no embedding table"):
        find_embeddings(ckpt)


@pytest.mark.parametrize(
    "name, shape, ok",
    [
        ("embeddings.word_embeddings.weight", (30522, 384), True),
        ("embeddings.position_embeddings.weight", (512, 384), False),
        ("transformer.wpe.weight", (1024, 768), False),
        ("shared.weight", (32128, 512), True),
        ("model.embed_tokens.weight", (32000, 4096), True),
        ("encoder.layer.0.attention.self.query.weight", (384, 384), False),
        ("decoder.weight", (50000, 256), True),  # shape only
        ("embedding.weight", (10, 300), False),
    ],
)
def test_candidate_rules(name: str, shape: tuple[int, int], ok: bool) -> None:
    assert is_embedding_candidate(name, shape)[0] is ok


def test_small_named_table_is_not_replaced_by_a_tall_mlp_weight(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({"embedding.weight": torch.randn(40, 32), "mlp.0.weight": torch.randn(1024, 32)}, str(path))
    with load_checkpoint(path) as ckpt:
        with pytest.raises(TableError, match="embedding.weight .* too small"):
            find_embeddings(ckpt)
        assert [t.name for t in find_embeddings(ckpt, tables=["embedding.weight"])] == ["embedding.weight"]


def _config_tied(tmp_path: Path, name: str, state_names: dict[str, tuple[int, ...]], arch: str) -> list:
    import torch  # noqa: PLC0415

    from tests.builders import low_rank_table, write_hf_folder  # noqa: PLC0415

    state = {n: torch.randn(*shape) for n, shape in state_names.items()}
    state[name] = low_rank_table(500, 16, 4)
    folder = write_hf_folder(tmp_path / arch, state, {"model_type": "x", "architectures": [arch],
                                                      "tie_word_embeddings": True})
    with load_checkpoint(folder) as ckpt:
        return find_embeddings(ckpt)


def test_bare_encoder_with_pretraining_config_has_no_tie(tmp_path: Path) -> None:
    # a sentence-transformers encoder keeps MPNetForMaskedLM in its config but stores no output layer
    tables = _config_tied(tmp_path, "embeddings.word_embeddings.weight", {"pooler.dense.weight": (16, 16)},
                          "MPNetForMaskedLM")
    assert [t.name for t in tables] == ["embeddings.word_embeddings.weight"]
    assert tables[0].tied == [] and tables[0].tie_reasons == {}


def test_config_tie_kept_when_the_file_holds_the_head(tmp_path: Path) -> None:
    from embcompress.tables import CONFIG_TIE  # noqa: PLC0415

    tables = _config_tied(tmp_path, "mpnet.embeddings.word_embeddings.weight",
                          {"lm_head.dense.weight": (16, 16), "lm_head.bias": (500,)}, "MPNetForMaskedLM")
    assert tables[0].tie_reasons == {"lm_head.decoder.weight": CONFIG_TIE}
    assert "not stored" in CONFIG_TIE
