"""int4 layers chosen and then tuned in torch before the export writes them: ``export --quantize int4 --tune N``.

Why: GPTQ keeps each layer's product close on its own, but the small errors of all the layers add up at the
sentence embedding. Once the 4-bit codes are fixed, what a ``MatMulNBits`` node reads besides them (one fp16 scale
per group), the biases, the LayerNorm parameters (and any other float parameter: the position table, what a
compressed table's method trains) are float numbers that can still move: label-free distillation
toward the model being exported, through the one recovery loop (:func:`embcompress.distill.distill_model`,
sentence-level cosine on the calibration texts), lets each layer make up for the errors of the others. The codes,
zero points and layout do not change, so the file keeps its bytes; only those float numbers change.

Steps (:func:`tune_int4`):

1. ``quantize_blocks_``: E[x x^T] of every ``nn.Linear`` input in the transformer blocks over the calibration
   batches (padding left out), GPTQ codes (:func:`~embcompress.methods.lowbit.quantize_lowbit_gptq`, the very call
   the ONNX path makes), and each such layer replaced by an :class:`Int4Linear`;
2. distillation of every float parameter of the model toward the untouched model (each group's scale through a
   relative gain, see :class:`Int4Linear`);
3. ``freeze_``: each :class:`Int4Linear` back to an ``nn.Linear`` holding the float32 weight its stored tensors
   give, and the stored tensors returned under :func:`~embcompress.export.weights.weight_digest` of that weight, so
   that :func:`~embcompress.export.weights.quantize_weights` writes exactly these codes and scales for it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distill import DistillConfig, distill_model, layer_stack
from ..errors import InputError
from ..methods.lowbit import SCALE_SUFFIX, LowBitConfig, dequantize_lowbit, quantize_lowbit_gptq
from .weights import weight_digest

# a group's scale is s0 * (1 + GAIN_RATE * gain): the gains move GAIN_RATE times faster, relative to their scale,
# than the biases and norms move at the same learning rate (Adam's steps are about the rate, whatever the gradient)
GAIN_RATE = 10.0
TUNE_LR = 1e-4
TUNE_BATCH = 32


class Int4Linear(nn.Module):
    """A linear layer computing with 4-bit codes fixed by GPTQ and trainable group scales.

    The weight is (q - z) * s per group of ``group_size`` inputs, computed in float32 as ``MatMulNBits`` computes it
    from its fp16 scales; ``s = s0 * (1 + GAIN_RATE * gain)`` with ``gain`` the parameter (0 at the start), so a
    learning rate that suits the biases also suits the scales, whose sizes differ from layer to layer."""

    def __init__(self, linear: nn.Linear, stored: Mapping[str, torch.Tensor], config: LowBitConfig) -> None:
        super().__init__()
        n, k = linear.weight.shape
        self.config, self.in_features, self.out_features = config, k, n
        unit = {**stored, SCALE_SUFFIX: torch.ones_like(stored[SCALE_SUFFIX])}
        self.register_buffer("steps", dequantize_lowbit(unit, config, (n, k)))  # q - z, exact at unit scale
        self.register_buffer("s0", stored[SCALE_SUFFIX].to(torch.float32))
        self.stored = {k_: v for k_, v in stored.items() if k_ != SCALE_SUFFIX}
        self.gain = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = linear.bias

    def scales(self) -> torch.Tensor:
        """The fp16 scales as stored now."""
        s = self.s0 * (1.0 + GAIN_RATE * self.gain.detach())
        return s.clamp(min=float(torch.finfo(torch.float16).tiny)).to(torch.float16)

    def weight_of(self, scales: torch.Tensor) -> torch.Tensor:
        per_input = scales.to(torch.float32).repeat_interleave(self.config.group_size, dim=1)
        return self.steps * per_input[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_of(self.s0 * (1.0 + GAIN_RATE * self.gain)), self.bias)

    def frozen(self) -> tuple[nn.Linear, dict[str, np.ndarray]]:
        """The plain layer computing what the stored tensors compute, and those tensors."""
        scales = self.scales()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight_of(scales))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        stored = {k: v.numpy() for k, v in self.stored.items()}
        stored[SCALE_SUFFIX] = scales.numpy()
        return linear, stored


def _block_linears(model: nn.Module, block_size: int) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of each ``nn.Linear`` in the transformer blocks that MatMulNBits can hold; an
    InputError when there is none (GPT-2's blocks hold ``Conv1D`` layers, for one)."""
    try:
        blocks = layer_stack(model)[2]
    except InputError:
        raise InputError(f"--tune: cannot find the transformer layers of {type(model).__name__}") from None
    out = []
    for block in blocks:
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) and mod.in_features % block_size == 0:
                parent_name, _, attr = name.rpartition(".")
                out.append((block.get_submodule(parent_name) if parent_name else block, attr, mod))
    if not out:
        raise InputError(f"--tune: no nn.Linear in the transformer blocks of {type(model).__name__} takes a multiple "
                         f"of {block_size} inputs, so there are no 4-bit codes to tune; export without --tune")
    return out


