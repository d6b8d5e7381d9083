"""Vocabulary trimming: keep only the tokens a corpus uses, and remap the tokenizer so nothing else changes.

The corpus is tokenized once with the model's own tokenizer and counted (``weighting.count_ids``). The rows kept
are the tokens it uses (``min_count`` times or more, at most the ``keep_top`` most frequent), every special token,
and the pieces the tokenizer needs to cut the corpus the same way (see ``_structural``). Every other row of the vocabulary table goes,
from the table itself (or from W_a, ``<name>_a``, of a factorized table) and from every tensor tied to it or indexed
by token (an untied output layer, its bias). The kept rows keep their order; token i becomes the i-th kept one.

The tokenizer is rewritten to the new ids:

* an embcompress classifier: the vocabulary in its ``embcompress.model`` metadata (and ``vocab_size``);
* a Hugging Face folder: ``tokenizer.json`` (WordPiece, BPE with its merges, Unigram or WordLevel; added tokens,
  post-processor and padding ids), ``vocab.txt``, ``vocab.json`` / ``merges.txt``, ``added_tokens.json``,
  ``tokenizer_config.json``'s ``added_tokens_decoder``, and ``config.json`` / ``generation_config.json``
  (``vocab_size`` and every ``*_token_id``). A sentencepiece ``*.model`` file cannot be rewritten: it is left out,
  and a ``tokenizer.json`` written from the loaded tokenizer takes its place.

Before anything is written the new tokenizer is run over the corpus: every text whose tokens were all kept must give
the same tokens as before, under their new ids (so the model's outputs for it are identical), or nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import hf
from ._version import __version__
from .checkpoint import (
    META_KEY,
    Checkpoint,
    atomic_path,
    check_finite,
    copy_folder_files,
    check_output,
    default_output,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from .classifier import MODEL_META_KEY
from .data import PAD_ID, UNK_ID, Vocab, tokenize
from .errors import CheckpointError, DataError, InputError
from .quant import quant_meta
from .record import history
from .tables import EmbeddingTable, find_embeddings
from .weighting import count_ids

TRIM_META_KEY = "embcompress.trim"
# Tensors indexed by token besides the table and its ties: output layers and their biases (rows = vocabulary).
_ROW_TENSORS = ("lm_head.weight", "lm_head.bias", "output.weight", "output.bias", "predictions.bias",
                "predictions.decoder.weight", "predictions.decoder.bias", "decoder.weight", "decoder.bias")
_LAST_AXIS_TENSORS = ("final_logits_bias",)
_SENTENCEPIECE_SUFFIX = ".model"
_CLASSIFIER_TABLE = "embedding.weight"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


@dataclass
class TrimmedTensor:
    """One tensor whose token rows were cut."""

    name: str
    role: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    bytes_before: int
    bytes_after: int


@dataclass
class TrimResult:
    """What ``trim`` did: rows and bytes before and after, and where the kept tokens come from."""

    input: str
    output: str
    kind: str
    tokenizer: str
    corpus: str
    texts: int
    tokens_counted: int
    rows_before: int
    rows_after: int
    corpus_tokens: int
    special_tokens: int
    structural_tokens: int
    dropped_corpus_tokens: int
    coverage: float
    texts_changed: int
    tensors: list[TrimmedTensor]
    bytes_before: int
    bytes_after: int
    file_bytes_before: int
    file_bytes_after: int
    files_rewritten: list[str]
    files_dropped: list[str]
    keep_top: int | None
    min_count: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_kept(self) -> int:
        """Tokens in the new vocabulary (= rows of the trimmed table)."""
        return self.rows_after

    @property
    def row_ratio(self) -> float:
        return self.rows_after / self.rows_before if self.rows_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_kept"] = self.tokens_kept
        d["row_ratio"] = self.row_ratio
        return d


@dataclass
class _Tokenizer:
    """The model's tokenizer as trimming sees it: ids of its tokens, which are special, how it encodes texts."""

    kind: str
    describe: str
    size: int
    special: set[int]
    encode: Callable[[list[str]], list[list[int]]]
    structural: Callable[[set[int], list[str]], set[int]]
    hf: Any = None
    spec: dict[str, Any] | None = None


# --- the model's tokenizer ------------------------------------------------------------------------------------


