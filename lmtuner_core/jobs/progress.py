"""What a job is doing, read from its run folder: state.json, metrics.jsonl, train.log, exit.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr

from lmtuner_core.jobs.ray_launcher import RayJobView
from lmtuner_core.jobs.slurm_launcher import SlurmJobView
from lmtuner_core.jobs.store import JobRecord
from lmtuner_core.report.result import ResultReport, read_report
from lmtuner_core.run import RunDir, read_json
from lmtuner_core.secrets import redact
from lmtuner_core.system.files import tail_lines
from lmtuner_core.tuning.sweep import SweepBudget, SweepTrial, read_sweep


class JobProgress(BaseModel):
    """What a job is doing, as read from the job store and its run folder."""

    job_id: str = Field(description="The job's id. Example: '20261128-215012-a3f9'.")
    status: str = Field(description="queued | running | completed | failed | cancelled.")
    phase: str | None = Field(None, description="What a running job is doing: loading, tokenizing, training, saving.")
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Passes over the data so far (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    learning_rate: float | None = Field(None, description="Latest learning rate.")
    tokens_per_second: float | None = Field(None, description="Non-padding tokens trained per second, recently.")
    elapsed_seconds: float | None = Field(None, description="Seconds since the job started running.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to finish, from the step rate so far.")
    eval_loss: float | None = Field(None, description="Latest loss on the held-out rows, if any.")
    stage: str = Field("sft", description="The job's training stage: sft, dpo, orpo, simpo, kto, reward, grpo.")
    rewards_margin: float | None = Field(
        None,
        description="Preference stages (dpo, orpo, simpo, kto, reward): latest mean reward of the chosen answer minus "
        "the rejected one's on the training batches; rising = the model separates them. Example: 0.84.",
    )
    rewards_accuracy: float | None = Field(
        None,
        description="dpo, orpo, simpo, reward: latest share of training pairs whose chosen answer gets the higher "
        "reward (0-1; 0.5 = chance). Example: 0.9.",
    )
    reward_mean: float | None = Field(
        None, description="Stage grpo: the graders' mean score (0-1) of the answers sampled at the latest logged step."
    )
    reward_std: float | None = Field(
        None, description="Stage grpo: the spread (standard deviation) of those scores; near 0 = nothing to learn from."
    )
    output_dir: str = Field(description="Where the final adapter or model is (or will be) written.")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint folders kept so far.")
    error: str | None = Field(None, description="Why the job failed, with what to change.")
    log_tail: list[str] | None = Field(None, description="Last lines of train.log.")
    run_dir: str = Field(description="The job's folder: config.json, train.log, metrics.jsonl, checkpoints/.")
    model: str = Field(description="Base model of the job.")
    method: str = Field(description="Training method of the job.")
    created_at: float = Field(description="When the job was submitted (Unix time).")
    devices: str = Field(
        "cpu",
        description="What the job holds: 'cpu', GPU indices such as '0,1', 'ray' (workers on a Ray cluster) or "
        "'slurm' (tasks on a Slurm cluster).",
    )
    queue_position: int | None = Field(None, description="For a queued job: 1 = next to start.")
    ray: RayJobView | None = Field(
        None, description="For a job on a Ray cluster: its Ray job id, workers and their nodes, restarts."
    )
    slurm: SlurmJobView | None = Field(
        None, description="For a job on a Slurm cluster: its Slurm job id, state, nodes and requeues."
    )
    report: ResultReport | None = Field(
        None,
        description="For a completed job: did the model get better? Base vs tuned on the held-out rows (the metric "
        "named), answers side by side, the answers that went from right to wrong, the retention check (what the "
        "model kept of what it knew) and advice for the next run (propose_config(previous_job=...) applies it).",
    )
    estimate: dict | None = Field(
        None,
        description="The time estimate made when the job started: {wall_seconds, tokens_per_second, basis, ...} "
        "(as propose_config's `estimate`).",
    )
    estimate_error: float | None = Field(
        None,
        description="How far the estimate was off: (estimated - measured) / measured wall seconds; measured is the "
        "job's elapsed time once it completed, elapsed + eta while it trains. -0.2: the job took 25% longer than "
        "estimated. Example: 0.12.",
    )
    kind: str = Field("train", description="'train' (start_training) or 'sweep' (tune_config: a search of trials).")
    trials: list[SweepTrial] | None = Field(
        None, description="For a sweep: its trials so far, each with the values it tried, its score and status."
    )
    best_config: dict[str, Any] | None = Field(
        None,
        description="For a sweep: the best trial's config, a full TrainConfig ready for start_training (its score is "
        "in trials[]). None until a trial completes.",
    )
    sweep: SweepBudget | None = Field(None, description="For a sweep: its budget (trials, minutes), metric and space.")
    # A loss-curve PNG to send as image content beside the structured result (job_status include_plot).
    _plot_png: bytes | None = PrivateAttr(None)


def latest_metrics(run: RunDir) -> tuple[dict, dict]:
    """The newest training record and the newest eval record of metrics.jsonl (at most two JSON parses:
    job_status is polled, often by many clients)."""
    train: dict = {}
    evaluation: dict = {}
    for line in reversed(tail_lines(run.metrics, 400)):
        wanted_eval = not evaluation and '"eval_loss"' in line
        wanted_train = not train and '"loss"' in line and not wanted_eval
        if not (wanted_eval or wanted_train):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if wanted_eval:
            evaluation = record
        else:
            train = record
        if train and evaluation:
            break
    return train, evaluation


def redacted_tail(path: Path, n: int) -> list[str]:
    """The last n lines with secrets masked: one pass over the joined text (it is read on every job_status)."""
    lines = tail_lines(path, n)
    return redact("\n".join(lines)).split("\n") if lines else []


def _config_stage(run: RunDir) -> str:
    """The stage in the job's config.json (a job that has not written state.json yet), 'sft' when absent."""
    try:
        return str(json.loads(run.config.read_text(encoding="utf-8")).get("stage") or "sft")
    except (OSError, ValueError, AttributeError):
        return "sft"


