"""How long a job will take: a throughput model in FLOPs, calibrated on this kind of machine's measured CPU runs and,
for GPUs, on published peak figures times a typical fine-tuning utilisation. Written by hand: no library estimates
fine-tuning wall time from a config (the field's tools report throughput after the fact)."""

from __future__ import annotations

import math
import os

from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.data.datasets import held_out_count
from lmtuner_core.methods import METHODS
from lmtuner_core.planning.memory import ModelShape

# --- CPU, measured with bench/estimate_accuracy.py on the project's 2-core machines (fp32, LoRA, padding-free).
# Effective training FLOP/s per core on the model's matrix work (SmolLM2-135M LoRA: ~55 real tokens/s on 2 cores).
CPU_TRAIN_GFLOPS_PER_CORE = 14.0
# Fixed work per optimizer step beyond the matmuls (Python, the optimizer over the adapter, logging): tiny models.
CPU_STEP_OVERHEAD_S = 0.03
# Batched greedy generation (the report's answers, replay rows): forward only, FLOP/s per core.
CPU_GENERATE_GFLOPS_PER_CORE = 6.0
# Start of the training process: interpreter, torch/transformers/TRL imports, tokenizing, the first save.
CPU_START_S = 14.0
# Loading weights from disk (fp32 safetensors), seconds per GB of parameters.
LOAD_S_PER_GB = 6.0

# --- GPUs without a measurement here: published dense bf16 peak TFLOP/s (vendor data sheets), times the model FLOP
# utilisation fine-tuning typically reaches (30-45% in published LoRA/full runs; 0.35 taken).
GPU_PEAK_TFLOPS = {  # matched against the device name, first hit wins
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
    "T4": 65.0,  # fp16
}
GPU_UNKNOWN_TFLOPS = 100.0
GPU_MFU = 0.35
GPU_START_S = 30.0
GPU_LOAD_S_PER_GB = 1.0
QUANTIZED_BASE_SLOWDOWN = 1.3  # 4-/8-bit bases dequantize each matmul's weights on the fly

PROBE_QUESTIONS = 256  # lmtuner_core/report/probe.jsonl: asked of the base and the tuned model when retention is on
PROBE_NEW_TOKENS = 16


class TimeEstimate(BaseModel):
    """The plan's expected duration, before anything runs."""

    wall_seconds: float = Field(description="Expected seconds from start to completed (load, train, report). E.g. 840.")
    tokens_per_second: float = Field(description="Expected real (non-padding) training tokens per second. E.g. 55.")
    basis: str = Field(
        description="Where the figures come from: calibrated on this machine's CPU runs, or a GPU's published peak "
        "FLOP/s times a typical utilisation (named)."
    )
    train_tokens: int = Field(description="Real tokens the job will train on (all epochs). Example: 24000.")
    train_seconds: float = Field(description="Of wall_seconds, the training steps. Example: 600.")


def compute_params(shape: ModelShape) -> int:
    """Parameters that cost a multiply per token: all but an untied input embedding (a lookup)."""
    return shape.param_count - (0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size)


def flops_per_token(shape: ModelShape, config: TrainConfig, seq_len: float) -> float:
    """Training FLOPs per token: forward 2N, backward through the activations 2N, and the weight gradients 2N only
    where every weight trains; attention's score work on top; a forward again under gradient checkpointing."""
    n = compute_params(shape)
    passes = 6.0 if METHODS[config.method].memory.trains == "all" else 4.0
    if config.gradient_checkpointing is True:
        passes += 2.0
    attention = 2.0 * shape.num_layers * seq_len * shape.num_heads * shape.head_dim * (passes / 2)
    return passes * n + attention


def _gpu_peak(name: str) -> tuple[float, str]:
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return tflops, key
    return GPU_UNKNOWN_TFLOPS, ""


def training_rows(config: TrainConfig, rows: int) -> tuple[int, int]:
    """(rows trained per epoch including replay rows, rows held out) for a dataset of `rows` rows."""
    fraction = config.dataset.eval_fraction if config.eval_dataset is None else 0.0
    held_out = held_out_count(rows, fraction)
    train = rows - held_out
    if config.replay is not None:
        train += round(train * config.replay.share / (1 - config.replay.share))
    return max(train, 1), held_out


