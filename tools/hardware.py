"""inspect_gpus: what this machine can train with."""

from __future__ import annotations

from lmtuner_core.hardware import HardwareReport, inspect_hardware
from tools.context import ToolContext


def inspect_gpus(ctx: ToolContext) -> HardwareReport:
    """List this machine's GPUs (name, total/free memory, compute capability, bf16), CPU, RAM, free disk and the
    versions of the training libraries. Call it first: the answer decides which models and methods fit.
    No GPU is not an error — `gpus` is then empty and training runs on the CPU (fine for tiny models only)."""
    return inspect_hardware(ctx.home)
