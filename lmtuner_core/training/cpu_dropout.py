"""LoRA's input dropout on the CPU from 16-bit random draws, four to each 64-bit number torch's generator makes.

PEFT drops out each LoRA module's input with `nn.Dropout`, and torch draws one random number per element for its
mask on the CPU (a serial Mersenne Twister): for SmolLM2 that is 7 masks per layer over every token's hidden state,
and drawing them took as long as the layer's q and o projections together. Here the mask is the same Bernoulli
(keep with probability 1 - p, kept values scaled by 1 / (1 - p)), compared against 16-bit slices of
`torch.randint` int64 draws: a quarter of the generator calls, with p rounded to the nearest 1/65,536. Seeded by
torch's generator, so a run is as reproducible as with `nn.Dropout`. Hand-written because neither torch nor PEFT
has a faster CPU dropout; CUDA keeps `nn.Dropout` (its Philox generator is not the bottleneck there).
"""

from __future__ import annotations

from typing import Any

import torch

LEVELS = 1 << 16  # 16-bit draws


class _MaskedScale(torch.autograd.Function):
    """x scaled where the mask keeps it, 0 elsewhere; the mask (one byte an element) is all the backward keeps."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad * ctx.scale, 0.0), None, None


def bernoulli_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - p (p rounded to 1/65,536)."""
    n = shape.numel()
    draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    uniform = draws.view(torch.int16)[:n].view(shape)  # 16 random bits each, read as -32,768 … 32,767
    return uniform >= round(p * LEVELS) - LEVELS // 2


class CPUDropout(torch.nn.Module):
    """`nn.Dropout(p)` with masks from `bernoulli_keep_mask`; identity in eval mode or at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return x
        return _MaskedScale.apply(x, bernoulli_keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(model: Any) -> int:
    """Swaps every LoRA `nn.Dropout` in a PEFT model for CPUDropout of the same p; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = CPUDropout(dropout.p)
                swapped += 1
    return swapped
