"""Every training method, defined once: its defaults, how the planner counts its memory, which builder makes the
model trainable, its optimizer, and where it can run. The config schema, the planner, the job checks and the
recipe all read this table; adding a method is one MethodSpec here plus its builder in `model_setup`.

This module stays import-light (no torch): the server and the config schema read it. So the builder is named
here, and `model_setup` (which imports torch) resolves the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MemoryProfile:
    """What the planner counts for a method (lmtuner_core.planning.memory)."""

    trains: Literal["all", "last_layers", "adapter"]  # every weight, the last layers, or an adapter on a frozen base
    base_quant: Literal["nf4", "int8"] | None = None  # bitsandbytes storage of the frozen base's block linears
    magnitude: bool = False  # DoRA: a magnitude vector of size fan_out per adapted layer
    fused: Literal["lomo", "adalomo"] | None = None  # updated inside backward: no stored gradients


@dataclass(frozen=True)
class MethodSpec:
    name: str
    learning_rate: float  # what practitioners start from
    summary: str
    builder: str  # the function in lmtuner_core.training.model_setup that makes the model trainable
    memory: MemoryProfile
    optimizer: str | None = None  # the Trainer's `optim` when the method brings its own; else the config's
    needs_cuda: str | None = None  # why it cannot run without a CUDA GPU, with what to use instead
    deepspeed: str | None = None  # why it cannot run under DeepSpeed; None: it can
    not_yet: str | None = None  # why this version cannot run it, with what to use instead

    @property
    def adapter(self) -> bool:
        """The artifact is a PEFT adapter on an unchanged base."""
        return self.memory.trains == "adapter"

    @property
    def full_weights(self) -> bool:
        """Base weights train (so fp16 mixed precision keeps fp32 master copies of them)."""
        return self.memory.trains != "adapter"


_FUSED_UPDATE = (
    "updates the weights inside the backward pass, which DeepSpeed's ZeRO cannot shard; remove deepspeed, or use "
    "lora or full with deepspeed"
)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", 2e-5, "every weight trains; needs the most memory", "full", MemoryProfile("all")),
        MethodSpec("freeze", 5e-5, "only the last layers train", "freeze", MemoryProfile("last_layers")),
        MethodSpec("lora", 2e-4, "low-rank adapters on a frozen base", "lora", MemoryProfile("adapter")),
        MethodSpec("dora", 2e-4, "LoRA with a learned magnitude per weight column", "dora",
                   MemoryProfile("adapter", magnitude=True)),
        MethodSpec("qlora", 2e-4, "LoRA on a 4-bit NF4 base (double quantization)", "quantized_lora",
                   MemoryProfile("adapter", base_quant="nf4")),
        MethodSpec("lora-8bit", 2e-4, "LoRA on an 8-bit base", "quantized_lora",
                   MemoryProfile("adapter", base_quant="int8")),
        MethodSpec("lomo", 1e-3, "every weight, updated inside the backward pass: no optimizer state", "lomo",
                   MemoryProfile("all", fused="lomo"), optimizer="lomo", deepspeed=_FUSED_UPDATE),
        MethodSpec("adalomo", 5e-4, "LOMO with adaptive per-parameter rates (needs a CUDA GPU)", "lomo",
                   MemoryProfile("all", fused="adalomo"), optimizer="adalomo", deepspeed=_FUSED_UPDATE,
                   needs_cuda="lomo-optim keeps its state on the GPU; use 'lomo' on the CPU"),
    )
}  # fmt: skip
METHOD_NAMES = tuple(METHODS)


def default_learning_rate(method: str) -> float:
    """A learning rate practitioners start from for this method."""
    return METHODS[method].learning_rate
