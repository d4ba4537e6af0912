"""tune_config: a budgeted sweep over the training recipe on Ray Tune, one job with its trials."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.tuning.sweep import SweepMetric
from tools.context import ToolContext


class TuneConfigResult(BaseModel):
    job_id: str | None = Field(description="The sweep's job id, for job_status / cancel_job. None for a dry run.")
    status: str = Field(description="'queued' or 'running' (its driver started), or 'dry_run'.")
    run_dir: str | None = Field(description="The sweep's folder; each trial's run folder is under trials/.")
    config: TrainConfig = Field(
        description="The centre of the search as the trials run it: defaults filled, paths absolute."
    )
    search: dict[str, Any] = Field(description="The space searched, as checked (default space filled in).")
    trials: int = Field(description="Trials the sweep may run (the first is the centre config itself).")
    budget_minutes: float = Field(description="Minutes the sweep may take, start to end.")
    metric: str = Field(description="What picks the best trial.")
    warnings: list[str] = Field(default_factory=list, description="Things to tell the user before they wait.")


def tune_config(
    ctx: ToolContext,
    config: Annotated[
        TrainConfig,
        Field(description="The centre of the search: a TrainConfig (e.g. propose_config's), run as the first trial."),
    ],
    search: Annotated[
        dict[str, Any] | None,
        Field(
            description="Setting -> a list of values to draw from, or a range {'min', 'max', 'log'}. Settings: "
            "learning_rate, num_epochs, max_steps, lora.r, lora.alpha (follows lora.r at the centre's ratio unless "
            "given), lora.dropout, lora.target_modules, assistant_only_loss, warmup_ratio, weight_decay, "
            "lr_scheduler, batch_size, gradient_accumulation_steps, replay.share (0 = no replay). Default: learning "
            "rate from a quarter to 4x the centre's (log), half to twice its epochs, LoRA rank 8/16/32. Example: "
            "{'learning_rate': {'min': 1e-4, 'max': 1e-3, 'log': true}, 'lora.r': [8, 16], 'num_epochs': [3, 6]}."
        ),
    ] = None,
    trials: Annotated[int, Field(ge=1, le=1000, description="Most trials to run. Example: 8.")] = 8,
    budget_minutes: Annotated[
        float,
        Field(
            gt=0,
            le=10080,
            description="Wall-clock minutes for the whole sweep; trials still running then stop. E.g. 30.",
        ),
    ] = 60,
    metric: Annotated[
        SweepMetric,
        Field(
            description="What ranks trials: 'eval_loss' (lowest held-out loss) or 'report' (the result report's "
            "held-out score, e.g. exact match; needs the report on). Poor trials are stopped early (ASHA) on "
            "held-out loss either way."
        ),
    ] = "eval_loss",
    dry_run: Annotated[bool, Field(description="Check everything and return the space; start nothing.")] = False,
) -> TuneConfigResult:
    """Search the training recipe around a config for the one that does best on held-out rows, within a budget of
    trials and minutes; returns a job_id at once. Each trial is a normal training run (its own run folder under the
    sweep's); poor trials are stopped early (ASHA on held-out loss). The sweep is one job: job_status shows trials[]
    (values tried, score, status) and best_config (a full TrainConfig for start_training); cancel_job stops every
    trial. Runs on Ray Tune: a local Ray here, or the cluster named by config.ray.address ('ray://HOST:10001')."""
    from lmtuner_core.tuning.submit import submit_sweep

    record, checked, spec, warnings = submit_sweep(
        ctx.jobs, config, search=search, trials=trials, budget_minutes=budget_minutes, metric=metric, dry_run=dry_run
    )
    return TuneConfigResult(
        job_id=record.job_id if record else None, status=record.status if record else "dry_run",
        run_dir=record.run_dir if record else None, config=checked, search=spec["search"], trials=trials,
        budget_minutes=budget_minutes, metric=metric, warnings=warnings,
    )  # fmt: skip
