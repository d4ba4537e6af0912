"""propose_config: a right-sized TrainConfig for a model, a dataset and a machine, with reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field

from lmtuner_core.config import DatasetSpec, Method, Stage, TrainConfig, dataset_spec, parse_train_config
from lmtuner_core.data.analysis import analyze_dataset as analyze
from lmtuner_core.data.datasets import load_examples
from lmtuner_core.data.prompt_rows import reference_chars
from lmtuner_core.errors import LmtunerError
from lmtuner_core.graders.specs import GraderList
from lmtuner_core.jobs.ray_launcher import cluster_report, plan_workers
from lmtuner_core.jobs.service import checked_dataset
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.planning.hardware import inspect_hardware
from lmtuner_core.planning.hyperparameters import answer_profile
from lmtuner_core.planning.memory import load_shape
from lmtuner_core.planning.planner import HardwareSpec, Proposal, propose
from lmtuner_core.planning.throughput import estimate_time
from lmtuner_core.report.result import read_report
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext


def this_machine(ctx: ToolContext) -> HardwareSpec:
    report = inspect_hardware(ctx.home)
    return HardwareSpec(
        gpus=report.gpus, memory_total_mib=report.memory_total_mib, memory_available_mib=report.memory_available_mib
    )


# What a report's advice may change: how the model trains, never what fits the machine (planned afresh).
RECIPE_FIELDS = ("learning_rate", "num_epochs", "max_steps", "lora", "lr_scheduler", "warmup_ratio",
                 "assistant_only_loss", "replay")  # fmt: skip


def follow_report(ctx: ToolContext, plan: Proposal, job_id: str) -> None:
    """Plans the next run from a completed job: its recipe, changed as its result report advises."""
    record = ctx.jobs.get(job_id)
    report = read_report(Path(record.run_dir)) if record.status == "completed" else None
    if report is None:
        raise LmtunerError(
            f"previous_job: job {job_id} is {record.status} and has no result report; give a completed job whose "
            "config kept held-out rows and the report on (job_status shows `report`)",
            field="previous_job",
        )
    previous = json.loads(Path(record.run_dir, "config.json").read_text(encoding="utf-8"))
    recipe = {key: previous[key] for key in RECIPE_FIELDS if key in previous}
    changed = {**recipe, **report.next_config}
    plan.config = TrainConfig.model_validate({**plan.config.model_dump(), **changed})
    scores = f"{report.metric} {report.base} -> {report.tuned}"
    if report.retention:
        scores += f", kept {report.retention.kept} of {report.retention.known} probe facts"
    moves = ", ".join(f"{key} {recipe.get(key)} -> {value}" for key, value in report.next_config.items())
    plan.rationale.append(
        f"From job {job_id}'s report ({report.verdict}: {scores}): "
        + (f"changed {moves}. " if moves else "nothing to change, so its recipe is kept. ")
        + " ".join(report.advice)
    )


def propose_config(
    ctx: ToolContext,
    model: Annotated[
        str,
        Field(
            description="Local model folder or hub id (its config.json must be local or "
            "cached). Example: 'Qwen/Qwen2.5-7B-Instruct'."
        ),
    ],
    dataset: Annotated[
        str | DatasetSpec, Field(description="The training data, as in TrainConfig. Example: 'data/train.jsonl'.")
    ],
    eval_dataset: Annotated[
        str | DatasetSpec | None,
        Field(
            description="Your own held-out rows (never trained on), as in TrainConfig: the plan keeps them for the "
            "held-out loss, the best checkpoint and the result report. Default: a share of `dataset` is held out. "
            "Example: 'data/test.jsonl'.",
        ),
    ] = None,
    hardware: Annotated[
        HardwareSpec | None,
        Field(
            description="Plan for another machine: inspect_gpus output or {'gpus': [{index, name, "
            "memory_total_mib, memory_free_mib, compute_capability, bf16_supported}]}. Default: this one."
        ),
    ] = None,
    method: Annotated[Method | None, Field(description="Force a method; default: the best that fits.")] = None,
    stage: Annotated[
        Stage | None,
        Field(
            description="Force a training stage (sft, dpo, orpo, simpo, kto, reward, grpo); default: the usual one "
            "for the data's shape (preference pairs: dpo; KTO rows: kto; demonstrations: sft). Example: 'orpo'."
        ),
    ] = None,
    graders: Annotated[
        GraderList | None,
        Field(
            description="Stage grpo (prompts-only rows): the graders that score its sampled answers, as TrainConfig "
            "`graders`; the plan carries them. Example: [{'type': 'string_check', 'reference': 'answer', "
            "'operation': 'eq'}].",
        ),
    ] = None,
    max_seq_len: Annotated[int | None, Field(ge=16, le=1_048_576, description="Force the row length cut.")] = None,
    target_context: Annotated[
        int | None, Field(ge=16, le=4_194_304, description="Context (tokens) the tuned model must handle.")
    ] = None,
    goal: Annotated[str | None, Field(max_length=4000, description="What the user wants, in their words.")] = None,
    ray_address: Annotated[
        str | None,
        Field(
            max_length=300,
            description="Plan for a Ray cluster (see inspect_gpus ray_address): the config gets a `ray` section "
            "using its GPUs (one worker each) or nodes; memory is planned per worker, on one GPU of `hardware` "
            "(one node's inspect_gpus output). Example: 'http://10.0.0.5:8265'.",
        ),
    ] = None,
    slurm_partition: Annotated[
        str | None,
        Field(
            max_length=64,
            description="Plan for a partition of the Slurm cluster this server runs on ('default' = its default "
            "partition; see inspect_gpus slurm): the config gets a `slurm` section using the partition's GPU nodes "
            "(one task per GPU) or its nodes (one task each); memory is planned per task, on one GPU of `hardware` "
            "(one node's inspect_gpus output). Example: 'gpu'.",
        ),
    ] = None,
    previous_job: Annotated[
        str | None,
        Field(
            max_length=64,
            description="A completed job whose result report should shape this plan: its recipe (learning rate, "
            "epochs, LoRA shape) with the changes its report advises (the report's next_config). Example: "
            "'20261205-121335-c7e0'.",
        ),
    ] = None,
    progress: ProgressFn | None = None,
) -> Proposal:
    """Propose a TrainConfig that fits the hardware: method (LoRA, QLoRA when LoRA does not fit, full when
    asked), precision, batch size and accumulation, gradient checkpointing, ZeRO across GPUs, max_seq_len from
    the data's token lengths (about the 95th percentile), and RoPE scaling when target_context exceeds the
    model's context. Returns the config (ready for start_training), the memory breakdown per device, fits,
    plain-language rationale, alternatives with their memory, and warnings. Not fitting is an answer (fits:
    false and the smallest change that would fit). Explain the rationale to the user before starting."""
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=None)  # reads config.json and the tokenizer
    shape = load_shape(model_ref)
    spec = dataset_spec(dataset)
    # Exact token counts need the tokenizer; a folder with only config.json (or a hub id) gets an estimate.
    local_model = any((Path(model_ref) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    analysis = analyze(spec, ctx.roots, model_ref if local_model else None, progress)
    cluster = None
    if ray_address is not None and slurm_partition is not None:
        raise LmtunerError(
            "slurm_partition: plan for one cluster; ray_address and slurm_partition are both given — keep one",
            field="slurm_partition",
        )
    if slurm_partition is not None:
        from lmtuner_core.planning.slurm_cluster import plan_slurm, read_cluster

        cluster = plan_slurm(read_cluster(field="slurm_partition"), slurm_partition)
        hardware = hardware or this_machine(ctx)  # each Slurm task is one process on one device: plan one
        hardware = hardware.model_copy(update={"gpus": hardware.gpus[:1]})
    if ray_address is not None:
        cluster = plan_workers(cluster_report(ray_address, ctx.ray_addresses, field="ray_address"))
        # Each Ray worker is one process on one device: plan the memory of one.
        hardware = hardware or this_machine(ctx)
        hardware = hardware.model_copy(update={"gpus": hardware.gpus[:1]})
    hardware = hardware or this_machine(ctx)
    profile, answer_chars = None, None
    if analysis.format == "prompts":
        answer_chars = reference_chars(spec, ctx.roots, graders)
    elif analysis.format != "text":
        profile = answer_profile(load_examples(spec, ctx.roots).examples)
    plan = propose(
        model=model_ref, shape=shape, dataset=spec, hardware=hardware, rows=analysis.rows,
        p95_tokens=analysis.token_lengths.p95, method=method, max_seq_len=max_seq_len, target_context=target_context,
        goal=goal, profile=profile, data_format=analysis.format, stage=stage,
        graders=[g.model_dump() for g in graders] if graders else None,
        answer_chars=answer_chars,
    )  # fmt: skip
    if eval_dataset is not None:
        # TrainConfig's own checks first (grpo measures nothing on held-out rows), then the rows, refused by name
        given = {**plan.config.model_dump(), "eval_dataset": dataset_spec(eval_dataset).model_dump()}
        parse_train_config(given)
        held_out = checked_dataset(dataset_spec(eval_dataset), ctx.roots, "eval_dataset")[0]
        plan.config = TrainConfig.model_validate({**given, "eval_dataset": held_out.model_dump()})
    if previous_job is not None:
        follow_report(ctx, plan, previous_job)
    if not local_model:
        plan.warnings.append(f"Token lengths are estimated ({analysis.tokenizer}): the model's tokenizer is not local.")
    plan.warnings += [f"Data: {p}" for p in analysis.problems]
    if cluster is None:
        counted = "tokens counted with the model's tokenizer" if local_model else "token counts estimated"
        plan.estimate = estimate_time(
            shape, plan.config, rows=analysis.rows, mean_tokens=analysis.token_lengths.mean,
            gpu_names=[g.name for g in hardware.gpus], tokens_basis=counted,
        )  # fmt: skip
    if cluster is not None and slurm_partition is not None:
        slurm, why = cluster
        plan.config = TrainConfig.model_validate({**plan.config.model_dump(), "slurm": slurm.model_dump()})  # type: ignore[union-attr]
        plan.rationale.append(why)
        if slurm.gpus_per_node and not hardware.gpus:  # type: ignore[union-attr]
            plan.warnings.append(
                "The memory plan is for a CPU task: Slurm does not report GPU memory, so give `hardware` (one "
                "node's inspect_gpus output) to plan a GPU task."
            )
        plan.warnings.append(
            "Every Slurm node must see the model, the data, output_dir and $LMTUNER_HOME at the same paths "
            "(docs/CLUSTER.md)."
        )
    elif cluster is not None:
        settings, why = cluster
        plan.config = TrainConfig.model_validate({**plan.config.model_dump(), "ray": settings.model_dump()})
        plan.rationale.append(why)
        if settings.use_gpu and not hardware.gpus:  # type: ignore[union-attr]
            plan.warnings.append(
                "The memory plan is for a CPU worker: Ray does not report GPU memory, so give `hardware` (one "
                "node's inspect_gpus output) to plan a GPU worker."
            )
        plan.warnings.append(
            "Every Ray node must see the model, the data, output_dir and $LMTUNER_HOME at the same paths "
            "(docs/CLUSTER.md)."
        )
    return plan
