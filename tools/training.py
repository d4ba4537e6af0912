"""start_training, job_status, list_jobs, cancel_job: start a job in a child process and watch it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.jobs.plots import loss_curve_png
from lmtuner_core.jobs.progress import JobProgress
from lmtuner_core.jobs.store import TERMINAL, JobStatus
from lmtuner_core.planning.throughput import JobCost, estimate_job
from lmtuner_core.run import RunDir, write_json_atomic
from tools.context import ToolContext

JobId = Annotated[str, Field(description="The id start_training returned. Example: '20261128-215012-a3f9'.")]


class SpendingPreview(JobCost):
    """What a job would spend, shown before it starts when it runs long or holds many devices."""

    reasons: list[str] = Field(description="Why the user is asked: the owner's thresholds this job passes.")


class StartTrainingResult(BaseModel):
    job_id: str | None = Field(description="Id to pass to job_status / cancel_job. None when nothing started.")
    status: str = Field(
        description="'running' (child started), 'queued', 'failed' (could not start), 'dry_run', "
        "'needs_confirmation' (nothing started: show `preview` to the user and call again with confirmed: true if "
        "they agree) or 'declined' (the user said no when asked; nothing started)."
    )
    run_dir: str | None = Field(description="The job's folder: config.json, train.log, metrics.jsonl, checkpoints/.")
    output_dir: str = Field(description="Where the final adapter or model will be written.")
    config: TrainConfig = Field(description="The config as the job runs it: defaults filled, paths absolute.")
    warnings: list[str] = Field(default_factory=list, description="Things to tell the user before they wait.")
    preview: SpendingPreview | None = Field(
        None,
        description="With 'needs_confirmation' or 'declined': devices, memory per device, estimated wall time and "
        "what the job would write.",
    )


class JobList(BaseModel):
    jobs: list[JobProgress] = Field(description="Jobs, newest first, each as job_status reports it (no log tail).")


class CancelResult(BaseModel):
    job_id: str = Field(description="The job's id.")
    status: str = Field(description="The job's status after cancelling: normally 'cancelled'.")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoints to resume from.")


def start_training(
    ctx: ToolContext,
    config: Annotated[TrainConfig, Field(description="The job. Only model and dataset are required.")],
    dry_run: Annotated[
        bool,
        Field(
            description="Check everything and return the resolved config; start nothing. Refused exactly when the "
            "real start would be (e.g. a job that does not fit its devices, unless force)."
        ),
    ] = False,
    force: Annotated[
        bool, Field(description="Start even if the memory estimate says the job does not fit its devices.")
    ] = False,
    confirmed: Annotated[
        bool,
        Field(
            description="The user has seen the job's cost and agreed. A job over the owner's limits (long, or many "
            "devices) answers 'needs_confirmation' with a `preview` when the client cannot ask the user itself; "
            "show the preview, and only after the user agrees call again with confirmed: true. Example: true."
        ),
    ] = False,
) -> StartTrainingResult:
    """Start a fine-tuning job and return its job_id at once; training runs in a separate process.

    Before anything starts, the model folder, the allowed folders and EVERY row of the dataset are checked, so
    a mistake comes back now, naming the field, rather than as a failed job later. Confirm the config with the
    user first (it spends their GPU time). `dry_run: true` checks and returns the resolved config without
    starting. A job that would run long or hold many devices asks the user first (elicitation), or, where the
    client cannot ask, answers 'needs_confirmation' with a preview of its cost: call again with confirmed: true
    once the user agrees. Then poll job_status. Example config:
    {"model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "data/train.jsonl", "method": "lora", "num_epochs": 3}"""
    held: list[SpendingPreview] = []
    costs: list[JobCost] = []

    def gate(checked: TrainConfig, devices: str) -> bool:
        cost = estimate_job(checked, ctx.roots, devices, output_dir=config.output_dir)
        costs.append(cost)
        preview = spending_preview(ctx, cost)
        if preview is not None and not confirmed:
            held.append(preview)
            return False
        return True

    record, checked, warnings = ctx.jobs.submit(config, dry_run=dry_run, force=force, gate=gate)
    if record is None:
        status = "needs_confirmation" if held else "dry_run"
        return StartTrainingResult(
            job_id=None, status=status, run_dir=None, output_dir=checked.output_dir or "", config=checked,
            warnings=warnings, preview=held[0] if held else None,
        )  # fmt: skip
    if costs:
        write_json_atomic(RunDir(Path(record.run_dir)).estimate, costs[0].model_dump(mode="json"))
    return StartTrainingResult(
        job_id=record.job_id, status=record.status, run_dir=record.run_dir, output_dir=record.output_dir,
        config=checked, warnings=warnings,
    )  # fmt: skip


def spending_preview(ctx: ToolContext, cost: JobCost) -> SpendingPreview | None:
    """The preview to show the user when `cost` passes one of the owner's thresholds; None when it passes none."""
    reasons = []
    minutes = ctx.confirm_over_minutes
    wall = cost.estimate.wall_seconds if cost.estimate is not None else None
    if minutes is not None and wall is not None and wall > minutes * 60:
        reasons.append(f"is estimated at {wall / 60:.1f} minutes, over this server's limit of {minutes:g}")
    if minutes is not None and wall is None and minutes == 0:
        reasons.append("could not be timed, and this server confirms every job")
    devices = ctx.confirm_over_devices
    if devices is not None and cost.device_count > devices:
        reasons.append(f"would hold {cost.device_count} devices, over this server's limit of {devices}")
    return SpendingPreview(**cost.model_dump(), reasons=reasons) if reasons else None


def job_preview(
    ctx: ToolContext, config: TrainConfig, force: bool
) -> tuple[TrainConfig, list[str], SpendingPreview | None]:
    """The checked config, its warnings and the preview start_training would show (None: it starts without asking).
    Checks the config as a dry run does, so a bad config is refused here, naming its field."""
    previews: list[SpendingPreview | None] = []

    def gate(checked: TrainConfig, devices: str) -> bool:
        previews.append(spending_preview(ctx, estimate_job(checked, ctx.roots, devices, output_dir=config.output_dir)))
        return False

    _, checked, warnings = ctx.jobs.submit(config, force=force, gate=gate)
    return checked, warnings, previews[0] if previews else None


def declined(ctx: ToolContext, config: TrainConfig, force: bool) -> StartTrainingResult:
    """start_training's answer when the user said no (or dismissed the question): nothing started."""
    checked, warnings, preview = job_preview(ctx, config, force)
    return StartTrainingResult(
        job_id=None, status="declined", run_dir=None, output_dir=checked.output_dir or "", config=checked,
        warnings=warnings, preview=preview,
    )  # fmt: skip


def confirmation_message(preview: SpendingPreview) -> str:
    """The question put to the user, from the preview (the same words on every round of the 2026 protocol)."""
    lines = ["Start this fine-tuning job? It " + "; it ".join(preview.reasons) + "."]
    where = "the CPU" if preview.devices == "cpu" else f"devices {preview.devices} ({preview.device_count})"
    lines.append(f"Runs on {where}.")
    if preview.memory_per_device_gib is not None:
        lines.append(f"Memory: about {preview.memory_per_device_gib:.1f} GiB per device.")
    if preview.estimate is not None:
        e = preview.estimate
        lines.append(
            f"Estimated wall time: {e.wall_seconds / 60:.1f} minutes at about {e.tokens_per_second:.0f} tokens/s "
            f"({e.basis})."
        )
    lines.append("Writes: " + "; ".join(preview.writes) + ".")
    return "\n".join(lines)


def resume_job(ctx: ToolContext, job_id: JobId) -> StartTrainingResult:
    """Continue a failed or cancelled job from its newest checkpoint: the step count, optimizer and learning-rate
    schedule pick up where they stopped, in the same run folder and under the same job_id. Returns at once, like
    start_training; follow it with job_status."""
    record, config = ctx.jobs.resume(job_id)
    return StartTrainingResult(
        job_id=record.job_id, status=record.status, run_dir=record.run_dir, output_dir=record.output_dir,
        config=config, warnings=[f"continuing from {config.resume_from}"],
    )  # fmt: skip


def job_status(
    ctx: ToolContext,
    job_id: JobId,
    wait_seconds: Annotated[
        float,
        Field(
            ge=0,
            le=300,
            description="Wait up to this long for the job to change (new step, new status) before answering; "
            "saves polling. Example: 30.",
        ),
    ] = 0,
    log_lines: Annotated[int, Field(ge=0, le=500, description="How many lines of train.log to include.")] = 20,
    include_plot: Annotated[
        bool, Field(description="Also return the loss curve as a PNG image (show it to the user).")
    ] = False,
) -> JobProgress:
    """Report a job: status, step/total_steps, loss, learning rate, tokens/s, elapsed and ETA, eval loss,
    checkpoints, output folder, the error with its fix if it failed, and the tail of its log."""
    record = ctx.jobs.get(job_id)
    progress = ctx.jobs.progress(record, log_lines=None)
    deadline = time.monotonic() + wait_seconds
    while record.status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.25)
        record = ctx.jobs.get(job_id)
        now = ctx.jobs.progress(record, log_lines=None)
        if (now.status, now.step, now.phase, now.loss) != (
            progress.status,
            progress.step,
            progress.phase,
            progress.loss,
        ):
            break
    progress = ctx.jobs.progress(record, log_lines=log_lines)
    if include_plot:
        progress._plot_png = loss_curve_png(RunDir(Path(record.run_dir)), f"{record.job_id} ({record.method})")
    return progress


def list_jobs(
    ctx: ToolContext,
    status: Annotated[JobStatus | None, Field(description="Only jobs with this status. Example: 'running'.")] = None,
) -> JobList:
    """List jobs, newest first, with their progress. Use it to find a job_id or to see whether the GPU is busy
    before starting another job. A completed job's result report is in job_status."""
    return JobList(jobs=[ctx.jobs.progress(r, log_lines=None, with_report=False) for r in ctx.jobs.list(status)])


def cancel_job(
    ctx: ToolContext,
    job_id: JobId,
    grace_seconds: Annotated[
        float, Field(ge=0, le=600, description="How long the job may take to save a checkpoint before it is killed.")
    ] = 20,
) -> CancelResult:
    """Stop a queued or running job. It saves a checkpoint first (resumable), then exits; if it has not
    exited after grace_seconds it is killed. Finished jobs are left as they are."""
    record = ctx.jobs.cancel(job_id, grace_seconds=grace_seconds)
    progress = ctx.jobs.progress(record, log_lines=None)
    return CancelResult(job_id=record.job_id, status=record.status, checkpoints=progress.checkpoints)
