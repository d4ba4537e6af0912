"""inspect_gpus: what this machine, or a Ray or Slurm cluster, can train with."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lmtuner_core.jobs.ray_launcher import cluster_report
from lmtuner_core.planning.hardware import HardwareReport, inspect_hardware
from tools.context import ToolContext


def inspect_gpus(
    ctx: ToolContext,
    ray_address: Annotated[
        str | None,
        Field(
            description="Also report a Ray cluster's nodes and resources (for a TrainConfig `ray` section): its "
            "dashboard 'http://head:8265', 'ray://head:10001' or 'auto'; a cluster other than 'auto' must be one the "
            "server's owner listed (lmtuner-mcp --ray-address). Example: 'http://10.0.0.5:8265'.",
            max_length=300,
        ),
    ] = None,
    slurm: Annotated[
        bool,
        Field(
            description="Also report the Slurm cluster this server runs on (for a TrainConfig `slurm` section): its "
            "partitions (default, time limits, nodes) and nodes with their CPUs, memory and GPUs. Example: true."
        ),
    ] = False,
) -> HardwareReport:
    """List this machine's GPUs (name, total/free memory, compute capability, bf16), CPU, RAM, free disk and the
    versions of the training libraries. Call it first: the answer decides which models and methods fit.
    No GPU is not an error — `gpus` is then empty and training runs on the CPU (fine for tiny models only).
    With ray_address, `cluster` lists a Ray cluster's nodes and their CPUs, GPUs and memory; with slurm, `slurm`
    lists the Slurm cluster's partitions and nodes."""
    report = inspect_hardware(ctx.home)
    if ray_address is not None:
        report.cluster = cluster_report(ray_address, ctx.ray_addresses, field="ray_address")
    if slurm:
        from lmtuner_core.planning.slurm_cluster import read_cluster

        report.slurm = read_cluster(field="slurm")
    return report
