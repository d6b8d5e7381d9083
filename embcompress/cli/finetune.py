"""``embcompress finetune``: keep training a (factorized) classifier to win back its accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import families, workspace
from ..errors import InputError
from ..checkpoint import default_output
from ..train.loop import TrainConfig
from ..train.run import FINETUNE_DEFAULTS, finetune_classifier
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
    OutputOpt,
    ResumeOpt,
    SeedOpt,
    WeightDecayOpt,
)
from ._progress import run_training
from ._render import err_console, print_json, render_training

EXAMPLES = """Examples:

  embcompress finetune model.r90.safetensors --data train.jsonl --dev dev.jsonl

  embcompress finetune --data train.jsonl      (the last factorized model and --dev from the workspace record)

  embcompress finetune model.r90.safetensors --data train.jsonl --dev dev.jsonl -o model.r90.ft.safetensors --resume

  embcompress finetune model.pq.safetensors --teacher model.safetensors --data train.jsonl --dev dev.jsonl
      (learn the original classifier's predictions, mixed with the labels)

  embcompress finetune model.pq.safetensors --teacher model.safetensors --data texts.txt --dev dev.jsonl   (no labels)

  embcompress finetune lstm.pq.safetensors --teacher lstm.safetensors --data train.jsonl --reassign-codes
  --epochs 24 --lr 2e-3 --schedule warmup-cosine     (the pq codes are trained too; same bytes)

  embcompress finetune minilm-r90 --teacher all-MiniLM-L6-v2 --data texts.txt --dev dev.txt   (no labels)

  embcompress finetune minilm-r90 --teacher all-MiniLM-L6-v2 --data texts.txt --steps 1200 --vocab-steps 600

  embcompress finetune minilm-trim --teacher all-MiniLM-L6-v2 --data texts.txt   (a trimmed student: its own tokenizer)

  torchrun --standalone --nproc_per_node 2 --no-python embcompress finetune minilm-r90 --teacher all-MiniLM-L6-v2 --data texts.txt
"""


def finetune(
    model: Annotated[Path | None, typer.Argument(help="A classifier from train (factorized or not). Default: the "
                     "last factorized model in the workspace record.", show_default=False)] = None,
    data: DataOpt = None,
    dev: DevOpt = None,
    output: OutputOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = "adam",
    schedule: Annotated[str | None, typer.Option(
        "--schedule", help="calr (the paper's cyclically annealed LR, the default for classifiers), clr (triangular), "
        "constant, or warmup-cosine (the default for Hugging Face models, with --teacher or labels).",
        show_default=False)] = None,
    weight_decay: WeightDecayOpt = 1e-5,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
    # --- Hugging Face encoders, label-free (embcompress.distill): distil toward the original ---
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", help="The original model. A Hugging Face folder: distil MODEL (a compressed HF folder) toward it "
        "on the --data texts (.txt, one a line, or .jsonl); no labels; --dev texts report the cosine before/after. "
        "A classifier: MODEL learns its predictions on the --data texts, mixed with their labels (--label-weight).",
        show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", help="[classifier --teacher] Softening of the teacher's predictions (default 2).",
        show_default=False)] = None,
    reassign_codes: Annotated[bool, typer.Option(
        "--reassign-codes", help="[classifier] Train the codes of a product-quantized (pq) table too: a float copy "
        "of the table (the --teacher's, else the decoded one) is trained, each row read through its nearest codes, "
        "the codebooks re-fitted as it goes; the file keeps its bytes.")] = False,
    label_weight: Annotated[float | None, typer.Option(
        "--label-weight", help="[classifier --teacher] The labels' share of the loss, 0 to 1 (default 0.5 with "
        "JSON Lines, 0 with .txt texts: no labels needed).", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="[--teacher] Steps of the layer phase (default 600).",
                                              show_default=False)] = None,
    layers: Annotated[int | None, typer.Option(
        "--layers", help="[--teacher] Match the original's token states after this many layers, training only "
        "the embeddings and those layers (default 2); 0: train all toward the sentence embeddings.",
        show_default=False)] = None,
    sentence_steps: Annotated[int | None, typer.Option(
        "--sentence-steps", help="[--teacher] Then this many steps on the sentence embeddings, whole model "
        "(default 0).", show_default=False)] = None,
    vocab_steps: Annotated[int | None, typer.Option(
        "--vocab-steps", help="[--teacher] Then this many steps training only the table rows of tokens the --data "
        "texts never show (vocabulary completion; default 0).", show_default=False)] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="[--teacher] Sentence-embedding loss: cosine or mse.",
                                             show_default=False)] = None,
    vocab_mix: Annotated[float | None, typer.Option(
        "--vocab-mix", help="[--teacher] Share of each batch made of random words from the model's own vocabulary "
        "(default 0).", show_default=False)] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="[--teacher] Tokens per text (default 128).",
                                                   show_default=False)] = None,
) -> None:
    """Continue training a classifier ("online" recovery, the paper's method) with the CALR schedule by default.

    Factorized tables keep their shapes, so the model stays small. Prints dev accuracy before and after.
    """
    workspace.check_record()  # before any output: the entry must be writable afterwards
    taken = []
    if model is None:
        model, _ = workspace.take(None, "model", what="model", commands=("factorize",))
        taken.append(f"model {model}")
    if (temperature is not None or label_weight is not None) and teacher is None:
        raise InputError("--temperature and --label-weight need a classifier --teacher")
    distil_classifier = teacher is not None and families.detect(model).measures == families.CLASSIFIER
    if teacher is not None and not distil_classifier:
        if temperature is not None or label_weight is not None or reassign_codes:
            raise InputError("--temperature, --label-weight and --reassign-codes are for a classifier")
        from ._hf import finetune_distill

        if data is None:
            data, _ = workspace.take(None, "texts", what="--data", side="inputs")
        finetune_distill(model, teacher, data, dev, output, steps=steps, sentence_steps=sentence_steps,
                         vocab_steps=vocab_steps, layers=layers, loss=loss, vocab_mix=vocab_mix,
                         batch_size=batch_size, lr=lr, max_length=max_length, seed=seed, device=device, force=force,
                         json=json, schedule=schedule, resume=resume)
        return
    if model is not None and data is not None and families.detect(model).measures == families.ENCODER:
        # an encoder learns labels through a new sequence-classification head
        if reassign_codes:
            raise InputError("--reassign-codes is for a classifier")
        from ._hf import finetune_labels

        finetune_labels(model, data, dev, output, epochs=epochs, batch_size=batch_size, lr=lr, max_length=max_length,
                        seed=seed, device=device, force=force, json=json, schedule=schedule, resume=resume)
        return
    if data is None:
        data, _ = workspace.take(None, "train", what="--data", side="inputs")
        taken.append(f"--data {data}")
    if dev is None:
        recorded = workspace.last_artifact("dev", side="inputs")
        if recorded is not None:
            dev = recorded
            taken.append(f"--dev {dev}")
    if taken and not json:
        err_console.print("from the workspace record: " + ", ".join(taken))
    out = output or default_output(model, "ft").with_suffix(".safetensors")
    distil_options = {"temperature": temperature} if temperature is not None else {}
    config = TrainConfig(epochs=epochs or FINETUNE_DEFAULTS["epochs"], batch_size=batch_size or 64,
                         lr=lr or FINETUNE_DEFAULTS["lr"], optimizer=optimizer, schedule=schedule or "calr",
                         weight_decay=weight_decay, seed=seed, device=device)
    report, main_process = run_training(
        lambda on_step, on_epoch: finetune_classifier(model, data, dev, out, config=config, force=force, resume=resume,
                                                      on_step=on_step, on_epoch=on_epoch, teacher=teacher,
                                                      label_weight=label_weight, reassign_codes=reassign_codes,
                                                      **distil_options),
        show=not json,
    )
    if not main_process:
        return
    workspace.record("finetune", options=report.options,
                     inputs=[("model", model), ("train", data)] + ([("dev", dev)] if dev else [])
                     + ([("teacher", teacher)] if teacher else []),
                     outputs=[("model", Path(report.output))],
                     figures={"dev_before": report.dev_before, "dev_after": report.dev_after})
    if json:
        print_json(report)
        return
    render_training(report, "Fine-tuned")
