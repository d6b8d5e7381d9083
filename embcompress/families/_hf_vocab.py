"""The vocabulary rewrite ``trim`` needs for a Hugging Face folder: read its tokenizer, find the pieces it needs,
write the remapped tokenizer and config files.

Rewritten: ``tokenizer.json`` (WordPiece, BPE with its merges, Unigram or WordLevel; added tokens, post-processor and
padding ids), ``vocab.txt``, ``vocab.json`` / ``merges.txt``, ``added_tokens.json``, ``tokenizer_config.json``'s
``added_tokens_decoder``, and ``config.json`` / ``generation_config.json`` (``vocab_size`` and every ``*_token_id``).
A sentencepiece ``*.model`` file cannot be rewritten: it is left out, and a ``tokenizer.json`` written from the
loaded tokenizer takes its place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import hf
from ..checkpoint import META_KEY, Checkpoint, atomic_path, copy_folder_files, save_safetensors
from ..errors import CheckpointError, InputError
from .base import TrimVocabulary, check_same_tokens

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
_SENTENCEPIECE_SUFFIX = ".model"


def trim_vocabulary(src: Path, config: dict[str, Any] | None) -> TrimVocabulary:
    """The folder's tokenizer as ``trim`` sees it; refused with one line when it cannot be rewritten."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES) and not any(
            p.suffix == _SENTENCEPIECE_SUFFIX for p in src.iterdir()):
        raise InputError(f"{src}: its tokenizer is unknown (no {', '.join(TOKENIZER_FILES)} or sentencepiece .model "
                         "in the folder); trim needs the model's own tokenizer")
    tokenizer = hf.load_tokenizer(src)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{src}: the tokenizer ({type(tokenizer).__name__}) has no tokenizers backend; trim needs "
                         "a fast tokenizer (tokenizer.json or vocab.txt)")
    file = src / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else json.loads(backend.to_str())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") not in ("WordPiece", "BPE", "Unigram", "WordLevel"):
        raise InputError(f"{src}: cannot trim a {model.get('type')!r} tokenizer (WordPiece, BPE, Unigram and "
                         "WordLevel are supported)")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1 if vocab else 0
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    special |= {int(t["id"]) for t in spec.get("added_tokens") or []}
    special |= _config_token_ids(config or {})
    special |= _model_unk(model, vocab)

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def structural(keep: set[int], texts: list[str]) -> set[int]:
        return _structural(model, spec, backend, vocab, keep, texts)

    def write(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], out: Path, keep: list[int], remap: dict[int, int],
              rows_before: int, metadata: dict[str, str], old_ids: list[list[int]], texts: list[str],
              where: str) -> tuple[int, list[str], list[str]]:
        return _write_hf(ckpt, tensors, out, spec, remap, rows_before, metadata, old_ids, texts, where)

    return TrimVocabulary("hf", f"{model['type']} ({type(tokenizer).__name__})", size, special, encode, structural,
                          write)


def _model_unk(model: dict[str, Any], vocab: dict[str, int]) -> set[int]:
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        return {int(model["unk_id"])}
    unk = model.get("unk_token")
    return {vocab[unk]} if unk in vocab else set()


