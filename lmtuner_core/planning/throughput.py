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

# --- CPU, fitted with bench/estimate_accuracy.py on the project's 2-core machine with nothing else running (fp32,
# LoRA, padding-free; four jobs from a 0.6M-parameter model to SmolLM2-135M, each within 5% of its wall time). A
# machine shared with other work runs slower: job_status's estimate_error shows by how much.
# Effective training FLOP/s per core on the model's matrix work (forward and backward).
CPU_TRAIN_GFLOPS_PER_CORE = 50.0
# Fixed work per micro-batch beyond the matmuls (Python, the Trainer, the optimizer over the adapter): tiny models.
CPU_MICRO_BATCH_S = 0.02
# Batched greedy generation (the report's answers, replay rows): forward FLOP/s per core, and the fixed cost of one
# decoding step of a batch (the generate loop, sampling, the cache).
CPU_GENERATE_GFLOPS_PER_CORE = 80.0
CPU_DECODE_STEP_S, CPU_DECODE_LAYER_S = 0.005, 0.003
# Start of the training process: interpreter, torch/transformers/TRL imports, tokenizing, the final save.
CPU_START_S = 4.0
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
GPU_DECODE_STEP_S = 0.03  # one decoding step of a batch: kernel launches dominate for small models
QUANTIZED_BASE_SLOWDOWN = 1.3  # 4-/8-bit bases dequantize each matmul's weights on the fly

# How the result report and replay generate (lmtuner_core/report/runner.py, training/recipe.py): batches and lengths.
PROBE_QUESTIONS, PROBE_BATCH, PROBE_NEW_TOKENS = 256, 32, 16  # lmtuner_core/report/probe.jsonl, asked of both models
PROBE_ANSWER_TOKENS = 12  # a batch stops when its longest answer ends: a sentence, not the limit
HELD_OUT_BATCH, REPLAY_BATCH = 16, 16
EVALUATIONS_PER_RUN = 8  # held-out loss evaluations in a run (recipe.py), plus one before training


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


def training_rows(config: TrainConfig, rows: int) -> tuple[int, int, int]:
    """(rows trained per epoch including replay rows, rows held out, replay rows) for a dataset of `rows` rows."""
    fraction = config.dataset.eval_fraction if config.eval_dataset is None else 0.0
    held_out = held_out_count(rows, fraction)
    train = rows - held_out
    replay = 0
    if config.replay is not None:  # recipe.py: share of the training rows, added to them
        replay = round(config.replay.share * train / (1 - config.replay.share))
    return max(train + replay, 1), held_out, replay


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
    train_rows, held, replay_rows = training_rows(config, rows)
    if held_out_rows is not None:
        held = held_out_rows
    per_step_rows = config.batch_size * config.gradient_accumulation_steps * max(1, len(gpu_names))
    sampled = config.stage == "grpo"  # rows are prompts: each gives num_generations sampled answers to train on
    if sampled:
        held, train_rows = 0, train_rows * config.grpo.num_generations
        seq = seq + config.grpo.max_completion_length
    if config.max_steps:
        steps = config.max_steps
        tokens = steps * per_step_rows * seq
    else:
        epochs = config.num_epochs or 1.0
        steps = math.ceil(math.ceil(train_rows / per_step_rows) * epochs)
        tokens = train_rows * epochs * seq
    fpt = flops_per_token(shape, config, seq)
    quantized = METHODS[config.method].memory.base_quant
    n = compute_params(shape)
    weights_gb = shape.param_count * 4 / 1e9
    if gpu_names:
        peak, matched = _gpu_peak(gpu_names[0])
        flops = peak * 1e12 * GPU_MFU * len(gpu_names) / (QUANTIZED_BASE_SLOWDOWN if quantized else 1.0)
        gen_flops = flops * 0.3 / len(gpu_names)  # generation is memory-bound: a fraction of the training rate
        start = GPU_START_S + GPU_LOAD_S_PER_GB * weights_gb / 2
        micro_overhead, decode_step = 0.02, GPU_DECODE_STEP_S
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
        micro_overhead = CPU_MICRO_BATCH_S
        decode_step = CPU_DECODE_STEP_S + CPU_DECODE_LAYER_S * shape.num_layers
        basis = (
            f"CPU, {cores} cores: fitted on measured CPU jobs on this project's 2-core machine with nothing else "
            f"running (bench/estimate_accuracy.py: {CPU_TRAIN_GFLOPS_PER_CORE:.0f} GFLOP/s per core training, "
            f"{CPU_GENERATE_GFLOPS_PER_CORE:.0f} generating); other work on the cores slows it; no base answers cached"
        )
    micro_batches = steps * config.gradient_accumulation_steps
    train_seconds = tokens * fpt / flops + micro_batches * micro_overhead
    if held:  # the held-out loss, evaluated before training and EVALUATIONS_PER_RUN times during it
        train_seconds += (EVALUATIONS_PER_RUN + 1) * held * seq * 2.0 * n / flops

    def generating(items: int, batch: int, new_tokens: float) -> float:
        """Seconds to answer `items` prompts greedily in batches that run to `new_tokens` tokens."""
        if items <= 0:
            return 0.0
        batches = math.ceil(items / batch)
        return batches * new_tokens * (decode_step + 2.0 * n * min(batch, items) / gen_flops)

    generate_seconds = 0.0
    if config.report.enabled and held:  # the result report: base before training, tuned after
        answers = min(held, config.report.max_rows)
        # A batch runs until its longest answer ends, within room for the longest reference (runner._new_tokens):
        # about the answer's length, taken as half the row (the rest is the question and the template).
        new_tokens = min(384.0, max(16.0, 1.25 * seq / 2 + 8))
        per_model = generating(answers, HELD_OUT_BATCH, new_tokens)
        if config.report.retention:
            per_model += generating(PROBE_QUESTIONS, PROBE_BATCH, min(PROBE_NEW_TOKENS, PROBE_ANSWER_TOKENS))
        generate_seconds += 2 * per_model
    if config.replay is not None:  # the base model's own answers, mixed into the training rows
        generate_seconds += generating(replay_rows, REPLAY_BATCH, config.replay.max_new_tokens)
    if sampled:  # each micro-batch's answers are sampled before it trains, to max_completion_length at worst
        generate_seconds += micro_batches * generating(config.batch_size, config.batch_size,
                                                       config.grpo.max_completion_length)  # fmt: skip
        basis += "; grpo's sampling modelled as greedy decoding to max_completion_length (not yet measured)"
    wall = start + train_seconds + generate_seconds
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

    devices: str = Field(
        description="What the job holds: 'cpu', GPU indices such as '0,1', 'ray' or 'slurm'. Example: '0,1'."
    )
    device_count: int = Field(description="GPUs (or GPU Ray workers) the job holds; 0 for a CPU job. Example: 2.")
    memory_per_device_gib: float | None = Field(
        None, description="Estimated training memory per device (per GPU, or RAM on the CPU), GiB. Example: 21.5."
    )
    estimate: TimeEstimate | None = Field(None, description="Expected wall time and tokens/s (as propose_config).")
    writes: list[str] = Field(description="What the job will write, and where.")


