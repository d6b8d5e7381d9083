"""The Hugging Face paths of ``finetune`` (``--teacher``: label-free distillation) and ``evaluate``
(``--similarity-to``): called from those commands when the model is a transformers folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import workspace
from ..errors import InputError
from ..recover.loop import cleanup_distributed, init_distributed_from_env, is_main_process
from ._render import console, err_console, print_json, table

PLAIN_EVERY_SECONDS = 30.0  # a progress line at least this often when stderr is not a terminal


@contextmanager
def _progress(show: bool) -> Iterator:
    """A step callback ``(phase, step, total, loss)`` drawing progress on stderr: a live bar on a terminal, else
    (output sent to a file) a plain line every tenth of a phase or every 30 s; None when not shown or not rank 0."""
    if not show or not is_main_process():
        yield None
        return
    if not err_console.is_terminal:
        last = [time.monotonic(), time.monotonic()]  # (last line, phase start)

        def plain(phase: str, step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if step == 1:
                last[0] = last[1] = now  # the clock starts with the phase's first step
            every = max(1, total // 10)
            if step % every and step != total and now - last[0] < PLAIN_EVERY_SECONDS:
                return
            last[0] = now
            elapsed = now - last[1]
            left = elapsed / step * (total - step)
            err_console.print(f"{phase} phase: step {step}/{total}, loss {loss:.4f}, {elapsed / 60:.1f} min elapsed, "
                              f"about {left / 60:.1f} min left", soft_wrap=True)

        yield plain
        return
    progress = Progress(TextColumn("{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=err_console,
                        transient=True)
    tasks: dict[str, int] = {}
    started = False

    def on_step(phase: str, step: int, total: int, loss: float) -> None:
        nonlocal started
        if not started:
            progress.start()
            started = True
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total, phase=f"{phase} phase", loss=loss)
        progress.update(tasks[phase], completed=step, loss=loss)

    try:
        yield on_step
    finally:
        if started:
            progress.stop()


@contextmanager
def _distributed() -> Iterator[bool]:
    """torchrun's process group around a command (as ``train`` has it); yields whether this rank prints and
    records (rank 0, or no torchrun)."""
    distributed = init_distributed_from_env()
    main_process = is_main_process()
    try:
        yield main_process
    finally:
        if distributed:
            cleanup_distributed()


def _note(json: bool) -> Callable[[str], None] | None:
    """Lines the library says before and while it runs (estimates, changes a student forces), on stderr."""
    if json or not is_main_process():
        return None
    return lambda line: err_console.print(line, soft_wrap=True)


def default_distill_output(model: Path) -> Path:
    """``<folder>-ft`` beside the student folder."""
    return model.parent / f"{model.name}-ft"


def finetune_distill(
    model: Path,
    teacher: Path,
    data: Path,
    dev: Path | None,
    output: Path | None,
    *,
    steps: int | None,
    sentence_steps: int | None,
    vocab_steps: int | None,
    layers: int | None,
    loss: str | None,
    vocab_mix: float | None,
    batch_size: int | None,
    lr: float | None,
    max_length: int | None,
    seed: int,
    device: str,
    force: bool,
    json: bool,
    schedule: str | None = None,
    resume: bool = False,
) -> None:
    """``embcompress finetune MODEL --teacher ORIGINAL --data texts``: distil, write, record, report. Says first how
    long it will take (measured), and under torchrun only rank 0 prints and records."""
    from ..distill import DistillConfig, distill

    defaults = DistillConfig()
    config = DistillConfig(
        steps=defaults.steps if steps is None else steps,
        sentence_steps=defaults.sentence_steps if sentence_steps is None else sentence_steps,
        vocab_steps=defaults.vocab_steps if vocab_steps is None else vocab_steps,
        layers=defaults.layers if layers is None else layers,
        loss=loss or defaults.loss,
        vocab_mix=defaults.vocab_mix if vocab_mix is None else vocab_mix,
        batch_size=batch_size or defaults.batch_size,
        lr=lr or defaults.lr,
        max_length=max_length or defaults.max_length,
        schedule=schedule or defaults.schedule,
        seed=seed,
        device=device,
    )
    out = output or default_distill_output(model)
    with _distributed() as main_process, _progress(not json) as on_step:
        report = distill(model, teacher, data, out, config=config, dev_path=dev, force=force, resume=resume,
                         on_step=on_step, on_note=_note(json), estimate=not json)
    if not main_process:
        return
    figures = {"texts": report.texts, "steps": sum(p["steps"] for p in report.phases), "seconds": report.seconds}
    if report.before:
        figures.update(dev_cosine_before=report.before["mean"], dev_cosine_after=report.after["mean"],
                       dev_worst_before=report.before["worst"], dev_worst_after=report.after["worst"])
    workspace.record("finetune", options=report.options,
                     inputs=[("model", model), ("teacher", teacher), ("texts", data)] + ([("dev", dev)] if dev else []),
                     outputs=[("model", Path(report.output))], figures=figures)
    if json:
        print_json(report.to_dict())
        return
    rows = [[p["phase"], p["steps"], p["layers"] or "all", p["loss"], f"{p['loss_first']:.4f}",
             f"{p['loss_last']:.4f}", f"{p['lr']:.0e}", f"{p['seconds']:.0f} s"] for p in report.phases]
    console.print(f"[bold]{model}[/bold] distilled toward {teacher} on {report.texts} texts of {data} -> "
                  f"[bold]{report.output}[/bold]")
    console.print(table(None, ["phase", "steps", "layers", "loss", "first", "last", "lr", "time"], rows))
    if report.before:
        console.print(f"cosine to the original on {dev} ({report.before['count']} texts): mean "
                      f"{report.before['mean']:.4f} -> {report.after['mean']:.4f}, worst {report.before['worst']:.4f} "
                      f"-> {report.after['worst']:.4f}; {report.device}, {report.seconds:.0f} s")
    else:
        console.print(f"{report.device}, {report.seconds:.0f} s (give --dev texts to see the cosine to the original "
                      "before and after)")


def evaluate_similarity(model: Path, original: Path, data: Path, *, batch_size: int, max_length: int | None,
                        limit: int | None, device: str, json: bool, coverage_of: Path | None = None) -> None:
    """``embcompress evaluate MODEL --similarity-to ORIGINAL --data texts [--coverage-of RECOVERY_TEXTS]``."""
    from ..distill import similarity_to
    from ..hf import DEFAULT_MAX_LENGTH

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    report = similarity_to(model, original, data, limit=limit, batch_size=batch_size,
                           max_length=max_length or DEFAULT_MAX_LENGTH, device=device, coverage_of=coverage_of)
    workspace.record("evaluate", options={"similarity_to": str(original), "batch_size": batch_size},
                     inputs=[("model", model), ("original", original), ("texts", data)]
                     + ([("coverage_of", coverage_of)] if coverage_of else []), outputs=[],
                     figures={"cosine_mean": report.mean, "cosine_worst": report.worst, "cosine_p05": report.p05,
                              "cosine_median": report.median, "count": report.count})
    if json:
        print_json(report.to_dict())
        return
    console.print(f"[bold]{model}[/bold] vs {original} on {data} ({report.count} texts): mean cosine "
                  f"{report.mean:.4f}, worst {report.worst:.4f}, 5th percentile {report.p05:.4f}, median "
                  f"{report.median:.4f}; {report.seconds:.1f} s")
    console.print(f"worst text: {report.worst_text[:160]!r}")
    if report.coverage:
        console.print(f"mean cosine by how often a text's rarest token occurs in {coverage_of}:")
        console.print(table(None, ["times", "texts", "mean cosine"],
                            [[g["group"], g["texts"], "-" if g["mean"] is None else f"{g['mean']:.4f}"]
                             for g in report.coverage]))


def finetune_labels(model: Path, data: Path, dev: Path | None, output: Path | None, *, epochs: int | None,
                    batch_size: int | None, lr: float | None, max_length: int | None, seed: int, device: str,
                    force: bool, json: bool, schedule: str | None = None, resume: bool = False) -> None:
    """``embcompress finetune HF_FOLDER --data train.jsonl [--dev dev.jsonl]``: a sequence-classification head."""
    from ..distill import finetune_labelled
    from ..hf import DEFAULT_MAX_LENGTH

    out = output or default_distill_output(model)
    with _distributed() as main_process, _progress(not json) as on_step:
        report = finetune_labelled(model, data, dev, out, epochs=epochs or 3, batch_size=batch_size or 32,
                                   lr=lr or 5e-5, max_length=max_length or DEFAULT_MAX_LENGTH,
                                   schedule=schedule or "warmup-cosine", seed=seed, device=device, force=force,
                                   resume=resume, on_step=on_step)
    if not main_process:
        return
    workspace.record("finetune", options=report.options,
                     inputs=[("model", model), ("train", data)] + ([("dev", dev)] if dev else []),
                     outputs=[("model", Path(report.output))],
                     figures={"dev_before": report.dev_before, "dev_after": report.dev_after})
    if json:
        print_json(report.to_dict())
        return
    rows = [[h["epoch"], f"{h['train_loss']:.4f}",
             f"{100 * h['dev_accuracy']:.2f} %" if h["dev_accuracy"] is not None else "-", f"{h['seconds']:.0f} s",
             "*" if h["epoch"] == report.best_epoch else ""] for h in report.history]
    console.print(table(f"Fine-tuned (sequence classification, labels {report.labels}) -> {report.output}",
                        ["epoch", "loss", "dev accuracy", "time", "best"], rows))
    if report.dev_before is not None:
        console.print(f"dev accuracy before {100 * report.dev_before:.2f} %, after {100 * report.dev_after:.2f} %; "
                      f"{report.device}, {report.seconds:.0f} s")


def show_labels(model: Path, data: Path, result: dict, *, batch_size: int, json: bool) -> None:
    """``embcompress evaluate HF_CLASSIFIER --data test.jsonl``: record and print the accuracy."""
    workspace.record("evaluate", options={"batch_size": batch_size}, inputs=[("model", model), ("test", data)],
                     outputs=[], figures={"accuracy": result["accuracy"]})
    if json:
        print_json(result)
        return
    console.print(f"[bold]{model}[/bold] on {data}: accuracy {100 * result['accuracy']:.2f} %, {result['count']} "
                  f"examples, {result['examples_per_second']:,.0f} examples/s")
