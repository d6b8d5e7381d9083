"""Progress on stderr: a spinner with a status line for slow library calls, and a rich progress bar for training
(one bar per epoch with the running loss, and a line per finished epoch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..train.loop import EpochRecord, cleanup_distributed, init_distributed_from_env, is_main_process
from ._render import err_console

StepFn = Callable[[int, int, int, float], None]
EpochFn = Callable[[EpochRecord], None]
T = TypeVar("T")


@contextmanager
def spinner(text: str, enabled: bool = True) -> Iterator[Callable[[str], None] | None]:
    """Show a spinner with ``text`` on stderr while the block runs; yield the function that updates its text
    (None when disabled, e.g. with ``--json``), to pass to a library call as its ``progress``."""
    if not enabled:
        yield None
        return
    status = err_console.status(text, spinner="dots")
    status.start()
    try:
        yield status.update
    finally:
        status.stop()


@contextmanager
def training_progress(enabled: bool = True) -> Iterator[tuple[StepFn | None, EpochFn | None]]:
    """Yield (on_step, on_epoch) callbacks drawing on stderr; (None, None) when disabled or not rank 0."""
    if not enabled or not is_main_process():
        yield None, None
        return
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[int, int] = {}
    started = False

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        nonlocal started
        if not started:  # started on the first step, so a run that fails before training prints nothing
            progress.start()
            started = True
        if epoch not in tasks:
            tasks[epoch] = progress.add_task("train", total=steps, epoch=epoch, loss=loss)
        progress.update(tasks[epoch], completed=step, loss=loss)

    def on_epoch(rec: EpochRecord) -> None:
        if rec.epoch in tasks:
            progress.remove_task(tasks.pop(rec.epoch))
        dev = f"dev accuracy {100 * rec.dev_accuracy:.2f} %" if rec.dev_accuracy is not None else "no dev set"
        best = " (best so far)" if rec.is_best else ""
        progress.console.print(
            f"epoch {rec.epoch}: loss {rec.train_loss:.4f}, {dev}{best}, lr max {rec.lr_max:.2e}, "
            f"{rec.examples_per_second:,.0f} examples/s"
        )

    try:
        yield on_step, on_epoch
    finally:
        if started:
            progress.stop()


def run_training(fn: Callable[[StepFn | None, EpochFn | None], T], *, show: bool = True) -> tuple[T, bool]:
    """Run ``fn(on_step, on_epoch)`` inside torchrun's process group when launched by torchrun, with a progress bar
    on rank 0; return its result and whether this process is the one that writes and prints (rank 0)."""
    distributed = init_distributed_from_env()
    main_process = is_main_process()  # asked before the process group is torn down
    try:
        with training_progress(show) as (on_step, on_epoch):
            return fn(on_step, on_epoch), main_process
    finally:
        if distributed:
            cleanup_distributed()