def estimate_job(
    config: TrainConfig, roots, devices: str, gpu_names: list[str] | None = None, output_dir: str | None = None
) -> JobCost:
    """The cost of a checked config on `devices` ('cpu', '0,1', 'ray', 'slurm'): memory per device and time. Token
    counts are estimated from characters (no tokenizer is loaded in the server); a model without a local config.json
    gets no memory or time figure. `output_dir`: as the caller gave it (the checked one names the new job's id, which
    would change the question on every round of a confirmation)."""
    from lmtuner_core.data.analysis import analyze_dataset
    from lmtuner_core.errors import LmtunerError
    from lmtuner_core.planning.memory import load_shape
    from lmtuner_core.planning.planner import HardwareSpec, check_fits

    cluster = devices in ("ray", "slurm")  # a cluster backend's placement, not local device indices
    if devices == "ray":  # GPU workers are devices; CPU workers are the cluster's cores, as a local CPU job
        count = config.ray.num_workers if config.ray is not None and config.ray.use_gpu else 0
    elif devices == "slurm":  # one task per GPU on each node, or one per CPU node
        count = config.slurm.nodes * config.slurm.gpus_per_node if config.slurm is not None else 0
    else:
        count = 0 if devices == "cpu" else len(devices.split(","))
    names = list(gpu_names or [])
    if count and not cluster and not names:
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
    if devices == "cpu" or cluster:
        import psutil

        hardware = HardwareSpec(memory_total_mib=psutil.virtual_memory().total // 2**20)
    else:
        from lmtuner_core.planning.hardware import list_gpus

        hardware = HardwareSpec(gpus=[g for g in list_gpus() if g.name in names][: count or 1])
    memory = check_fits(shape, config, hardware)[1].per_gpu_gib
    try:
        analysis = analyze_dataset(config.dataset, roots, None)
    except LmtunerError:  # rows analyze_dataset does not read (GRPO's prompts): memory known, time not estimated
        return JobCost(devices=devices, device_count=count, memory_per_device_gib=round(memory, 2), writes=writes)
    estimate = estimate_time(
        shape, config, rows=analysis.rows, mean_tokens=analysis.token_lengths.mean, gpu_names=names,
        held_out_rows=config.report.max_rows if config.eval_dataset is not None else None,
        tokens_basis="token counts estimated from characters",
    )  # fmt: skip
    return JobCost(
        devices=devices, device_count=count, memory_per_device_gib=round(memory, 2), estimate=estimate, writes=writes
    )