def _classifier_tokenizer(ckpt: Checkpoint) -> tuple[_Tokenizer, dict[str, Any]]:
    try:
        meta = json.loads(ckpt.metadata[MODEL_META_KEY])
        vocab = Vocab.from_dict(meta["vocab"])
    except (json.JSONDecodeError, KeyError, TypeError, InputError) as e:
        raise CheckpointError(f"{ckpt.path}: the '{MODEL_META_KEY}' metadata is damaged ({e})") from None
    tok = _Tokenizer("classifier", "embcompress vocabulary", len(vocab), {PAD_ID, UNK_ID},
                     lambda texts: [vocab.encode(tokenize(t)) for t in texts], lambda keep, texts: set())
    return tok, meta


def _hf_tokenizer(src: Path, config: dict[str, Any] | None) -> _Tokenizer:
    if not any((src / name).is_file() for name in _TOKENIZER_FILES) and not any(
            p.suffix == _SENTENCEPIECE_SUFFIX for p in src.iterdir()):
        raise InputError(f"{src}: its tokenizer is unknown (no {', '.join(_TOKENIZER_FILES)} or sentencepiece .model "
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

    return _Tokenizer("hf", f"{model['type']} ({type(tokenizer).__name__})", size, special, encode, structural,
                      tokenizer, spec)


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


def _tokenizer_of(src: Path, ckpt: Checkpoint) -> tuple[_Tokenizer, dict[str, Any] | None]:
    if MODEL_META_KEY in ckpt.metadata:
        return _classifier_tokenizer(ckpt)
    if hf.is_hf_folder(src):
        return _hf_tokenizer(src, ckpt.config), None
    raise InputError(f"{src}: its tokenizer is unknown (no vocabulary in the file and no Hugging Face tokenizer "
                     "beside it); trim needs an embcompress classifier or a Hugging Face folder with its tokenizer")


# --- the tensors indexed by token -------------------------------------------------------------------------------


def _row_tensors(ckpt: Checkpoint, tokens: int) -> tuple[int, dict[str, tuple[str, int]], dict[str, Any] | None]:
    """The vocabulary's row count and the tensors to cut: ``{name: (role, axis)}``; and the factorization record.

    The vocabulary table is the first embedding table with at least ``tokens`` rows (a classifier's is always
    ``embedding.weight``); the other tables of that row count are cut with it."""
    meta = ckpt.embcompress_meta
    factorized = (meta or {}).get("tables") or {}
    cut: dict[str, tuple[str, int]] = {}
    if factorized:
        rows = set()
        for name, entry in factorized.items():
            if entry.get("blocks"):
                raise InputError(f"{ckpt.path}: {name!r} is stored in GroupReduce blocks, which trim cannot cut; "
                                 "trim the original model, then factorize the trimmed one")
            a_name = (entry.get("factors") or [f"{name}_a"])[0]
            if a_name not in ckpt.infos:
                raise CheckpointError(f"{ckpt.path}: the factor {a_name!r} of {name!r} is missing")
            rows.add(ckpt.infos[a_name].shape[0])
            cut[a_name] = ("W_a", 0)
        if len(rows) != 1:
            raise InputError(f"{ckpt.path}: the factorized tables have different row counts {sorted(rows)}")
        (V,) = rows
    else:
        named = ckpt.infos.get(_CLASSIFIER_TABLE) if MODEL_META_KEY in ckpt.metadata else None
        if named is not None:
            found = [EmbeddingTable(named.name, (named.shape[0], named.shape[1]), named.dtype, "classifier table")]
        else:
            found = [t for t in find_embeddings(ckpt) if t.rows >= tokens] or find_embeddings(ckpt)
        V = found[0].rows
        for table in found:
            if table.rows != V:
                continue
            cut[table.name] = ("table", 0)
            cut.update({t: ("tied", 0) for t in table.tied if t in ckpt.infos})
    for name, info in ckpt.infos.items():
        if name in cut or not info.shape:
            continue
        if any(name == s or name.endswith("." + s) for s in _ROW_TENSORS) and info.shape[0] == V:
            cut[name] = ("output layer" if name.endswith("weight") else "output bias", 0)
        elif any(name == s or name.endswith("." + s) for s in _LAST_AXIS_TENSORS) and info.shape[-1] == V:
            cut[name] = ("output bias", len(info.shape) - 1)
    return V, cut, meta


# --- choosing the rows ------------------------------------------------------------------------------------------


def _choose(counts: np.ndarray, special: set[int], keep_top: int | None, min_count: int) -> tuple[list[int], int]:
    """Ids of the corpus tokens kept (by count, then id) and how many used tokens were left out."""
    used = [i for i in np.flatnonzero(counts) if int(i) not in special]
    eligible = sorted((int(i) for i in used if counts[i] >= min_count), key=lambda i: (-counts[i], i))
    kept = eligible[:keep_top] if keep_top is not None else eligible
    return kept, len(used) - len(kept)


# --- rewriting the tokenizer files ------------------------------------------------------------------------------


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


def _rewrite_hf_files(src: Path, tmp: Path, tok: _Tokenizer, remap: dict[int, int], rows_before: int,
                      rows_after: int) -> tuple[list[str], list[str]]:
    """Write the remapped tokenizer and config files into ``tmp``; return the files rewritten and left out."""
    rewritten, dropped = [], []
    sentencepiece = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix == _SENTENCEPIECE_SUFFIX)
    for name in sentencepiece:
        (tmp / name).unlink(missing_ok=True)
        dropped.append(name)
    if (src / "tokenizer.json").is_file() or sentencepiece:
        _write_json(tmp / "tokenizer.json", _tokenizer_json(tok.spec or {}, remap))
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
            prefix = ((tok.spec or {}).get("model") or {}).get("continuing_subword_prefix")
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


