"""A sweep as a job: checked and recorded like a training job (one row in the job store, kind 'sweep'), run by its
own child process (`python -m lmtuner_core.tuning.driver RUN_DIR`, under the same supervisor), read back for
job_status as a table of trials and the best config.

The run folder of a sweep holds `config.json` (the centre, resolved as a job would run it), `sweep.json` (what was
asked: space, trials, budget, metric, and the centre as given, from which best_config is built), `trials.json`
(written by the driver as trials start, report and end), and `trials/<trial_id>/`, each trial's own run folder
(config.json, train.log, metrics.jsonl, report.json, final/). Standard library and pydantic only: the server
reads it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.run_folder import RunDir, read_json, write_json_atomic
from lmtuner_core.tuning.search import apply_values, check_search

SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
TRIALS_DIR = "trials"
SweepMetric = Literal["eval_loss", "report"]
MODES = {"eval_loss": "min", "report": "max"}
TrialStatus = Literal["pending", "running", "completed", "stopped_early", "out_of_budget", "failed", "cancelled"]


class SweepTrial(BaseModel):
    trial_id: str = Field(description="Ray Tune's id of the trial. Example: 'a1b2c_00003'.")
    config: dict[str, Any] = Field(
        description="The values this trial tried for the searched settings (its full TrainConfig is run_dir's "
        "config.json). Example: {'learning_rate': 0.0005, 'lora.r': 8}."
    )
    score: float | None = Field(
        None,
        description="The sweep's metric for this trial: its lowest held-out loss (metric eval_loss, lower is better) "
        "or its result report's held-out score (metric report, 0-1, higher is better). None until measured.",
    )
    status: TrialStatus = Field(
        description="pending, running, completed, stopped_early (its held-out loss was poor: ASHA stopped it), "
        "out_of_budget (the sweep's time ran out), failed, cancelled."
    )
    eval_loss: float | None = Field(None, description="Its lowest held-out loss so far.")
    step: int | None = Field(None, description="The last step it reported.")
    error: str | None = Field(None, description="Why it failed.")
    run_dir: str | None = Field(None, description="The trial's run folder, inside the sweep's.")
    node: str | None = Field(None, description="IP address of the Ray node the trial trained on.")


class SweepBudget(BaseModel):
    trials: int = Field(description="Trials the sweep may run. Example: 8.")
    minutes: float = Field(description="Wall-clock minutes the sweep may take, start to end. Example: 30.")
    metric: SweepMetric = Field(description="What picks the best trial: eval_loss (min) or report (max).")
    search: dict[str, Any] = Field(description="The space searched, as checked.")
    cluster: str | None = Field(None, description="The Ray cluster the trials ran on; None: local Ray on this machine.")


def sweep_run_files(run: RunDir) -> tuple[Path, Path, Path]:
    return run.root / SWEEP_FILE, run.root / TRIALS_FILE, run.root / TRIALS_DIR


def check_sweep(
    config: TrainConfig, search: dict[str, Any] | None, trials: int, budget_minutes: float, metric: str
) -> dict[str, Any]:
    """What the sweep's driver reads (sweep.json), every part checked; refuses a sweep that cannot score trials."""
    if metric not in MODES:
        raise LmtunerError(f"metric: {metric!r} is not a sweep metric; accepted: {', '.join(MODES)}", field="metric")
    if not 1 <= trials <= 1000:
        raise LmtunerError(f"trials: {trials} is out of range; give 1 to 1000", field="trials")
    if not 0 < budget_minutes <= 7 * 24 * 60:
        raise LmtunerError(
            f"budget_minutes: {budget_minutes} is out of range; give more than 0, at most 10080 (a week)",
            field="budget_minutes",
        )
    if config.eval_dataset is None and config.dataset.eval_fraction == 0:
        raise LmtunerError(
            "config.dataset.eval_fraction: a sweep compares trials on held-out rows; set eval_fraction above 0 (or "
            "'auto'), or give config.eval_dataset",
            field="config.dataset.eval_fraction",
        )
    if metric == "report" and not config.report.enabled:
        raise LmtunerError(
            "metric: 'report' scores each trial by its result report, which config.report turns off; enable the "
            "report or use metric 'eval_loss'",
            field="metric",
        )
    if config.output_dir is not None:
        raise LmtunerError(
            "config.output_dir: each trial writes its model in its own run folder; remove output_dir (set it in "
            "best_config when you train the winner)",
            field="config.output_dir",
        )
    if config.resume_from is not None:
        raise LmtunerError(
            "config.resume_from: a sweep starts every trial afresh; remove it", field="config.resume_from"
        )
    return {
        "search": check_search(search, config),
        "trials": trials,
        "budget_minutes": budget_minutes,
        "metric": metric,
        "mode": MODES[metric],
        "centre": config.model_dump(mode="json"),
        "submitted_at": time.time(),
    }


def read_sweep(run: RunDir) -> tuple[list[SweepTrial], TrainConfig | None, SweepBudget | None]:
    """The trials so far, the best config (once a trial has a score) and the budget, from the run folder."""
    sweep_file, trials_file, _ = sweep_run_files(run)
    sweep = read_json(sweep_file)
    if not isinstance(sweep, dict):
        return [], None, None
    budget = SweepBudget(
        trials=sweep["trials"], minutes=sweep["budget_minutes"], metric=sweep["metric"], search=sweep["search"],
        cluster=sweep.get("cluster"),
    )  # fmt: skip
    raw = read_json(trials_file)
    trials = []
    for item in raw if isinstance(raw, list) else []:
        try:
            trials.append(SweepTrial.model_validate(item))
        except ValueError:
            continue
    best = best_trial(trials, sweep["mode"])
    best_config = None
    if best is not None:
        best_config = TrainConfig.model_validate(apply_values(sweep["centre"], best.config))
    return trials, best_config, budget


def best_trial(trials: list[SweepTrial], mode: str) -> SweepTrial | None:
    """The completed trial with the best score (ties: the earlier trial, so the centre wins a tie)."""
    scored = [t for t in trials if t.status == "completed" and t.score is not None]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda t: sign * t.score)  # type: ignore[operator]


def write_trials(run: RunDir, trials: list[dict]) -> None:
    write_json_atomic(run.root / TRIALS_FILE, trials, indent=1)