def _config_token_ids(config: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key, value in config.items():
        if isinstance(value, dict):
            ids |= _config_token_ids(value)
        elif key.endswith("_token_id") and isinstance(value, int) and value >= 0:
            ids.add(value)
        elif key.endswith("_token_id") and isinstance(value, list):
            ids |= {v for v in value if isinstance(v, int) and v >= 0}
    return ids


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def _merge_result(a: str, b: str, prefix: str | None) -> str:
    return a + b[len(prefix):] if prefix else a + b


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def has(part: Any) -> bool:
        if not isinstance(part, dict):
            return False
        return part.get("type") == "ByteLevel" or any(has(p) for p in part.get("pretokenizers") or [])

    return has(spec.get("pre_tokenizer"))


def _structural(model: dict[str, Any], spec: dict[str, Any], backend: Any, vocab: dict[str, int], keep: set[int],
                texts: list[str]) -> set[int]:
    """Pieces the tokenizer needs so that the corpus is cut as before.

    WordPiece: the pieces of each word's greedy walk, also of words that end as [UNK] (without them a shorter
    piece could let the walk succeed). BPE: every token a merge needs to build a kept token (recursively), the
    byte alphabet of a byte-level BPE (so any text still tokenizes). Byte-fallback tokens of either.
    """
    extra: set[int] = set()
    kind = model.get("type")
    if kind == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        limit = int(model.get("max_input_chars_per_word") or 100)
        words: set[str] = set()
        for text in texts:
            norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
            pieces = backend.pre_tokenizer.pre_tokenize_str(norm) if backend.pre_tokenizer is not None else [(norm, 0)]
            words.update(w for w, _ in pieces)
        for word in words:
            extra |= {vocab[p] for p in _wordpiece_walk(word, vocab, prefix, limit)}
    elif kind == "BPE":
        prefix = model.get("continuing_subword_prefix")
        builds: dict[str, list[tuple[str, str]]] = {}
        for a, b in _merge_pairs(model.get("merges") or []):
            builds.setdefault(_merge_result(a, b, prefix), []).append((a, b))
        inverse = {i: t for t, i in vocab.items()}
        todo = [inverse[i] for i in keep if i in inverse]
        seen: set[str] = set(todo)
        while todo:
            for pair in builds.get(todo.pop(), []):
                for part in pair:
                    if part not in seen and part in vocab:
                        seen.add(part)
                        todo.append(part)
        extra |= {vocab[t] for t in seen}
        if _is_byte_level(spec):
            extra |= {i for t, i in vocab.items() if len(t) == 1}
    if model.get("byte_fallback"):
        extra |= {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    return extra


def _wordpiece_walk(word: str, vocab: dict[str, int], prefix: str, limit: int) -> list[str]:
    """The pieces WordPiece's greedy longest-match walk takes over ``word`` (up to where it fails, if it does)."""
    if len(word) > limit:
        return []
    pieces, start = [], 0
    while start < len(word):
        end, piece = len(word), None
        while start < end:
            sub = word[start:end] if start == 0 else prefix + word[start:end]
            if sub in vocab:
                piece = sub
                break
            end -= 1
        if piece is None:
            break
        pieces.append(piece)
        start = end
    return pieces


def _remap_ids(value: Any, remap: dict[int, int]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return remap.get(value, value)
    if isinstance(value, list):
        return [_remap_ids(v, remap) for v in value]
    return value


def _remap_config(config: dict[str, Any], remap: dict[int, int], rows_before: int, rows_after: int) -> dict:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out[key] = _remap_config(value, remap, rows_before, rows_after)
        elif key == "vocab_size" and value == rows_before:
            out[key] = rows_after
        elif key.endswith("_token_id") or key.endswith("_token_ids"):
            out[key] = _remap_ids(value, remap)
        else:
            out[key] = value
    return out


def _remap_processor(proc: Any, remap: dict[int, int]) -> Any:
    if not isinstance(proc, dict):
        return proc
    proc = dict(proc)
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        proc["special_tokens"] = {k: {**v, "ids": _remap_ids(v.get("ids", []), remap)}
                                  for k, v in (proc.get("special_tokens") or {}).items()}
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if isinstance(proc.get(key), list) and len(proc[key]) == 2:
                proc[key] = [proc[key][0], remap.get(proc[key][1], proc[key][1])]
    elif kind == "Sequence":
        proc["processors"] = [_remap_processor(p, remap) for p in proc.get("processors") or []]
    return proc


def _kept_merges(merges: list[Any], tokens: set[str], prefix: str | None) -> list[Any]:
    return [m for m, (a, b) in zip(merges, _merge_pairs(merges))
            if a in tokens and b in tokens and _merge_result(a, b, prefix) in tokens]


def _tokenizer_json(spec: dict[str, Any], remap: dict[int, int]) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [piece for i, piece in enumerate(model["vocab"]) if i in remap]
        if model.get("unk_id") is not None:
            model["unk_id"] = remap[int(model["unk_id"])]
    else:
        model["vocab"] = {t: remap[i] for t, i in model["vocab"].items() if i in remap}
    if model["type"] == "BPE":
        model["merges"] = _kept_merges(model.get("merges") or [], set(model["vocab"]),
                                       model.get("continuing_subword_prefix"))
    spec["added_tokens"] = [{**t, "id": remap[int(t["id"])]} for t in spec.get("added_tokens") or []]
    spec["post_processor"] = _remap_processor(spec.get("post_processor"), remap)
    if isinstance(spec.get("padding"), dict) and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = remap.get(spec["padding"]["pad_id"], spec["padding"]["pad_id"])
    return spec


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _rewrite_hf_files(src: Path, tmp: Path, spec: dict[str, Any], remap: dict[int, int], rows_before: int,
                      rows_after: int) -> tuple[list[str], list[str]]:
    """Write the remapped tokenizer and config files into ``tmp``; return the files rewritten and left out."""
    rewritten, dropped = [], []
    sentencepiece = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix == _SENTENCEPIECE_SUFFIX)
    for name in sentencepiece:
        (tmp / name).unlink(missing_ok=True)
        dropped.append(name)
    if (src / "tokenizer.json").is_file() or sentencepiece:
        _write_json(tmp / "tokenizer.json", _tokenizer_json(spec, remap))
        rewritten.append("tokenizer.json")
    if (src / "vocab.txt").is_file():
        lines = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
        (tmp / "vocab.txt").write_text("".join(f"{t}\n" for i, t in enumerate(lines) if i in remap),
                                       encoding="utf-8")
        rewritten.append("vocab.txt")
    if (src / "vocab.json").is_file():
        vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
        new_vocab = {t: remap[i] for t, i in vocab.items() if i in remap}
        _write_json(tmp / "vocab.json", new_vocab)
        rewritten.append("vocab.json")
        if (src / "merges.txt").is_file():
            lines = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
            header = [ln for ln in lines if ln.startswith("#version")]
            body = [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
            prefix = (spec.get("model") or {}).get("continuing_subword_prefix")
            kept = _kept_merges(body, set(new_vocab), prefix)
            (tmp / "merges.txt").write_text("\n".join(header + kept) + "\n", encoding="utf-8")
            rewritten.append("merges.txt")
    if (src / "added_tokens.json").is_file():
        added = json.loads((src / "added_tokens.json").read_text(encoding="utf-8"))
        _write_json(tmp / "added_tokens.json", {t: remap[i] for t, i in added.items() if i in remap})
        rewritten.append("added_tokens.json")
    if (src / "tokenizer_config.json").is_file():
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                           if int(k) in remap}
            _write_json(tmp / "tokenizer_config.json", cfg)
            rewritten.append("tokenizer_config.json")
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            cfg = json.loads((src / name).read_text(encoding="utf-8"))
            _write_json(tmp / name, _remap_config(cfg, remap, rows_before, rows_after))
            rewritten.append(name)
    return rewritten, dropped


def _write_hf(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], out: Path, spec: dict[str, Any],
              remap: dict[int, int], rows_before: int, metadata: dict[str, str], old_ids: list[list[int]],
              texts: list[str], where: str) -> tuple[int, list[str], list[str]]:
    """Write a trimmed Hugging Face folder atomically, after checking its tokenizer on the corpus."""
    src = ckpt.path
    meta = {"format": "pt", **{k: v for k, v in ckpt.metadata.items() if k != META_KEY}, **metadata}
    with atomic_path(out, directory=True) as tmp:
        copy_folder_files(src, tmp, skip={f.name for f in ckpt.files})
        rewritten, dropped = _rewrite_hf_files(src, tmp, spec, remap, rows_before, len(remap))
        new_tokenizer = hf.load_tokenizer(tmp)
        new_ids = new_tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        changed = check_same_tokens(old_ids, new_ids, remap, where)
        save_safetensors(tensors, tmp / "model.safetensors", meta)
    return changed, rewritten, dropped
