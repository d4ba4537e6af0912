"""What each training method is, in one table: defaults and whether this version can run it.

The model-side builders (peft wrapping, layer freezing) live in `lmtuner_core.model_setup`; this module stays
import-light because the server and the config schema read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    learning_rate: float
    adapter: bool  # the artifact is a PEFT adapter on an unchanged base
    summary: str
    not_yet: str | None = None  # why this version cannot run it, with what to use instead


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", 2e-5, False, "every weight trains; needs the most memory"),
        MethodSpec("freeze", 5e-5, False, "only the last layers train"),
        MethodSpec("lora", 2e-4, True, "low-rank adapters on a frozen base"),
        MethodSpec("dora", 2e-4, True, "LoRA with a learned magnitude per weight column"),
        MethodSpec("qlora", 2e-4, True, "LoRA on a 4-bit NF4 base (double quantization)"),
        MethodSpec("lora-8bit", 2e-4, True, "LoRA on an 8-bit base"),
        MethodSpec("lomo", 1e-3, False, "every weight, updated inside the backward pass: no optimizer state"),
        MethodSpec("adalomo", 5e-4, False, "LOMO with adaptive per-parameter rates (needs a CUDA GPU)"),
    )
}
METHOD_NAMES = tuple(METHODS)


def default_learning_rate(method: str) -> float:
    """A learning rate practitioners start from for this method."""
    return METHODS[method].learning_rate
