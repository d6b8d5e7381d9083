"""Label-free recovery of a factorized Hugging Face encoder: distillation toward the original model.

The student (the factorized model) learns to reproduce the teacher (the original) on unlabelled texts, in up to two
phases:

1. **layer** (``layers`` = L > 0, the default L = 2): the embeddings and the first L transformer layers are trained
   to reproduce the teacher's token states after layer L, token by token (squared error relative to the teacher's
   squared norm, or 1 - cosine). Layers above L are not touched: they stay the teacher's own, so a student that
   matches at layer L matches everywhere. Forward and backward run through L layers only, and every token is a
   training target, which makes this phase several times cheaper per step than the next, and better per step.
2. **sentence** (``sentence_steps`` > 0, or ``layers`` = 0): the whole student is trained toward the teacher's
   sentence embeddings (the mean of the last hidden states over the attended tokens), with ``loss`` = ``cosine``
   (1 - cosine) or ``mse``.
3. **vocab** (``vocab_steps`` > 0): vocabulary completion. Tokens the texts never show get no gradient in the phases
   above, so their rows keep the factorization's start while the rest of the model moves on. This phase trains only
   the table rows of those tokens (W_a's rows for a factorized table): the texts are fed with ``vocab_rate`` of their
   tokens swapped for unseen ones (cycling through all of them), and the student matches the teacher's token states
   after ``layers`` blocks (all blocks when 0) on those same inputs. Everything else is frozen, so what the earlier
   phases learned is kept exactly. MiniLM at R = 90 % recovered on SST-2 train, 1200 steps (6 min on 2 cores):
   SST-2 test cosine 0.955 -> 0.960, and 0.925 -> 0.940 on the sentences holding a token the texts never show.

Every phase runs the one recovery loop (``embcompress.recover.loop.run``) with a distillation objective: its
schedules (warm-up + cosine by default; CALR, CLR, constant), straight-through training of tables kept in a storage
(``svd+int8`` stays int8), a resume state saved every ``save_every`` steps (``distill(..., resume=True)`` loses only
the steps since the last save) and data parallelism under ``torchrun`` (each rank its own batches of
``batch_size`` texts, gradients averaged). Only what a compressed table's method allows is trained (factors,
codebooks; a dense table kept in a storage has nothing to train: then the layers alone are).

The student may have another vocabulary than the teacher (a trimmed model): texts are the common ground, each model
reads them with its own tokenizer. Token-level losses pair the two models' states position by position, so they run
only when the two tokenizers cut every training text into the same number of tokens (a trimmed WordPiece tokenizer
does); otherwise only the sentence-level loss is used, and the report says so.

Texts come from a ``.txt`` file (one a line) or ``.jsonl`` (a ``text`` field). With ``vocab_mix`` > 0 that fraction
of each batch is made of random whole words from the model's own tokenizer vocabulary: tokens the texts never show
still get a training signal (no text outside the model folder is needed). The student is written as a model folder
that ``embcompress.hf.load`` reads back; its ``embcompress`` metadata records the distillation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from . import hf
from .checkpoint import check_finite_tensors, check_output
from .device import is_distributed, resolve_device
from .errors import InputError, Interrupted
from .methods.base import StoredTable
from .modules import FactorizedEmbedding, GroupedFactorizedEmbedding
from .recover.loop import EpochRecord, TrainConfig, is_main_process, run
from .recover.resume import load_resume, resume_path, save_resume, saved_epoch
from .recover.schedules import SCHEDULES

TOKEN_LOSSES = ("mse", "cosine")
SENTENCE_LOSSES = ("cosine", "mse")


@dataclass
class DistillConfig:
    """Hyperparameters of ``distill``. ``steps`` is the layer phase's length, ``sentence_steps`` the sentence
    phase's; ``layers`` = 0 skips the layer phase (then ``steps`` sentence steps are run when ``sentence_steps`` is
    0). ``lr`` is the layer phase's peak rate (and the sentence phase's when it runs alone), ``sentence_lr`` the
    sentence phase's after a layer phase; with the default ``schedule`` (``warmup-cosine``) both warm up linearly
    over ``warmup`` of the steps, then follow a half cosine to 0 (AdamW); ``calr``, ``clr`` and ``constant`` are
    the classifier loop's schedules. A resume state is saved every ``save_every`` steps. ``dropout`` keeps the student's dropout on while it learns (off by default: the teacher is
    deterministic, and MiniLM at R = 90 % fits it better without). ``vocab_steps`` of the vocab phase train only
    the rows of tokens the texts never show, at ``vocab_lr`` (Adam, same schedule), with ``vocab_rate`` of each
    batch's tokens swapped for them."""

    steps: int = 600
    sentence_steps: int = 0
    layers: int = 2
    token_loss: str = "mse"
    loss: str = "cosine"
    batch_size: int = 32
    lr: float = 1e-3
    sentence_lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 128
    vocab_mix: float = 0.0
    vocab_steps: int = 0
    vocab_lr: float = 1e-2
    vocab_rate: float = 0.3
    dropout: bool = False
    schedule: str = "warmup-cosine"
    save_every: int = 100
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.steps < 0 or self.sentence_steps < 0 or self.vocab_steps < 0:
            raise InputError("--steps, --sentence-steps and --vocab-steps must be 0 or more")
        if self.layers < 0:
            raise InputError(f"--layers must be 0 or more, got {self.layers}")
        if self.token_loss not in TOKEN_LOSSES:
            raise InputError(f"--token-loss must be one of {', '.join(TOKEN_LOSSES)}, got {self.token_loss!r}")
        if self.loss not in SENTENCE_LOSSES:
            raise InputError(f"--loss must be one of {', '.join(SENTENCE_LOSSES)}, got {self.loss!r}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and self.sentence_lr > 0 and self.vocab_lr > 0):
            raise InputError("learning rates must be positive")
        if not 0.0 <= self.vocab_mix < 1.0:
            raise InputError(f"--vocab-mix must be in [0, 1), got {self.vocab_mix}")
        if not 0.0 < self.vocab_rate <= 1.0:
            raise InputError(f"vocab_rate must be in (0, 1], got {self.vocab_rate}")
        if not 0.0 <= self.warmup < 1.0:
            raise InputError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.max_length < 2:
            raise InputError(f"--max-length must be at least 2, got {self.max_length}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.save_every < 1:
            raise InputError(f"save_every must be at least 1, got {self.save_every}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistillReport:
    """What ``distill`` did: phases, losses, time, and the cosine to the teacher before and after on ``dev``."""

    student: str
    teacher: str
    data: str
    output: str
    texts: int
    phases: list[dict[str, Any]]
    dev: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    device: str
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the model's layer stack ------------------------------------------------------------------------------------


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) of the encoder's transformer blocks: BERT's ``encoder.layer``, T5's
    ``block``, GPT-2's ``h``, or any ModuleList as long as the config's layer count."""
    enc = hf.encoder_of(model)
    config = getattr(model, "config", None)
    n = next((getattr(config, k) for k in ("num_hidden_layers", "num_layers", "n_layer")
              if isinstance(getattr(config, k, None), int)), None)
    for name, mod in enc.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            parent_name, _, attr = name.rpartition(".")
            return (enc.get_submodule(parent_name) if parent_name else enc), attr, mod
    raise InputError(f"cannot find the transformer layers of {type(model).__name__}; use --layers 0")


@contextlib.contextmanager
def truncated(model: nn.Module, layers: int) -> Iterator[None]:
    """Run the model with only its first ``layers`` transformer blocks (its last hidden state is then the state
    after block ``layers``)."""
    parent, attr, full = layer_stack(model)
    setattr(parent, attr, nn.ModuleList(list(full)[:layers]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


# --- batches --------------------------------------------------------------------------------------------------


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole words of the tokenizer's vocabulary: no specials, no ``##`` continuations, no ``[unused]`` slots."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    words = []
    for tok in tokenizer.get_vocab():
        if tok in special or tok.startswith(("##", "[", "<")) or not tok.strip():
            continue
        word = tok.lstrip("\u0120\u2581")  # GPT-2's and SentencePiece's word-start marks
        if word and any(c.isalnum() for c in word):
            words.append(word)
    return sorted(set(words))


class Batches:
    """Shuffled batches of texts (epoch after epoch), with a ``vocab_mix`` share of random-word lines."""

    def __init__(self, texts: list[str], batch_size: int, *, seed: int, words: list[str] | None = None,
                 vocab_mix: float = 0.0) -> None:
        self.texts = texts
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.words = words or []
        self.n_vocab = round(batch_size * vocab_mix) if self.words else 0
        self.order: list[int] = []

    def __next__(self) -> list[str]:
        n_text = self.batch_size - self.n_vocab
        out = []
        for _ in range(n_text):
            if not self.order:
                self.order = list(range(len(self.texts)))
                self.rng.shuffle(self.order)
            out.append(self.texts[self.order.pop()])
        for _ in range(self.n_vocab):
            out.append(" ".join(self.rng.choice(self.words) for _ in range(self.rng.randint(6, 16))))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Where the batches stand (saved with the resume state)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def _token_loss(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return (s - t).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean().clamp(min=1e-12)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def _sentence_loss(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


Inputs = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


def _batch_loss(student: nn.Module, teacher: nn.Module, s_in: Inputs, t_in: Inputs, layers: int | None, *,
                tokens: bool, config: DistillConfig) -> torch.Tensor:
    """The student's loss against the teacher on one batch, each reading its own inputs, both run through their
    first ``layers`` blocks (all when None): over every attended token's state (``tokens``; the inputs then pair
    position by position), or over the mean-pooled sentence embeddings."""
    with (truncated(student, layers) if layers else contextlib.nullcontext()), \
            (truncated(teacher, layers) if layers else contextlib.nullcontext()):
        with torch.no_grad():
            t_hidden = hf.hidden_states(teacher, *t_in)
        s_hidden = hf.hidden_states(student, *s_in)
    if tokens:
        keep = s_in[1].bool()
        return _token_loss(s_hidden[keep], t_hidden[keep], config.token_loss)
    return _sentence_loss(hf.mean_pool(s_hidden, s_in[1]), hf.mean_pool(t_hidden, t_in[1]), config.loss)


@dataclass
class Pairing:
    """How the teacher reads the student's texts. ``tokenizer`` None: the same vocabulary, the teacher reads the
    student's ids. Otherwise the teacher tokenizes with its own ``tokenizer``; ``tokens`` says whether token-level
    losses pair positions (every text cut into as many tokens by both), ``id_map`` maps a student id to the
    teacher's id of the same token (-1 where the teacher lacks it)."""

    tokenizer: Any | None = None
    tokens: bool = True
    id_map: torch.Tensor | None = None
    differ: int = 0  # texts the two tokenizers cut into different numbers of tokens

    def teacher_inputs(self, texts: list[str], s_in: Inputs, max_length: int, device: torch.device) -> Inputs:
        if self.tokenizer is None:
            return s_in
        batch = hf.tokenize(self.tokenizer, texts, max_length)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def pair_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any, texts: list[str], max_length: int) -> Pairing:
    """The ``Pairing`` of a student and a teacher tokenizer on the training texts."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab == t_vocab:
        return Pairing()
    id_map = torch.full((max(s_vocab.values(), default=-1) + 1,), -1, dtype=torch.long)
    for token, i in s_vocab.items():
        id_map[i] = t_vocab.get(token, -1)
    lengths = [len(ids) for ids in _token_ids(student_tokenizer, texts, max_length)]
    differ = sum(a != len(b) for a, b in zip(lengths, _token_ids(teacher_tokenizer, texts, max_length), strict=True))
    return Pairing(teacher_tokenizer, differ == 0, id_map, differ)


def _loop_config(config: DistillConfig, lr: float, optimizer: str = "adamw") -> TrainConfig:
    """The recovery loop's options for one phase (an "epoch" is ``save_every`` steps); the vocab phase (Adam) has no
    weight decay."""
    return TrainConfig(epochs=1, batch_size=config.batch_size, lr=lr, optimizer=optimizer, schedule=config.schedule,
                       warmup=config.warmup, weight_decay=config.weight_decay if optimizer == "adamw" else 0.0,
                       seed=config.seed, device=config.device, amp="off")


StepCallback = Callable[[str, int, int, float], None]  # (phase, step, total, loss)


@dataclass
class _Phase:
    """One phase ready to run: its objective, batches and parameters."""

    name: str
    steps: int
    lr: float
    optimizer: str
    layers: int | None
    loss: str
    params: list[nn.Parameter]
    loss_fn: Callable[[Any], torch.Tensor]
    source: Any
    draw: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)  # more fields of the phase's record
    masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # rows a parameter may change


@contextlib.contextmanager
def _prepared(student: nn.Module, phase: _Phase) -> Iterator[None]:
    """Only the phase's parameters require gradients (under their row masks) while it runs."""
    mine = {id(p) for p in phase.params}
    for p in student.parameters():
        p.requires_grad_(id(p) in mine)
    hooks = [p.register_hook(lambda grad, mask=mask: grad * mask) for p, mask in phase.masks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(True)


def _seconds_per_step(phase: _Phase, student: nn.Module, steps: int = 2) -> float:
    """Time ``steps`` forward and backward passes of a phase (after one untimed), without changing the model, the
    batches or the random state: what the estimate before a run is measured on."""
    saved = phase.source.state_dict()
    device = next(student.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            phase.loss_fn(phase.draw()).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                phase.loss_fn(phase.draw()).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / steps
    finally:
        phase.source.load_state_dict(saved)
        for p in student.parameters():
            p.grad = None


def _train_phase(phase: _Phase, student: nn.Module, config: DistillConfig, *, on_step: StepCallback | None,
                 state: dict | None, losses: list[float], on_epoch: Callable[[EpochRecord], None] | None
                 ) -> dict[str, Any]:
    """Run one phase through the recovery loop; ``losses`` (the steps' losses so far, from a resume state) grows."""
    start = time.perf_counter()
    every = min(config.save_every, max(1, phase.steps))

    def batches(epoch: int) -> Iterator[tuple[Any, int]]:
        while True:
            yield phase.draw(), config.batch_size

    def step_done(epoch: int, step: int, per_epoch: int, loss: float) -> None:
        losses.append(loss)
        if on_step:
            on_step(phase.name, (epoch - 1) * per_epoch + step, phase.steps, loss)

    rate = "vocab_lr" if phase.name == "vocab" else "--lr"
    if phase.steps:
        run(student, phase.loss_fn, batches, every, _loop_config(config, phase.lr, phase.optimizer),
            params=phase.params, total_steps=phase.steps, source=phase.source, signature={"phase": phase.name},
            train_mode=config.dropout and phase.name != "vocab",
            diverged=lambda step, loss: InputError(f"the {phase.name} phase diverged at step {step} (loss {loss}); "
                                                   f"lower {rate}"),
            on_step=step_done, on_epoch=on_epoch, state=state)
    student.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"phase": phase.name, "steps": phase.steps, "lr": phase.lr, "layers": phase.layers, "loss": phase.loss,
            **phase.extra, "loss_first": losses[0] if losses else None,
            "loss_last": sum(tail) / len(tail) if tail else None, "seconds": time.perf_counter() - start}


def _phase(
    phase: str,
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    pairing: Pairing,
    batches: Batches,
    *,
    steps: int,
    lr: float,
    config: DistillConfig,
    device: torch.device,
) -> _Phase:
    """The layer or the sentence phase."""
    layers = config.layers if phase == "layer" else None
    stack = layer_stack(student)[2] if layers else None
    if stack is not None and not 0 < layers <= len(stack):
        raise InputError(f"--layers must be between 1 and {len(stack)} for this model, got {layers}")
    # the layer phase trains the embeddings and the first L blocks; the sentence phase trains everything
    frozen = {id(p) for blk in list(stack)[layers:] for p in blk.parameters()} if stack is not None else set()
    tokens = bool(layers)

    def loss_fn(texts: list[str]) -> torch.Tensor:
        batch = hf.tokenize(tokenizer, texts, config.max_length)
        s_in = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        t_in = pairing.teacher_inputs(texts, s_in, config.max_length, device)
        # truncation is per step, so that ``on_step`` sees (and may evaluate) the whole model
        return _batch_loss(student, teacher, s_in, t_in, layers, tokens=tokens, config=config)

    return _Phase(phase, steps, lr, "adamw", layers, config.token_loss if layers else config.loss,
                  [p for p in student.parameters() if id(p) not in frozen], loss_fn, batches, lambda: next(batches))


# --- vocabulary completion --------------------------------------------------------------------------------------


def _token_ids(tokenizer: Any, texts: list[str], max_length: int) -> Iterator[list[int]]:
    """Each text's token ids as the model sees them (truncated, specials included), tokenized 256 at a time."""
    for i in range(0, len(texts), 256):
        yield from tokenizer(texts[i:i + 256], truncation=True, max_length=max_length)["input_ids"]


def token_counts(tokenizer: Any, texts: list[str], max_length: int = hf.DEFAULT_MAX_LENGTH) -> Counter[int]:
    """How often each token id occurs in the texts (as the tokenizer cuts them, specials included)."""
    counts: Counter[int] = Counter()
    for ids in _token_ids(tokenizer, texts, max_length):
        counts.update(ids)
    return counts


def unseen_tokens(tokenizer: Any, texts: list[str], vocab_size: int, max_length: int) -> list[int]:
    """Token ids of the vocabulary that the texts never show: no specials and no ``[unused]``-style slots."""
    seen = token_counts(tokenizer, texts, max_length)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    names = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    return [i for i, name in enumerate(names)
            if i not in seen and i not in special and name is not None
            and not (name.startswith("[") and name.endswith("]"))]


def row_parameters(table: nn.Module, ids: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The parameters holding the rows of tokens ``ids``, each with a (rows x 1) 0/1 mask of those rows:
    ``nn.Embedding``'s weight, ``FactorizedEmbedding``'s W_a, each block's a_c of a ``GroupedFactorizedEmbedding``.
    Training them under the masks moves those tokens' vectors and nothing else."""
    if isinstance(table, GroupedFactorizedEmbedding):
        groups, rows = table.weight_groups.long()[ids], table.rows[ids]
        out = []
        for c, a in enumerate(table.weight_a):
            mask = torch.zeros(a.shape[0], 1, device=a.device, dtype=a.dtype)
            mask[rows[groups == c]] = 1.0
            out.append((a, mask))
        return out
    weight = table.weight_a if isinstance(table, FactorizedEmbedding) else getattr(table, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"vocabulary completion cannot train the rows of a {type(table).__name__} table")
    mask = torch.zeros(weight.shape[0], 1, device=weight.device, dtype=weight.dtype)
    mask[ids] = 1.0
    return [(weight, mask)]


class SwapBatches:
    """Batches of the texts (token ids) with ``rate`` of their tokens swapped for the ``unseen`` ones, every unseen
    token in turn, in a fresh order each round."""

    def __init__(self, batches: Batches, tokenizer: Any, unseen: list[int], *, rate: float, max_length: int,
                 seed: int) -> None:
        self.batches, self.tokenizer, self.unseen = batches, tokenizer, unseen
        self.rate, self.max_length = rate, max_length
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.pool: list[int] = []
        self.special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)

    def __next__(self) -> Inputs:
        batch = hf.tokenize(self.tokenizer, next(self.batches), self.max_length)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        swap = mask.bool() & ~torch.isin(ids, self.special) & (torch.rand(ids.shape, generator=self.gen) < self.rate)
        new = []
        for _ in range(int(swap.sum())):
            if not self.pool:
                self.pool = self.unseen[:]
                self.rng.shuffle(self.pool)
            new.append(self.pool.pop())
        return ids.masked_scatter(swap, torch.tensor(new, dtype=ids.dtype)), mask

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"batches": self.batches.state_dict(), "rng": [version, list(internal), gauss],
                "gen": self.gen.get_state(), "pool": list(self.pool)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.gen.set_state(state["gen"])
        self.pool = list(state["pool"])


def _vocab_phase(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    pairing: Pairing,
    batches: Batches,
    unseen: list[int],
    *,
    config: DistillConfig,
    device: torch.device,
) -> _Phase:
    """Vocabulary completion: only the rows of ``unseen`` tokens train (all of the table's other rows and the
    layers stay as they are)."""
    layers = config.layers or None
    masks = row_parameters(student.get_input_embeddings(), torch.tensor(unseen, device=device)) if unseen else []
    source = SwapBatches(batches, tokenizer, unseen, rate=config.vocab_rate, max_length=config.max_length,
                         seed=config.seed)

    def loss_fn(batch: Inputs) -> torch.Tensor:
        ids, mask = batch[0].to(device), batch[1].to(device)
        t_ids = ids if pairing.id_map is None else pairing.id_map.to(device)[ids]
        return _batch_loss(student, teacher, (ids, mask), (t_ids, mask), layers, tokens=True, config=config)

    return _Phase("vocab", config.vocab_steps if unseen else 0, config.vocab_lr, "adam", layers, config.token_loss,
                  [p for p, _ in masks], loss_fn, source, lambda: next(source), {"tokens": len(unseen)}, masks)


def _phases(student: nn.Module, teacher: nn.Module, tokenizer: Any, pairing: Pairing, texts: list[str],
            config: DistillConfig, device: torch.device, seed: int, notes: list[str]) -> list[_Phase]:
    """The phases ``config`` asks for, each ready to run; ``notes`` gets a line for each change a student forces
    (a tokenizer that pairs no positions, a table with nothing to train)."""
    if not pairing.tokens and (config.layers or config.vocab_steps):
        notes.append(f"the two tokenizers cut {pairing.differ} of {len(texts)} texts into different numbers of "
                     "tokens: the sentence-level loss only (no layer or vocab phase)")
        config = dataclasses.replace(config, layers=0, vocab_steps=0)
    table = student.get_input_embeddings()
    stored = isinstance(table, StoredTable)
    if stored:
        notes.append(f"the table is a dense table kept in {table.storage.name}: it has nothing to train, recovery "
                     "trains the layers only" + (" (no vocab phase)" if config.vocab_steps else ""))
    words = vocabulary_words(tokenizer) if config.vocab_mix else None
    batches = Batches(texts, config.batch_size, seed=seed, words=words, vocab_mix=config.vocab_mix)
    phases = []
    if config.layers and config.steps:
        phases.append(_phase("layer", student, teacher, tokenizer, pairing, batches, steps=config.steps, lr=config.lr,
                             config=config, device=device))
    sentence_steps = config.sentence_steps or (config.steps if not config.layers else 0)
    if sentence_steps:
        lr = config.sentence_lr if config.layers else config.lr
        phases.append(_phase("sentence", student, teacher, tokenizer, pairing, batches, steps=sentence_steps, lr=lr,
                             config=config, device=device))
    if config.vocab_steps and not stored:
        vocab_size = table.num_embeddings
        unseen = unseen_tokens(tokenizer, texts, vocab_size, config.max_length)
        if pairing.id_map is not None:
            unseen = [i for i in unseen if i < len(pairing.id_map) and pairing.id_map[i] >= 0]
        plain = Batches(texts, config.batch_size, seed=seed + 1)
        phases.append(_vocab_phase(student, teacher, tokenizer, pairing, plain, unseen, config=config, device=device))
    return phases


def estimate_note(seconds: float, steps: int, device: torch.device) -> str:
    """The line said before a run: how long it will take here, and what a GPU would change."""
    text = f"about {seconds / 60:.1f} min for {steps} steps on {device} (measured on the first steps)"
    if device.type == "cuda":
        return text
    if torch.cuda.is_available():
        return text + "; --device cuda would run them on this machine's GPU"
    return text + ("; no CUDA GPU here: on a machine with one, run with --device cuda (or auto, the default), where "
                   "the transformer's matrix products are many times faster")


def distill_model(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: list[str],
    config: DistillConfig | None = None,
    *,
    teacher_tokenizer: Any | None = None,
    on_step: StepCallback | None = None,
    on_note: Callable[[str], None] | None = None,
    estimate: bool = False,
    state: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Distil an in-memory student toward a teacher on texts (both transformers models of the same architecture and
    width; ``teacher_tokenizer`` when the teacher's vocabulary differs, e.g. the student is trimmed); returns one
    record per phase. The teacher is not changed.

    ``on_note(line)`` gets a line for each change the pair forces (see ``_phases``) and, with ``estimate``, the
    time the run will take (``estimate_note``), measured on a few forward and backward passes of each phase before
    training. ``on_state(state)`` gets the resume state after every ``save_every`` steps; ``state`` (one of those)
    continues that run: the phases it finished are not redone.
    """
    config = config or DistillConfig()
    config.validate()
    if not texts and (not config.vocab_mix or config.vocab_steps):
        raise InputError("no texts to distil on")
    device = resolve_device(config.device)
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    pairing = (pair_tokenizers(tokenizer, teacher_tokenizer, texts, config.max_length)
               if teacher_tokenizer is not None else Pairing())
    rank = torch.distributed.get_rank() if is_distributed() else 0
    seed = config.seed if rank == 0 else config.seed + 7919 * rank  # each rank its own batches
    notes: list[str] = []
    phases = _phases(student, teacher, tokenizer, pairing, texts, config, device, seed, notes)
    for line in notes:
        if on_note:
            on_note(line)
    done: list[dict[str, Any]] = []
    losses: list[float] = []
    first = 0
    if state is not None:
        info = state["distill"]
        first, done, losses = int(info["phase"]), list(info["phases"]), list(info["losses"])
        if not 0 <= first < len(phases) or len(done) != first:
            raise InputError("the resume state does not fit this run's phases; delete it to start over")
        student.load_state_dict(state["model"])
    if estimate and on_note:
        seconds = 0.0
        for phase in phases[first:]:
            if phase.steps:
                with _prepared(student, phase):
                    seconds += phase.steps * _seconds_per_step(phase, student)
        on_note(estimate_note(seconds, sum(p.steps for p in phases[first:]), device))
    for i, phase in enumerate(phases):
        if i < first:
            continue

        def epoch_done(record: EpochRecord, i: int = i) -> None:
            if on_state is not None and record.state is not None:
                on_state({**record.state, "distill": {"phase": i, "phases": done, "losses": losses}})

        with _prepared(student, phase):
            done.append(_train_phase(phase, student, config, on_step=on_step, state=state if i == first else None,
                                     losses=losses, on_epoch=epoch_done))
        losses = []
    return done


def distill(
    student_path: str | os.PathLike[str],
    teacher_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    config: DistillConfig | None = None,
    dev_path: str | os.PathLike[str] | None = None,
    dev_limit: int = 1000,
    force: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_note: Callable[[str], None] | None = None,
    estimate: bool = False,
) -> DistillReport:
    """Distil the compressed model folder ``student_path`` toward the original ``teacher_path`` on the texts of
    ``data_path`` and write the result to ``output`` (a model folder). With ``dev_path``, the mean and worst cosine
    to the teacher's sentence embeddings on those texts are measured before and after. The student may be trimmed
    (another vocabulary): each model reads the texts with its own tokenizer. ``resume`` continues an interrupted run
    from ``<output>.resume.pt``. Under torchrun only rank 0 writes."""
    start = time.perf_counter()
    config = config or DistillConfig()
    config.validate()
    src, tea, data, out = Path(student_path), Path(teacher_path), Path(data_path), Path(output)
    dev = Path(dev_path) if dev_path is not None else None
    for p, what in ((src, "model"), (tea, "--teacher")):
        if not hf.is_hf_folder(p):
            raise InputError(f"{p}: {what} must be a Hugging Face model folder (config.json with a model_type)")
    check_output(out, [src, tea, data] + ([dev] if dev else []), force=force or resume)
    texts = hf.read_texts(data)
    dev_texts = hf.read_texts(dev, limit=dev_limit) if dev else None
    signature = {**{k: v for k, v in config.to_dict().items() if k != "device"}, "texts": len(texts),
                 "teacher": str(tea)}
    state = load_resume(resume_path(out)) if resume else None
    if state is not None:
        old = (state.get("distill") or {}).get("signature")
        if old != signature:
            diffs = sorted(k for k in signature if not isinstance(old, dict) or old.get(k) != signature[k])
            raise InputError(f"cannot resume: the run differs from the one that made the state ({', '.join(diffs)})")
    student = hf.load(src, task="base")
    teacher = hf.load(tea, task="base")
    check_finite_tensors(student.named_parameters(), action="fine-tune it")
    check_finite_tensors(teacher.named_parameters(), action="distil toward it")
    _check_pair(student, teacher, src, tea)
    tokenizer = hf.load_tokenizer(src)
    teacher_tokenizer = hf.load_tokenizer(tea)
    device = resolve_device(config.device)
    student.to(device)
    teacher.to(device)
    before = after = None
    teacher_dev = None
    if dev_texts:
        teacher_dev = hf.embed(teacher, teacher_tokenizer, dev_texts, max_length=config.max_length)
        before = hf.cosine_report(hf.embed(student, tokenizer, dev_texts, max_length=config.max_length),
                                  teacher_dev, dev_texts).to_dict()
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if on_note:
            on_note(line)

    saving = [resume]

    def save_state(st: dict) -> None:
        if is_main_process():
            saving[0] = True
            st["distill"]["signature"] = signature
            save_resume(st, resume_path(out))

    try:
        phases = distill_model(student, teacher, tokenizer, texts, config, teacher_tokenizer=teacher_tokenizer,
                               on_step=on_step, on_note=note, estimate=estimate, state=state, on_state=save_state)
    except KeyboardInterrupt:
        if saving[0] and is_main_process() and saved_epoch(resume_path(out)):
            raise Interrupted("interrupted; the steps up to the last save are kept: resume with --resume") from None
        raise Interrupted("interrupted; nothing written") from None
    if dev_texts:
        after = hf.cosine_report(hf.embed(student, tokenizer, dev_texts, max_length=config.max_length),
                                 teacher_dev, dev_texts).to_dict()
    options = {"model": str(src), "teacher": str(tea), "data": str(data), "dev": str(dev) if dev else None,
               **config.to_dict()}
    record = {"distilled": {**{k: v for k, v in options.items() if k not in ("model",)}, "texts": len(texts),
                            "phases": phases, "dev_cosine_before": before and before["mean"],
                            "dev_cosine_after": after and after["mean"], "notes": notes}}
    if is_main_process():
        hf.save(student.cpu(), out, like=src, inputs=[tea, data] + ([dev] if dev else []), force=force or resume,
                extra_meta=record)
        resume_path(out).unlink(missing_ok=True)
    resumed = 0
    if state is not None:
        info = state["distill"]
        resumed = sum(p["steps"] for p in info["phases"]) + len(info["losses"])
    return DistillReport(str(src), str(tea), str(data), str(out), len(texts), phases, str(dev) if dev else None,
                         before, after, str(device), time.perf_counter() - start, options, notes, resumed)


def _check_pair(student: nn.Module, teacher: nn.Module, src: Path, tea: Path) -> None:
    s_cfg, t_cfg = student.config, teacher.config
    for key in ("model_type", "hidden_size"):  # the vocabulary may differ (a trimmed student): texts pair them
        a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if a != b:
            raise InputError(f"{src} and --teacher {tea} differ in {key} ({a} vs {b}); the teacher must be the "
                             "model the student was compressed from")


# --- similarity to the original -------------------------------------------------------------------------------


COVERAGE_GROUPS: tuple[tuple[int, int | None], ...] = ((0, 0), (1, 2), (3, 9), (10, None))


def rarest_counts(tokenizer: Any, texts: list[str], counts: Counter[int],
                  max_length: int = hf.DEFAULT_MAX_LENGTH) -> list[int]:
    """For each text, how often its rarest token occurs in ``counts`` (0: a token the counted texts never show)."""
    return [min((counts[t] for t in ids), default=0) for ids in _token_ids(tokenizer, texts, max_length)]


def coverage_groups(cosines: Sequence[float], rarest: Sequence[int],
                    groups: Sequence[tuple[int, int | None]] = COVERAGE_GROUPS) -> list[dict[str, Any]]:
    """Mean cosine of the texts grouped by their rarest token's count in the recovery texts: where recovery has
    seen a text's words often, the student follows the original closely; the gap sits in rare and unseen words."""
    out = []
    for lo, hi in groups:
        picked = [c for c, n in zip(cosines, rarest, strict=True) if n >= lo and (hi is None or n <= hi)]
        name = f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"
        out.append({"group": name, "min": lo, "max": hi, "texts": len(picked),
                    "mean": sum(picked) / len(picked) if picked else None})
    return out


@dataclass
class SimilarityReport:
    """``evaluate --similarity-to``: the cosine between a model's and the original's sentence embeddings; with
    ``coverage_of``, also by how often each text's rarest token occurs in those (recovery) texts."""

    model: str
    original: str
    data: str
    mean: float
    worst: float
    p05: float
    median: float
    count: int
    worst_text: str
    seconds: float
    coverage_of: str | None = None
    coverage: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similarity_to(
    model_path: str | os.PathLike[str],
    original_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    batch_size: int = 64,
    max_length: int = hf.DEFAULT_MAX_LENGTH,
    device: str = "auto",
    coverage_of: str | os.PathLike[str] | None = None,
) -> SimilarityReport:
    """Mean, worst, 5th-percentile and median cosine between two Hugging Face models' mean-pooled sentence
    embeddings of the texts of ``data_path`` (``.txt`` or ``.jsonl``), each model reading them with its own
    tokenizer (a trimmed model has another vocabulary than its original); with ``coverage_of`` (the recovery
    texts), also the mean by ``coverage_groups``."""
    start = time.perf_counter()
    src, orig, data = Path(model_path), Path(original_path), Path(data_path)
    for p, what in ((src, "model"), (orig, "--similarity-to")):
        if not hf.is_hf_folder(p):
            raise InputError(f"{p}: {what} must be a Hugging Face model folder (config.json with a model_type)")
    texts = hf.read_texts(data, limit=limit)
    recovery_texts = hf.read_texts(coverage_of) if coverage_of is not None else None
    dev = resolve_device(device)
    model = hf.load(src, task="base", device=dev)
    original = hf.load(orig, task="base", device=dev)
    check_finite_tensors(model.named_parameters(), action="score it")
    check_finite_tensors(original.named_parameters(), action="compare with it")
    _check_pair(model, original, src, orig)
    tokenizer = hf.load_tokenizer(src)
    original_tokenizer = hf.load_tokenizer(orig)
    sim = hf.cosine_report(hf.embed(model, tokenizer, texts, batch_size=batch_size, max_length=max_length),
                           hf.embed(original, original_tokenizer, texts, batch_size=batch_size, max_length=max_length),
                           texts)
    coverage = None
    if recovery_texts is not None:
        counts = token_counts(tokenizer, recovery_texts, max_length)
        coverage = coverage_groups(sim.per_text, rarest_counts(tokenizer, texts, counts, max_length))
    return SimilarityReport(str(src), str(orig), str(data), sim.mean, sim.worst, sim.p05, sim.median, sim.count,
                            sim.worst_text, time.perf_counter() - start,
                            str(coverage_of) if coverage_of is not None else None, coverage)


# --- with labels: a sequence-classification head ----------------------------------------------------------------


@dataclass
class LabelledReport:
    """``finetune`` of a Hugging Face encoder on labelled JSON Lines: dev accuracy per epoch, the best kept."""

    model: str
    data: str
    dev: str | None
    output: str
    labels: list[Any]
    history: list[dict[str, Any]]
    dev_before: float | None
    dev_after: float | None
    best_epoch: int | None
    device: str
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _accuracy(model: nn.Module, tokenizer: Any, texts: list[str], targets: list[int], *, batch_size: int,
              max_length: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(texts), batch_size):
        enc = hf.tokenize(tokenizer, texts[start : start + batch_size], max_length)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == torch.tensor(targets[start : start + batch_size])).sum())
    return correct / max(1, len(texts))


def finetune_labelled(
    model_path: str | os.PathLike[str],
    train_path: str | os.PathLike[str],
    dev_path: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_length: int = hf.DEFAULT_MAX_LENGTH,
    schedule: str = "warmup-cosine",
    warmup: float = 0.06,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> LabelledReport:
    """Fine-tune a Hugging Face encoder (compressed or not) with a sequence-classification head on JSON Lines
    ``{"text", "label"}`` examples; keep the epoch best on ``dev_path``; write a model folder whose config names
    the labels. A model folder that already has the head keeps it (its labels must match). The classification
    objective runs in the one recovery loop (AdamW, ``schedule``, resume from ``<output>.resume.pt`` with
    ``resume``, torchrun's ranks each on its shard); only rank 0 writes."""
    from .data import LabelSet, read_jsonl

    start = time.perf_counter()
    src, train, out = Path(model_path), Path(train_path), Path(output)
    dev = Path(dev_path) if dev_path is not None else None
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError("--epochs and --batch-size must be at least 1 and --lr positive")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if not hf.is_hf_folder(src):
        raise InputError(f"{src}: not a Hugging Face model folder (config.json with a model_type)")
    check_output(out, [src, train] + ([dev] if dev else []), force=force or resume)
    examples = read_jsonl(train)
    labels = LabelSet.from_examples(examples)
    targets = [labels.index(ex.label, ex.source) for ex in examples]
    texts = [ex.text for ex in examples]
    dev_ex = read_jsonl(dev) if dev else []
    dev_texts, dev_targets = [ex.text for ex in dev_ex], [labels.index(ex.label, ex.source) for ex in dev_ex]
    state = load_resume(resume_path(out)) if resume else None
    dev_dev = resolve_device(device)
    torch.manual_seed(seed)
    model = hf.load(src, task="sequence-classification", num_labels=len(labels),
                    id2label={i: str(x) for i, x in enumerate(labels.labels)}, device=dev_dev)
    check_finite_tensors(model.named_parameters(), action="fine-tune it")
    tokenizer = hf.load_tokenizer(src)

    def score() -> tuple[float, None]:
        return _accuracy(model, tokenizer, dev_texts, dev_targets, batch_size=64, max_length=max_length,
                         device=dev_dev), None

    dev_before = score()[0] if dev_texts else None
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", schedule=schedule,
                         warmup=warmup, weight_decay=0.01, seed=seed, device=str(dev_dev), amp="off")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    sampler = DistributedSampler(range(len(texts)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(range(len(texts)), batch_size=batch_size, sampler=sampler, collate_fn=list)

    def batches(epoch: int) -> Iterator[tuple[list[int], int]]:
        sampler.set_epoch(epoch)
        for idx in loader:
            yield idx, len(idx)

    def loss_fn(idx: list[int]) -> torch.Tensor:
        enc = hf.tokenize(tokenizer, [texts[j] for j in idx], max_length)
        y = torch.tensor([targets[j] for j in idx], device=dev_dev)
        logits = model(input_ids=enc["input_ids"].to(dev_dev), attention_mask=enc["attention_mask"].to(dev_dev)).logits
        return F.cross_entropy(logits, y)

    def step_done(epoch: int, step: int, steps: int, loss: float) -> None:
        if on_step:
            on_step(f"epoch {epoch}", step, steps, loss)

    def epoch_done(record: EpochRecord) -> None:
        if record.state is not None and is_main_process():
            save_resume({**record.state, "dev_before": dev_before}, resume_path(out))

    try:
        result = run(model, loss_fn, batches, len(loader), config, score=score if dev_texts else None,
                     signature={"train_size": len(texts)}, on_step=step_done, on_epoch=epoch_done, state=state)
    except KeyboardInterrupt:
        kept = saved_epoch(resume_path(out)) if is_main_process() else 0
        if kept:
            raise Interrupted(f"interrupted after epoch {kept}; resume with --resume") from None
        raise Interrupted("interrupted; nothing written") from None
    if state is not None:
        dev_before = state.get("dev_before", dev_before)
    history = [r.to_dict() for r in result.history]
    options = {"model": str(src), "train": str(train), "dev": str(dev) if dev else None, "epochs": epochs,
               "batch_size": batch_size, "lr": lr, "max_length": max_length, "schedule": schedule, "seed": seed}
    if is_main_process():
        hf.save(model.cpu(), out, like=src, inputs=[train] + ([dev] if dev else []), force=force or resume,
                extra_meta={"finetuned": {**options, "labels": labels.labels, "history": history}})
        resume_path(out).unlink(missing_ok=True)
    return LabelledReport(str(src), str(train), str(dev) if dev else None, str(out), labels.labels, history,
                          dev_before, result.best_dev_accuracy if dev_texts else None, result.best_epoch, str(dev_dev),
                          time.perf_counter() - start, options)


def evaluate_labelled(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    max_length: int = hf.DEFAULT_MAX_LENGTH,
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy of a Hugging Face sequence classifier (from ``finetune_labelled``) on JSON Lines examples."""
    from .data import read_jsonl

    src = Path(model_path)
    dev = resolve_device(device)
    model = hf.load(src, device=dev)
    check_finite_tensors(model.named_parameters(), action="score it")
    id2label = getattr(model.config, "id2label", None) or {}
    if not hasattr(model, "classifier") and "SequenceClassification" not in type(model).__name__:
        raise InputError(f"{src}: not a sequence classifier (fine-tune it with labels first)")
    names = {str(v): int(k) for k, v in id2label.items()}
    examples = read_jsonl(data_path)
    targets = []
    for ex in examples:
        if str(ex.label) not in names:
            raise InputError(f"{ex.source}: label {ex.label!r} is not one of the model's ({', '.join(names)})")
        targets.append(names[str(ex.label)])
    tokenizer = hf.load_tokenizer(src)
    t0 = time.perf_counter()
    acc = _accuracy(model, tokenizer, [ex.text for ex in examples], targets, batch_size=batch_size,
                    max_length=max_length, device=dev)
    seconds = time.perf_counter() - t0
    return {"model": str(src), "data": str(data_path), "accuracy": acc, "count": len(examples),
            "examples_per_second": len(examples) / seconds if seconds else None}