def read_progress(record: JobRecord, log_lines: int | None = 20, with_report: bool = True) -> JobProgress:
    run = RunDir(Path(record.run_dir))
    state = run.read_state()
    train, evaluation = latest_metrics(run)
    step = int(state.get("step") or train.get("step") or 0)
    total = state.get("total_steps")
    elapsed = None
    if record.started_at:
        elapsed = round((record.finished_at or time.time()) - record.started_at, 1)
    eta = None
    train_elapsed = state.get("train_seconds")
    if record.status == "running" and total and step and train_elapsed:
        eta = round((total - step) * train_elapsed / step, 1)
    checkpoints = [str(p) for p in run.checkpoint_folders()]
    estimate = (read_json(run.estimate) or {}).get("estimate")
    estimate_error = None
    measured = elapsed if record.status == "completed" else (elapsed + eta if elapsed and eta is not None else None)
    if estimate and measured and estimate.get("wall_seconds"):
        estimate_error = round((estimate["wall_seconds"] - measured) / measured, 3)
    error = record.error
    if record.status == "failed" and not error:
        error = state.get("error")
    progress = JobProgress(
        job_id=record.job_id,
        status=record.status,
        phase=state.get("phase") if record.status == "running" else None,
        step=step,
        total_steps=total,
        epoch=state.get("epoch", train.get("epoch")),
        loss=train.get("loss"),
        learning_rate=train.get("learning_rate"),
        tokens_per_second=train.get("tokens_per_second"),
        elapsed_seconds=elapsed,
        eta_seconds=eta,
        eval_loss=evaluation.get("eval_loss"),
        stage=state.get("stage") or _config_stage(run),
        rewards_margin=train.get("rewards_margin"),
        rewards_accuracy=train.get("rewards_accuracy"),
        reward_mean=train.get("reward_mean"),
        reward_std=train.get("reward_std"),
        output_dir=record.output_dir,
        checkpoints=checkpoints,
        error=redact(error) if error else None,
        log_tail=None if log_lines is None else redacted_tail(run.log, log_lines),
        run_dir=record.run_dir,
        model=record.model,
        method=record.method,
        created_at=record.created_at,
        devices=record.devices,
        report=read_report(run.root) if with_report and record.status == "completed" else None,
        estimate=estimate,
        estimate_error=estimate_error,
        kind=record.kind,
    )
    if record.kind == "sweep":
        progress.trials, best, progress.sweep = read_sweep(run)
        progress.best_config = best.model_dump(mode="json") if best is not None else None
    return progress
