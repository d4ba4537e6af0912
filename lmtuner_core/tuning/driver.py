"""`python -m lmtuner_core.tuning.driver RUN_DIR`: a sweep's child process, under the job supervisor like any job.

Runs Ray Tune over the sweep's search space: the first trial is the centre config itself, the rest are drawn at
random (BasicVariantGenerator); ASHA stops trials whose held-out loss trails the others at its rungs; Tune's
time_budget_s keeps the sweep inside its minutes. Each trial is one normal training run, `python -m
lmtuner_core.training.train TRIAL_DIR` (the same entry a job uses), started by the trial's Ray worker in its own
run folder under the sweep's, and followed through its metrics.jsonl. With no cluster, a local Ray is started
here (all of this machine's cores, one trial at a time: two trainings on the same cores each run far slower than
half speed) and stopped at the end; with config.ray.address the trials go to that cluster.

Cancel: the supervisor passes SIGTERM on; this process records 'cancelled' and kills every process below it
(Ray's, and each trial's training process, which also dies with its Ray worker: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

from lmtuner_core.config import TrainConfig
from lmtuner_core.jobs.distributed import TRAIN_MODULE, die_with_parent
from lmtuner_core.jobs.run_folder import RunDir, StateFile, read_json, run_dir_argument
from lmtuner_core.report.result import REPORT_FILE
from lmtuner_core.tuning.search import apply_values, centre_point, ray_space
from lmtuner_core.tuning.sweep import SWEEP_FILE, TRIALS_DIR, SweepTrial, best_trial, write_trials

# ASHA: a trial is first compared after this many held-out evaluations (the first is the base model's, at step 0),
# and half of the trials are stopped at each rung.
GRACE_EVALUATIONS = 3
REDUCTION_FACTOR = 2
POLL_SECONDS = 1.0
# Kept back from the budget for stopping Ray and writing the results after Tune's time budget ends.
SHUTDOWN_SECONDS = 20.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------- one trial


def run_trial(params: dict, sweep_dir: str) -> None:
    """One trial (a Ray Tune function trainable): writes the trial's config.json, runs the training entry on it and
    reports each held-out loss (the best so far) to Tune, then the trial's score."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    sweep = read_json(Path(sweep_dir) / SWEEP_FILE)
    centre = read_json(RunDir(Path(sweep_dir)).config)
    run = RunDir(Path(sweep_dir) / TRIALS_DIR / trial_id)
    run.root.mkdir(parents=True, exist_ok=True)
    # Each trial is one training process on the node Ray placed it on: not a Ray job of its own.
    values = {**apply_values(centre, params), "output_dir": str(run.default_output), "ray": None}
    config = TrainConfig.model_validate(values)
    run.config.write_text(config.to_json(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    with run.log.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", TRAIN_MODULE, str(run.root)], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
        )  # fmt: skip
    import ray

    node = ray.util.get_node_ip_address()
    best: float | None = None
    step = 0
    offset = 0
    try:
        while True:
            ended = proc.poll() is not None
            offset, records = _new_records(run.metrics, offset)
            for record in records:
                if "eval_loss" in record:
                    best = record["eval_loss"] if best is None else min(best, record["eval_loss"])
                    step = record.get("step", step)
                    tune.report({"eval_loss": best, "step": step, "node": node})
            if ended:
                break
            time.sleep(POLL_SECONDS)
        state = run.read_state()
        if state.get("status") != "completed":
            raise RuntimeError(state.get("error") or f"the training process exited with code {proc.returncode}")
        score = best
        if sweep["metric"] == "report":
            report = read_json(run.root / REPORT_FILE) or {}
            score = report.get("tuned")
        tune.report({"eval_loss": best, "step": step, "node": node, "score": score, "trial_done": 1})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _new_records(path: Path, offset: int) -> tuple[int, list[dict]]:
    """The complete JSON lines appended to metrics.jsonl since `offset`, and the new offset."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset, []
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return offset + end, records


# ---------------------------------------------------------------------------------------------- the table


class TrialTable:
    """trials.json, kept by a Tune callback as trials start, report and end (made a Callback in `callback`)."""

    def __init__(self, run: RunDir, deadline: float, state: StateFile):
        self.run = run
        self.state = state
        self.deadline = deadline
        self.trials: dict[str, dict] = {}
        self.done: set[str] = set()

    def write(self) -> None:
        write_trials(self.run, list(self.trials.values()))

    def start(self, trial) -> None:
        self.trials[trial.trial_id] = SweepTrial(
            trial_id=trial.trial_id, config=dict(trial.config), status="running",
            run_dir=str(self.run.root / TRIALS_DIR / trial.trial_id),
        ).model_dump()  # fmt: skip
        self.write()

    def result(self, trial, result: dict) -> None:
        entry = self.trials.get(trial.trial_id)
        if entry is None:
            return
        entry.update(eval_loss=result.get("eval_loss"), step=result.get("step"), node=result.get("node"))
        if result.get("trial_done"):
            entry["score"] = result.get("score")
            self.done.add(trial.trial_id)
        self.write()

    def end(self, trial, failed: bool = False) -> None:
        entry = self.trials.get(trial.trial_id)
        if entry is None:
            return
        if failed:
            state = RunDir(Path(entry["run_dir"])).read_state()
            entry.update(status="failed", error=state.get("error") or "the trial failed; see its train.log")
        elif trial.trial_id in self.done:
            entry["status"] = "completed"
        else:
            entry["status"] = "out_of_budget" if time.monotonic() >= self.deadline - 1 else "stopped_early"
        self.write()
        self.state.update(step=sum(t["status"] != "running" for t in self.trials.values()))


def callback(table: TrialTable):
    from ray.tune import Callback

    class TrialTableCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            table.start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            table.result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            table.end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            table.end(trial, failed=True)

    return TrialTableCallback()


# ---------------------------------------------------------------------------------------------- the sweep


def kill_descendants() -> None:
    """Kills every process below this one (Ray's and the trials' training processes): what a cancel must leave."""
    me = psutil.Process()
    for _ in range(3):  # a dying Ray may still start a worker: look again
        children = me.children(recursive=True)
        if not children:
            return
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=5)


def start_ray(sweep: dict, centre: TrainConfig, temp_dir: str) -> dict[str, float]:
    """Connects to the sweep's cluster, or starts a local Ray; returns the resources one trial reserves."""
    import ray

    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if centre.ray is not None:
        import lmtuner_core

        ray.init(
            address=centre.ray.address,
            runtime_env={"py_modules": [str(Path(lmtuner_core.__file__).parent)], "excludes": ["__pycache__"],
                         "env_vars": {**env, "LMTUNER_HOME": os.environ.get("LMTUNER_HOME", "")}},
        )  # fmt: skip
        resources = centre.ray.resources_per_worker or {"CPU": 1, **({"GPU": 1} if centre.ray.use_gpu else {})}
        return {k.lower() if k in ("CPU", "GPU") else k: v for k, v in resources.items()}
    os.environ.pop("RAY_ADDRESS", None)  # a local sweep never joins a cluster someone else started here
    cpus = os.cpu_count() or 1
    devices = sweep.get("devices", "cpu")
    gpus = 0 if devices == "cpu" else len(devices.split(","))  # the supervisor set CUDA_VISIBLE_DEVICES to them
    ray.init(
        address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, object_store_memory=100 * 2**20,
        _temp_dir=temp_dir, runtime_env={"env_vars": env},
    )  # fmt: skip
    return {"cpu": cpus, "gpu": gpus}  # one trial at a time: it takes every core and the sweep's GPUs


def run_sweep(run: RunDir, state: StateFile, started: float) -> None:
    sweep = read_json(run.root / SWEEP_FILE)
    centre = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
    if centre.ray is None and "RAY_AUTH_MODE" not in os.environ:
        # A new local Ray turns token auth on and, lacking a token, writes one to ~/.ray/auth_token, which then turns
        # it on for every later `ray start` on the machine. This Ray gets a token of its own, in its environment only
        # (set before Ray is imported: it reads the mode once).
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    budget_seconds = sweep["budget_minutes"] * 60
    temp_dir = tempfile.mkdtemp(prefix="lmtr-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    try:
        state.update(phase="starting ray")
        resources = start_ray(sweep, centre, temp_dir)
        remaining = budget_seconds - (time.monotonic() - started) - SHUTDOWN_SECONDS
        if remaining <= 0:
            raise RuntimeError("the budget ran out while Ray was starting; give more budget_minutes")
        table = TrialTable(run, time.monotonic() + remaining, state)
        state.update(phase="tuning")
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, sweep_dir=str(run.root)), resources),
            param_space=ray_space(sweep["search"]),
            tune_config=tune.TuneConfig(
                search_alg=BasicVariantGenerator(
                    points_to_evaluate=[centre_point(sweep["search"], centre)], random_state=centre.seed
                ),
                scheduler=ASHAScheduler(
                    metric="eval_loss", mode="min", time_attr="training_iteration", max_t=10_000,
                    grace_period=GRACE_EVALUATIONS, reduction_factor=REDUCTION_FACTOR,
                ),
                num_samples=sweep["trials"],
                max_concurrent_trials=None if centre.ray is not None else 1,
                time_budget_s=remaining,
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(run.root / "tune"), callbacks=[callback(table)], verbose=1,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )  # fmt: skip
        tuner.fit()
        for entry in table.trials.values():  # Tune ends the trials still running at the time budget without a callback
            if entry["status"] == "running":
                entry["status"] = "out_of_budget"
        table.write()
        trials = [SweepTrial.model_validate(t) for t in table.trials.values()]
        best = best_trial(trials, sweep["mode"])
        finished = sum(t.status != "running" for t in trials)
        if best is None:
            errors = [t.error for t in trials if t.error]
            why = (
                errors[0] if errors else "no trial finished within the budget; give more budget_minutes or fewer steps"
            )
            state.update(status="failed", phase=None, step=finished, error=f"no trial completed: {why}")
        else:
            state.update(status="completed", phase=None, step=finished, best_trial=best.trial_id)
    finally:
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    run = run_dir_argument(sys.argv[1:] if argv is None else argv, "lmtuner_core.tuning.driver")
    if run is None:
        return 2
    sweep = read_json(run.root / SWEEP_FILE) or {}
    state = StateFile(run)
    state.update(phase="starting", total_steps=sweep.get("trials"), kind="sweep")

    def cancel(signum, _frame):
        state.update(status="cancelled", phase=None)
        kill_descendants()
        os._exit(0)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    try:
        run_sweep(run, state, started)
    except Exception as exc:
        traceback.print_exc()
        state.update(status="failed", phase=None, error=f"the sweep failed: {type(exc).__name__}: {exc}")
        kill_descendants()
        return 1
    kill_descendants()
    return 0


if __name__ == "__main__":
    sys.exit(main())
