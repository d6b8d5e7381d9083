"""Draw the learning rate of CLR against CALR, as the library's schedulers produce it, and write a PNG.

Both schedules come from ``embcompress.train.schedules.make_schedule`` stepped on a dummy optimizer (one zero
parameter, no gradients), exactly as ``fit`` steps them: once per iteration. The settings are the library's
defaults (upper bound = the optimizer's rate, 5e-3 as ``TrainConfig`` sets it; lower bound = upper / 10; a
half-cycle of half an epoch; CALR decay ln(1/2)), over enough epochs that CALR's upper bound halves three times,
falls to the lower bound and goes back to its initial value inside the plot.

    .venv/bin/python scripts/plot_schedules.py                      # writes docs/img/schedules.png
    .venv/bin/python scripts/plot_schedules.py --out /tmp/x.png --epochs 10

Runs on one thread (``torch.set_num_threads(1)``) so as to leave the machine's other cores free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from embcompress.train.schedules import make_schedule  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "img" / "schedules.png"


def schedule_trace(
    name: str, *, epochs: int, steps_per_epoch: int, lr: float, **kwargs: float | int | None
) -> tuple[list[float], list[float]]:
    """The rate at every iteration of ``epochs`` epochs, and the upper bound in force (CALR's ``lr_ub_current``;
    CLR's fixed bound), from the library's scheduler on a dummy optimizer."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_schedule(name, optimizer, steps_per_epoch=steps_per_epoch, **kwargs)
    rates, bounds = [], []
    for _ in range(epochs * steps_per_epoch):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        bounds.append(float(getattr(scheduler, "lr_ub_current", getattr(scheduler, "lr_ub", rates[-1]))))
        optimizer.step()  # no gradient: changes nothing, but keeps the optimizer-then-scheduler order
        scheduler.step()
    return rates, bounds


def plot(out: Path, *, epochs: int = 8, steps_per_epoch: int = 109, lr: float = 5e-3) -> Path:
    """Draw CLR (top) and CALR (bottom) over ``epochs`` epochs of ``steps_per_epoch`` iterations; write ``out``.

    109 iterations an epoch is SST-2's 6920 training sentences in batches of 64 (the last one partial).
    """
    traces = {name: schedule_trace(name, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=lr)
              for name in ("clr", "calr")}
    x = [i / steps_per_epoch for i in range(epochs * steps_per_epoch)]
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True, sharey=True)
    titles = {"clr": "CLR (triangular, fixed bounds)",
              "calr": "CALR (upper bound x exp(decay) each epoch, reset once at or below the lower bound)"}
    for ax, name, color in zip(axes, ("clr", "calr"), ("tab:blue", "tab:red"), strict=True):
        rates, bounds = traces[name]
        ax.plot(x, rates, color=color, lw=1.4, label="learning rate")
        ax.plot(x, bounds, color="0.45", lw=1.0, ls="--", label="upper bound in force")
        ax.axhline(lr / 10, color="0.7", lw=0.8, ls=":", label="lower bound")
        ax.set_title(titles[name], fontsize=10)
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        for e in range(1, epochs):
            ax.axvline(e, color="0.85", lw=0.6, zorder=0)
    axes[1].legend(loc="upper right", fontsize=8, framealpha=0.95)
    axes[1].set_xlabel(f"epoch ({steps_per_epoch} iterations each; half-cycle = half an epoch)")
    axes[1].set_xlim(0, epochs)
    fig.suptitle(f"CLR vs CALR, library defaults: LR_UB = {lr:g}, LR_LB = LR_UB/10, decay = ln(1/2)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot the CLR and CALR learning rates of embcompress's schedulers.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: docs/img/schedules.png)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs to draw (default 8: CALR resets after the 4th)")
    parser.add_argument("--steps-per-epoch", type=int, default=109,
                        help="iterations an epoch (default 109: SST-2 in batches of 64)")
    parser.add_argument("--lr", type=float, default=5e-3, help="upper bound LR_UB (default 5e-3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = plot(args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, lr=args.lr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
