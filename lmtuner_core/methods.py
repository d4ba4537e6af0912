"""Every training method, defined once: its defaults, how the planner counts its memory and which plans it tries,
the builder that makes the model trainable, its optimizer, and where it can run. The config schema (the `method`
field and its description), the planner, the memory model, the job checks and the recipe all read this table;
adding a method is one MethodSpec here plus its builder function in `model_setup`.

This module stays import-light (no torch): the server and the config schema read it. So a builder is a callable
that imports `model_setup` (which imports torch) when it is first called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class MemoryProfile:
    """What the planner counts for a method (lmtuner_core.planning.memory)."""

    trains: Literal["all", "last_layers", "adapter"]  # every weight, the last layers, or an adapter on a frozen base
    base_quant: Literal["nf4", "int8"] | None = None  # bitsandbytes storage of the frozen base's block linears
    magnitude: bool = False  # DoRA: a magnitude vector of size fan_out per adapted layer
    fused: Literal["lomo", "adalomo"] | None = None  # updated inside backward: no stored gradients


@dataclass(frozen=True)
class PlanProfile:
    """Which candidates the planner tries for a method (lmtuner_core.planning.planner), and why it says it chose it."""

    default_rank: int | None = None  # tried without a requested method, lowest first; None: only when asked for
    zero_stages: bool = False  # with several GPUs also DeepSpeed ZeRO-2/3 and offloading (the base's weights train)
    eight_bit_optimizer: bool = False  # last resort on one device: 8-bit optimizer states
    why: str | None = None  # the rationale line when the planner picks it


@dataclass(frozen=True)
class ModelSetupBuilder:
    """A builder: `builder(model, config)` returns the model made trainable, by the function of that name in
    lmtuner_core.training.model_setup (imported on the first call: it imports torch)."""

    function: str

    def __call__(self, model: Any, config: Any) -> Any:
        return self.resolve()(model, config)

    def resolve(self) -> Callable[[Any, Any], Any]:
        return getattr(importlib.import_module("lmtuner_core.training.model_setup"), self.function)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    learning_rate: float  # what practitioners start from
    summary: str
    builder: Callable[[Any, Any], Any]  # (model, TrainConfig) -> the model made trainable
    memory: MemoryProfile
    plan: PlanProfile = PlanProfile()
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

_LORA_WHY = (
    "LoRA trains small adapter matrices on a frozen model: a fraction of the memory of full fine-tuning, and "
    "usually as good for teaching a task or style."
)
_QLORA_WHY = (
    "LoRA alone does not fit, so the frozen model is stored in 4 bits (QLoRA): about a quarter of the memory, with "
    "little loss in quality."
)
_setup = ModelSetupBuilder

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", 2e-5, "every weight trains; needs the most memory", _setup("full"), MemoryProfile("all"),
                   PlanProfile(zero_stages=True, eight_bit_optimizer=True)),
        MethodSpec("freeze", 5e-5, "only the last layers train", _setup("freeze"), MemoryProfile("last_layers"),
                   PlanProfile(zero_stages=True)),
        MethodSpec("lora", 2e-4, "low-rank adapters on a frozen base", _setup("lora"), MemoryProfile("adapter"),
                   PlanProfile(default_rank=0, why=_LORA_WHY)),
        MethodSpec("dora", 2e-4, "LoRA with a learned magnitude per weight column", _setup("dora"),
                   MemoryProfile("adapter", magnitude=True), PlanProfile(why=_LORA_WHY)),
        MethodSpec("qlora", 2e-4, "LoRA on a 4-bit NF4 base (double quantization)", _setup("quantized_lora"),
                   MemoryProfile("adapter", base_quant="nf4"), PlanProfile(default_rank=1, why=_QLORA_WHY)),
        MethodSpec("lora-8bit", 2e-4, "LoRA on an 8-bit base", _setup("quantized_lora"),
                   MemoryProfile("adapter", base_quant="int8")),
        MethodSpec("lomo", 1e-3, "every weight, updated inside the backward pass: no optimizer state", _setup("lomo"),
                   MemoryProfile("all", fused="lomo"), optimizer="lomo", deepspeed=_FUSED_UPDATE),
        MethodSpec("adalomo", 5e-4, "LOMO with adaptive per-parameter rates (needs a CUDA GPU)", _setup("lomo"),
                   MemoryProfile("all", fused="adalomo"), optimizer="adalomo", deepspeed=_FUSED_UPDATE,
                   needs_cuda="lomo-optim keeps its state on the GPU; use 'lomo' on the CPU"),
    )
}  # fmt: skip
METHOD_NAMES = tuple(METHODS)


def default_learning_rate(method: str) -> float:
    """A learning rate practitioners start from for this method."""
    return METHODS[method].learning_rate


def planner_defaults() -> list[str]:
    """The methods the planner tries when none is asked for, in order (LoRA first, QLoRA when LoRA does not fit)."""
    ranked = [spec for spec in METHODS.values() if spec.plan.default_rank is not None]
    return [spec.name for spec in sorted(ranked, key=lambda spec: spec.plan.default_rank)]  # type: ignore[arg-type,return-value]


def adapter_methods() -> tuple[str, ...]:
    """The methods whose artifact is an adapter on an unchanged base (the LoRA family)."""
    return tuple(name for name, spec in METHODS.items() if spec.adapter)


def method_description() -> str:
    """The TrainConfig `method` field's description, from the registry's summaries."""
    return " ".join(f"{name}: {spec.summary}." for name, spec in METHODS.items()) + " Example: 'lora'."