def _moments(model: nn.Module, layers: list[nn.Linear], batches: Iterable[Mapping[str, torch.Tensor]]
             ) -> list[torch.Tensor]:
    """E[x x^T] (float64) of each layer's input over the batches' attended tokens."""
    sums: list[Any] = [0.0] * len(layers)
    counts = [0] * len(layers)
    keep: list[torch.Tensor] = []

    def hook(i: int) -> Callable[..., None]:
        def record(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0]
            x = x[keep[0]] if x.shape[:2] == keep[0].shape else x.reshape(-1, x.shape[-1])
            x = x.to(torch.float64)
            sums[i] = sums[i] + x.T @ x
            counts[i] += x.shape[0]
        return record

    hooks = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                keep[:] = [batch["attention_mask"].bool()]
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def quantize_blocks_(model: nn.Module, batches: list[Mapping[str, torch.Tensor]], config: LowBitConfig) -> int:
    """Replace each eligible layer of the transformer blocks by an :class:`Int4Linear` with GPTQ's codes from the
    calibration ``batches`` (input_ids, attention_mask); returns how many were replaced."""
    found = _block_linears(model, config.group_size)
    moments = _moments(model, [layer for _, _, layer in found], batches)
    for (parent, attr, layer), hessian in zip(found, moments):
        if not torch.is_tensor(hessian):
            continue
        stored = quantize_lowbit_gptq(layer.weight.detach().to(torch.float32), config, hessian)
        setattr(parent, attr, Int4Linear(layer, stored, config))
    return len(found)


def freeze_(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """Each :class:`Int4Linear` back to an ``nn.Linear``; its stored tensors by the digest of its weight."""
    fixed = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int4Linear):
            linear, stored = mod.frozen()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
            fixed[weight_digest(linear.weight.detach().numpy())] = stored
    return fixed


def tune_int4(model: nn.Module, tokenizer: Any, texts: list[str], batches: list[Mapping[str, torch.Tensor]], *,
              steps: int, block_size: int, scheme: str, max_length: int,
              on_step: Callable[[int, int], None] | None = None) -> tuple[nn.Module, dict[str, dict[str, np.ndarray]]]:
    """A copy of ``model`` whose transformer blocks hold 4-bit GPTQ codes (from ``batches``) and whose float
    parameters were distilled toward ``model`` on ``texts`` for ``steps`` steps; and the stored tensors of its
    int4 layers by weight digest (see the module docstring). ``model`` is not changed."""
    config = LowBitConfig(bits=4, group_size=block_size, scheme=scheme)
    student = copy.deepcopy(model).eval()
    quantize_blocks_(student, batches, config)
    if steps:
        teacher = copy.deepcopy(model).eval()
        distill_config = DistillConfig(steps=steps, layers=0, lr=TUNE_LR, batch_size=min(TUNE_BATCH, len(texts)),
                                       max_length=max_length, device="cpu")
        distill_model(student, teacher, tokenizer, texts, distill_config,
                      on_step=(lambda _phase, step, total, _loss: on_step(step, total)) if on_step else None)
    student.eval()
    return student, freeze_(student)
