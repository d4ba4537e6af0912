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
from lmtuner_core.run import RunDir
from tools.context import ToolContext

JobId = Annotated[str, Field(description="The id start_training returned. Example: '20261128-215012-a3f9'.")]


class StartTrainingResult(BaseModel):
    job_id: str | None = Field(description="Id to pass to job_status / cancel_job. None for a dry run.")
    status: str = Field(description="'running' (child started), 'failed' (could not start), or 'dry_run'.")
    run_dir: str | None = Field(description="The job's folder: config.json, train.log, metrics.jsonl, checkpoints/.")
    output_dir: str = Field(description="Where the final adapter or model will be written.")
    config: TrainConfig = Field(description="The config as the job runs it: defaults filled, paths absolute.")
    warnings: list[str] = Field(default_factory=list, description="Things to tell the user before they wait.")


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
) -> StartTrainingResult:
    """Start a fine-tuning job and return its job_id at once; training runs in a separate process.

    Before anything starts, the model folder, the allowed folders and EVERY row of the dataset are checked, so
    a mistake comes back now, naming the field, rather than as a failed job later. Confirm the config with the
    user first (it spends their GPU time). `dry_run: true` checks and returns the resolved config without
    starting. Then poll job_status. Example config:
    {"model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "data/train.jsonl", "method": "lora", "num_epochs": 3}"""
    record, checked, warnings = ctx.jobs.submit(config, dry_run=dry_run, force=force)
    if record is None:
        return StartTrainingResult(
            job_id=None, status="dry_run", run_dir=None, output_dir=checked.output_dir or "", config=checked,
            warnings=warnings,
        )  # fmt: skip
    return StartTrainingResult(
        job_id=record.job_id, status=record.status, run_dir=record.run_dir, output_dir=record.output_dir,
        config=checked, warnings=warnings,
    )  # fmt: skip


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
