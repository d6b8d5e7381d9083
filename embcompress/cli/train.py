"""``embcompress train``: train the paper's DAN or LSTM classifier from JSON Lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import workspace
from ..train.loop import TrainConfig
from ..train.run import train_classifier
from ._options import (
    BatchOpt,
    DataOpt,
    DeviceOpt,
    DevOpt,
    EpochsOpt,
    ForceOpt,
    JsonOpt,
    LrOpt,
    OptimizerOpt,
    ResumeOpt,
    ScheduleOpt,
    SeedOpt,
    WeightDecayOpt,
)
from ._progress import run_training
from ._render import console, print_json, render_training

EXAMPLES = """Examples:

  embcompress train --model dan --data train.jsonl --dev dev.jsonl -o dan.safetensors

  embcompress train --model lstm --init-vectors glove.6B.50d.txt --data train.jsonl --dev dev.jsonl -o lstm.safetensors

  embcompress train --model dan --schedule clr --optimizer adam --epochs 6 --data train.jsonl -o dan.clr.safetensors

  torchrun --standalone --nproc_per_node 2 --no-python embcompress train --data train.jsonl -o dan.safetensors
"""


def train(
    data: DataOpt = None,
    dev: DevOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the model (.safetensors).")] = Path(
        "model.safetensors"),
    model: Annotated[str, typer.Option("--model", help="dan (deep averaging network) or lstm.")] = "dan",
    embed_dim: Annotated[int | None, typer.Option("--embed-dim", help="Embedding size (default: the vectors' "
                         "size with --init-vectors, else 300).", show_default=False)] = None,
    hidden_dim: Annotated[int, typer.Option("--hidden-dim", help="LSTM hidden size.")] = 150,
    init_vectors: Annotated[Path | None, typer.Option("--init-vectors", help="Word vectors in GloVe text format "
                            "to initialise the table (words it lacks start at random).", show_default=False)] = None,
    min_count: Annotated[int, typer.Option("--min-count", help="Keep words seen at least this often.")] = 1,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = 64,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = "adam",
    schedule: ScheduleOpt = "calr",
    weight_decay: WeightDecayOpt = 1e-5,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout rate.")] = 0.4,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a DAN or LSTM text classifier; the best epoch on --dev is kept. The output holds the weights,
    vocabulary, labels and history: finetune, evaluate and export need nothing else."""
    workspace.check_record()  # before any output: the entry must be writable afterwards
    data, from_record = workspace.take(data, "train", what="--data", side="inputs")
    config = TrainConfig(epochs=epochs or TrainConfig.epochs, batch_size=batch_size, lr=lr or TrainConfig.lr,
                         optimizer=optimizer, schedule=schedule, weight_decay=weight_decay, seed=seed, device=device)
    report, main_process = run_training(
        lambda on_step, on_epoch: train_classifier(
            data, dev, output, arch=model, embed_dim=embed_dim, hidden_dim=hidden_dim, dropout=dropout,
            min_count=min_count, init_vectors=init_vectors, config=config, force=force, resume=resume,
            on_step=on_step, on_epoch=on_epoch),
        show=not json,
    )
    if not main_process:
        return
    workspace.record("train", options=report.options, inputs=[("train", data)] + ([("dev", dev)] if dev else []),
                     outputs=[("model", Path(report.output))],
                     figures={"dev_accuracy": report.dev_after, "best_epoch": report.best_epoch})
    if json:
        print_json(report)
        return
    if from_record:
        console.print(f"using --data {data} from the workspace record")
    render_training(report, "Trained")
