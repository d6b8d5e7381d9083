"""The rank from an accuracy budget: the smallest k whose dev accuracy stays within ``max_drop`` of the original's.

For a classifier, each candidate k factorizes the table (exact SVD), optionally fine-tunes for a few epochs, and
scores the dev set. Accuracy grows with k (more of the spectrum kept), so bisection over [1, break-even) needs about
log2(break-even) trials; every trial is reported. The winner is written as the factorized (and, when fine-tuning
was part of the trial, fine-tuned) classifier.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import check_output, default_output
from .classifier import load_classifier, save_classifier
from .data import read_jsonl
from .errors import InputError
from .modules import compress_embeddings
from .rank import achieved_reduction, break_even_rank
from .train.loop import TrainConfig, evaluate, fit, resolve_device


@dataclass
class Trial:
    """One k tried: its dev accuracy and whether it met the budget."""

    rank: int
    reduction: float
    dev_accuracy: float
    within_budget: bool


@dataclass
class BudgetResult:
    output: str
    baseline_dev_accuracy: float
    max_drop: float
    rank: int
    reduction: float
    dev_accuracy: float
    finetune_epochs: int
    trials: list[Trial] = field(default_factory=list)


def rank_for_budget(
    model_path: str | os.PathLike[str],
    dev_path: str | os.PathLike[str],
    *,
    max_drop: float,
    train_path: str | os.PathLike[str] | None = None,
    finetune_epochs: int = 0,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    config: TrainConfig | None = None,
    progress: Callable[[Trial], None] | None = None,
) -> BudgetResult:
    """Bisect over k for the smallest rank whose dev accuracy >= baseline - ``max_drop`` (an absolute fraction:
    0.01 is one accuracy point), fine-tuning ``finetune_epochs`` on ``train_path`` first when asked."""
    if not 0.0 <= max_drop < 1.0:
        raise InputError(f"--max-drop must be in [0, 1) (0.01 = one accuracy point), got {max_drop}")
    if finetune_epochs < 0:
        raise InputError(f"--finetune-epochs must be 0 or more, got {finetune_epochs}")
    if finetune_epochs and train_path is None:
        raise InputError("--finetune-epochs needs --data (the training examples)")
    src = Path(model_path)
    out = Path(output) if output is not None else default_output(src, f"drop{round(max_drop * 1000):g}")
    check_output(out, [src, Path(dev_path)], force=force)
    base = load_classifier(src)
    if base.is_factorized:
        raise InputError(f"{src}: already factorized; give the dense classifier")
    config = dataclasses.replace(config or TrainConfig(lr=2e-3), epochs=max(finetune_epochs, 1))
    device = resolve_device(config.device)
    dev_ds = base.encode(read_jsonl(dev_path))
    train_ds = base.encode(read_jsonl(train_path)) if finetune_epochs else None
    baseline = evaluate(base.model.to(device), dev_ds, device, config.eval_batch_size).accuracy
    V, d = base.model.embedding.weight.shape
    target = baseline - max_drop

    trials: dict[int, Trial] = {}
    models: dict[int, object] = {}

    def score(k: int) -> Trial:
        clf = copy.deepcopy(base)
        reports = compress_embeddings(clf.model, rank=k, tables=["embedding"])
        clf.factorization = json.dumps({"tables": {"embedding.weight": {
            "shape": [V, d], "rank": k, "rank_rule": "max_drop", "method": "exact",
            "reduction_achieved": achieved_reduction(V, d, k), "rel_error": reports[0].rel_error,
            "factors": ["embedding.weight_a", "embedding.weight_b"], "tied": {}}}})
        if finetune_epochs:
            fit(clf.model, train_ds, dev_ds, config)
        acc = evaluate(clf.model.to(device), dev_ds, device, config.eval_batch_size).accuracy
        trial = Trial(k, achieved_reduction(V, d, k), acc, acc >= target)
        trials[k], models[k] = trial, clf
        if progress:
            progress(trial)
        return trial

    lo, hi = 1, max(1, math.ceil(break_even_rank(V, d)) - 1)
    if not score(hi).within_budget:
        raise InputError(
            f"even k = {hi} (the largest rank that saves anything) scores {100 * trials[hi].dev_accuracy:.2f} % on dev, "
            f"more than {100 * max_drop:g} points below the original's {100 * baseline:.2f} %; allow a larger drop "
            "or fine-tune (--finetune-epochs)"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if score(mid).within_budget:
            hi = mid
        else:
            lo = mid + 1
    best = models[hi]
    best.train = {**best.train, "max_drop": {"max_drop": max_drop, "dev": str(dev_path), "baseline": baseline,
                                             "finetune_epochs": finetune_epochs}}
    save_classifier(best, out, inputs=[src], force=force)
    ordered = sorted(trials.values(), key=lambda t: t.rank)
    return BudgetResult(str(out), baseline, max_drop, hi, achieved_reduction(V, d, hi), trials[hi].dev_accuracy,
                        finetune_epochs, ordered)