# --- checking the new tokenizer ---------------------------------------------------------------------------------


def _check_same(old: list[list[int]], new: list[list[int]], remap: dict[int, int], where: str) -> int:
    """Texts whose tokens were all kept must encode to the same tokens; return how many texts lost a token."""
    changed = 0
    for lineno, (before, after) in enumerate(zip(old, new), 1):
        if any(i not in remap for i in before):
            changed += 1
            continue
        if [remap[i] for i in before] != list(after):
            raise InputError(f"{where}: text {lineno} tokenizes differently after trimming; nothing was written")
    return changed


# --- the command ------------------------------------------------------------------------------------------------


def trim(
    path: str | os.PathLike[str],
    corpus: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    keep_top: int | None = None,
    min_count: int = 1,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> TrimResult:
    """Keep only the vocabulary rows ``corpus`` uses (plus special tokens), remap the tokenizer, write ``output``.

    ``min_count``: a corpus token is kept when it occurs at least this often; ``keep_top``: at most this many of the
    most frequent corpus tokens are kept (specials and the pieces the tokenizer needs come on top). ``output``
    defaults to ``model.trim.safetensors`` (or ``<folder>-trim``) beside the input. Refuses a quantized checkpoint
    (trim first, then quantize) and a checkpoint whose tokenizer it cannot find.
    """
    start = time.perf_counter()
    if min_count < 1:
        raise InputError(f"--min-count must be at least 1, got {min_count}")
    if keep_top is not None and keep_top < 1:
        raise InputError(f"--keep-top must be at least 1, got {keep_top}")
    src, corpus_path = Path(path), Path(corpus)
    if not corpus_path.is_file():
        raise DataError(f"{corpus_path}: no such corpus file")
    out = Path(output) if output is not None else default_output(src, "trim")
    with load_checkpoint(src) as ckpt:
        quantized = quant_meta(ckpt)
        if quantized is not None:
            raise InputError(f"{src}: the checkpoint is quantized ({quantized.get('bits')}-bit); trim before "
                             "quantizing (trim the float model, then quantize the result)")
        check_output(out, [src, corpus_path], force=force)
        tok, clf_meta = _tokenizer_of(src, ckpt)
        V, cut, fact_meta = _row_tensors(ckpt, tok.size)
        if tok.size > V:
            raise InputError(f"{src}: the tokenizer has {tok.size} tokens but the table only {V} rows")
        if progress:
            progress(f"counting {corpus_path} with the model's tokenizer")
        texts = hf.read_texts(corpus_path)
        old_ids = tok.encode(texts)  # tokenized once: counted here, compared with the new tokenizer's ids below
        counts = count_ids(old_ids, V, str(corpus_path))
        special = {i for i in tok.special if i < V}
        corpus_kept, dropped = _choose(counts.counts, special, keep_top, min_count)
        if not corpus_kept:
            unused = "no token of the corpus is in the vocabulary" if dropped == 0 else \
                f"no corpus token passes --min-count {min_count}"
            raise DataError(f"{corpus_path}: {unused}; nothing to keep")
        base = special | set(corpus_kept)
        structural = {i for i in tok.structural(base, texts) if i < V} - base
        keep = sorted(base | structural)
        remap = {old: new for new, old in enumerate(keep)}
        index = torch.tensor(keep, dtype=torch.long)
        tensors: dict[str, torch.Tensor] = {}
        trimmed: list[TrimmedTensor] = []
        for name in ckpt.names:
            t = ckpt.tensor(name)
            check_finite(name, t, what="tensor", action="trim it")
            if name in cut:
                role, axis = cut[name]
                t = t.index_select(axis, index).contiguous()
                info = ckpt.infos[name]
                trimmed.append(TrimmedTensor(name, role, info.shape, tuple(t.shape), info.nbytes,
                                             t.numel() * t.element_size()))
            tensors[name] = t
        seen = float(counts.counts.sum())
        coverage = float(counts.counts[keep].sum()) / seen if seen else 1.0
        record = {"tool": f"embcompress {__version__}", "corpus": corpus_path.name, "rows_before": V,
                  "rows_after": len(keep), "keep_top": keep_top, "min_count": min_count,
                  "tokens_counted": counts.tokens_counted}
        metadata = {TRIM_META_KEY: json.dumps(record)}
        if fact_meta is not None:
            fact_meta = json.loads(json.dumps(fact_meta))
            for entry in (fact_meta.get("tables") or {}).values():
                if entry.get("shape"):
                    entry["shape"][0] = len(keep)
            fact_meta["history"] = history(fact_meta, "trim", {"corpus": corpus_path.name, "keep_top": keep_top,
                                                               "min_count": min_count, "rows_after": len(keep)})
            metadata[META_KEY] = json.dumps(fact_meta)
        if progress:
            progress(f"writing {out}")
        if tok.kind == "classifier":
            assert clf_meta is not None
            tokens = Vocab.from_dict(clf_meta["vocab"]).tokens
            new_vocab = Vocab([tokens[i] for i in keep])
            changed = _check_same(old_ids, [new_vocab.encode(tokenize(t)) for t in texts], remap, str(corpus_path))
            clf_meta = {**clf_meta, "vocab": new_vocab.to_dict(),
                        "config": {**clf_meta["config"], "vocab_size": len(keep)}}
            metadata[MODEL_META_KEY] = json.dumps(clf_meta)
            save_checkpoint(tensors, out, like=ckpt, metadata=metadata)
            rewritten, left_out = ["embcompress.model metadata"], []
        else:
            changed, rewritten, left_out = _write_hf(ckpt, tensors, out, tok, remap, V, metadata, old_ids, texts,
                                                     str(corpus_path))
        file_after = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*.safetensors")))
        notes = []
        if fact_meta is not None:
            notes.append("factorized checkpoint: rows of W_a were cut, W_b is unchanged")
        return TrimResult(
            input=str(src), output=str(out), kind=tok.kind, tokenizer=tok.describe, corpus=str(corpus_path),
            texts=len(texts), tokens_counted=counts.tokens_counted, rows_before=V, rows_after=len(keep),
            corpus_tokens=len(corpus_kept), special_tokens=len(special), structural_tokens=len(structural),
            dropped_corpus_tokens=dropped, coverage=coverage, texts_changed=changed, tensors=trimmed,
            bytes_before=ckpt.total_bytes, bytes_after=sum(t.numel() * t.element_size() for t in tensors.values()),
            file_bytes_before=ckpt.file_bytes, file_bytes_after=file_after, files_rewritten=rewritten,
            files_dropped=left_out, keep_top=keep_top, min_count=min_count, seconds=time.perf_counter() - start,
            notes=notes,
        )


def _write_hf(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], out: Path, tok: _Tokenizer,
              remap: dict[int, int], rows_before: int, metadata: dict[str, str], old_ids: list[list[int]],
              texts: list[str], where: str) -> tuple[int, list[str], list[str]]:
    """Write a trimmed Hugging Face folder atomically, after checking its tokenizer on the corpus."""
    src = ckpt.path
    meta = {"format": "pt", **{k: v for k, v in ckpt.metadata.items() if k != META_KEY}, **metadata}
    with atomic_path(out, directory=True) as tmp:
        copy_folder_files(src, tmp, skip={f.name for f in ckpt.files})
        rewritten, dropped = _rewrite_hf_files(src, tmp, tok, remap, rows_before, len(remap))
        new_tokenizer = hf.load_tokenizer(tmp)
        new_ids = new_tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        changed = _check_same(old_ids, new_ids, remap, where)
        save_safetensors(tensors, tmp / "model.safetensors", meta)
    return changed, rewritten, dropped