def estimate_time(
    shape: ModelShape,
    config: TrainConfig,
    *,
    rows: int,
    mean_tokens: float,
    gpu_names: list[str],
    cpu_cores: int | None = None,
    held_out_rows: int | None = None,
    tokens_basis: str = "",
) -> TimeEstimate:
    """The wall time and training throughput of `config` over `rows` rows of `mean_tokens` tokens on the given GPUs
    (all of them train, data-parallel) or, with none, on `cpu_cores` cores."""
    seq = min(mean_tokens, config.max_seq_len or mean_tokens)
    train_rows, held = training_rows(config, rows)
    if held_out_rows is not None:
        held = held_out_rows
    per_step_rows = config.batch_size * config.gradient_accumulation_steps * max(1, len(gpu_names))
    if config.max_steps:
        steps = config.max_steps
        tokens = steps * per_step_rows * seq
    else:
        epochs = config.num_epochs or 1.0
        steps = math.ceil(math.ceil(train_rows / per_step_rows) * epochs)
        tokens = train_rows * epochs * seq
    fpt = flops_per_token(shape, config, seq)
    quantized = METHODS[config.method].memory.base_quant
    gen_flops_per_token = 2.0 * compute_params(shape)
    weights_gb = shape.param_count * 4 / 1e9
    if gpu_names:
        peak, matched = _gpu_peak(gpu_names[0])
        flops = peak * 1e12 * GPU_MFU * len(gpu_names) / (QUANTIZED_BASE_SLOWDOWN if quantized else 1.0)
        gen_flops = flops * 0.3 / len(gpu_names)  # generation is memory-bound: a fraction of the training rate
        start = GPU_START_S + GPU_LOAD_S_PER_GB * weights_gb / 2
        step_overhead = 0.05
        what = f"{gpu_names[0]}" if matched else f"unknown GPU {gpu_names[0]!r} (taken as {peak:.0f} TFLOP/s)"
        basis = (
            f"{len(gpu_names)}x {what}: published dense bf16 peak {peak:.0f} TFLOP/s x {GPU_MFU:.0%} utilisation "
            "(no measurement on this kind of GPU yet)"
        )
    else:
        cores = cpu_cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        flops = CPU_TRAIN_GFLOPS_PER_CORE * 1e9 * cores / (QUANTIZED_BASE_SLOWDOWN if quantized else 1.0)
        gen_flops = CPU_GENERATE_GFLOPS_PER_CORE * 1e9 * cores
        start = CPU_START_S + LOAD_S_PER_GB * weights_gb
        step_overhead = CPU_STEP_OVERHEAD_S
        basis = (
            f"CPU, {cores} cores: calibrated on measured CPU runs on this project's machines (bench/"
            f"estimate_accuracy.py; {CPU_TRAIN_GFLOPS_PER_CORE:.0f} GFLOP/s per core effective)"
        )
    train_seconds = tokens * fpt / flops + steps * step_overhead
    # The result report: held-out rows (and the probe) answered by the base and the tuned model; replay rows are
    # the base model's answers too.
    generated = 0.0
    if config.report.enabled and held:
        answers = min(held, config.report.max_rows)
        generated += 2 * answers * min(384, max(16, seq / 2))
        if config.report.retention:
            generated += 2 * PROBE_QUESTIONS * PROBE_NEW_TOKENS
    if config.replay is not None:
        generated += (train_rows - (rows - held)) * config.replay.max_new_tokens
    report_seconds = generated * gen_flops_per_token / gen_flops
    wall = start + train_seconds + report_seconds
    if tokens_basis:
        basis += f"; {tokens_basis}"
    return TimeEstimate(
        wall_seconds=round(wall, 1),
        tokens_per_second=round(tokens / train_seconds, 1) if train_seconds else 0.0,
        basis=basis,
        train_tokens=int(tokens),
        train_seconds=round(train_seconds, 1),
    )


class JobCost(BaseModel):
    """What starting a job spends: shown before a long or many-device job starts (start_training's confirmation)."""

    devices: str = Field(description="What the job holds: 'cpu', GPU indices such as '0,1', or 'ray'. Example: '0,1'.")
    device_count: int = Field(description="GPUs (or GPU Ray workers) the job holds; 0 for a CPU job. Example: 2.")
    memory_per_device_gib: float | None = Field(
        None, description="Estimated training memory per device (per GPU, or RAM on the CPU), GiB. Example: 21.5."
    )
    estimate: TimeEstimate | None = Field(None, description="Expected wall time and tokens/s (as propose_config).")
    writes: list[str] = Field(description="What the job will write, and where.")


def estimate_job(
    config: TrainConfig, roots, devices: str, gpu_names: list[str] | None = None, output_dir: str | None = None
) -> JobCost:
    """The cost of a checked config on `devices` ('cpu', '0,1', 'ray'): memory per device and time. Token counts are
    estimated from characters (no tokenizer is loaded in the server); a model without a local config.json gets
    no memory or time figure. `output_dir`: as the caller gave it (the checked one names the new job's id, which
    would change the question on every round of a confirmation)."""
    from lmtuner_core.data.analysis import analyze_dataset
    from lmtuner_core.errors import LmtunerError
    from lmtuner_core.planning.memory import load_shape
    from lmtuner_core.planning.planner import HardwareSpec, check_fits

    if devices == "ray":  # GPU workers are devices; CPU workers are the cluster's cores, as a local CPU job
        count = config.ray.num_workers if config.ray is not None and config.ray.use_gpu else 0
    else:
        count = 0 if devices == "cpu" else len(devices.split(","))
    names = list(gpu_names or [])
    if count and devices != "ray" and not names:
        from lmtuner_core.planning.hardware import list_gpus

        wanted = {int(i) for i in devices.split(",")}
        gpus = [g for g in list_gpus() if g.index in wanted]
        names = [g.name for g in gpus]
    output = output_dir or "runs/<job id>/final under $LMTUNER_HOME"
    writes = [
        f"the trained {'adapter' if METHODS[config.method].adapter else 'model'} in {output}",
        "a run folder under $LMTUNER_HOME/runs/ (config, log, metrics, checkpoints, result report, model card)",
    ]
    try:
        shape = load_shape(config.model)
    except LmtunerError:
        return JobCost(devices=devices, device_count=count, writes=writes)
    if devices in ("cpu", "ray"):
        import psutil

        hardware = HardwareSpec(memory_total_mib=psutil.virtual_memory().total // 2**20)
    else:
        from lmtuner_core.planning.hardware import list_gpus

        hardware = HardwareSpec(gpus=[g for g in list_gpus() if g.name in names][: count or 1])
    memory = check_fits(shape, config, hardware)[1].per_gpu_gib
    analysis = analyze_dataset(config.dataset, roots, None)
    estimate = estimate_time(
        shape, config, rows=analysis.rows, mean_tokens=analysis.token_lengths.mean, gpu_names=names,
        held_out_rows=config.report.max_rows if config.eval_dataset is not None else None,
        tokens_basis="token counts estimated from characters",
    )  # fmt: skip
    return JobCost(
        devices=devices, device_count=count, memory_per_device_gib=round(memory, 2), estimate=estimate, writes=writes
    )
