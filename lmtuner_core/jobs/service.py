"""Jobs: check a config, record it, hand it to its launcher, and reconcile — the same steps whatever runs it.

The server never trains. A job's config selects its backend (jobs/launcher.py: this machine's queue, a Ray
cluster, ...); the job is recorded `queued` with the backend's name, its run folder written, and handed to the
backend's launcher, whose handle the store keeps. Whoever looks next — a server (restarted or not), the CLI, or
the supervisor of a local job that just ended — asks the job's launcher whether it ended and starts what waits.
"""

from __future__ import annotations

import importlib.util
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmtuner_core.config import DatasetSpec, TrainConfig
from lmtuner_core.data.datasets import LoadedData, held_out_count, load_examples, resolve_dataset
from lmtuner_core.data.preference import data_shape
from lmtuner_core.errors import LmtunerError, NotFoundError, shown
from lmtuner_core.graders.scoring import resolved_graders
from lmtuner_core.jobs.distributed import write_deepspeed_config
from lmtuner_core.jobs.launcher import LOCAL, Ending, LaunchContext, Launchers, tracker_environment  # noqa: F401

# Moved to the local backend; importable here as before.
from lmtuner_core.jobs.local_launcher import (  # noqa: F401
    CLAIM_TIMEOUT_SECONDS,
    check_processes,
    cpu_job_slots,
    preflight,
    resolve_devices,
)
from lmtuner_core.jobs.progress import JobProgress, read_progress
from lmtuner_core.jobs.store import STATUSES, TERMINAL, JobRecord, JobStore
from lmtuner_core.methods import METHODS
from lmtuner_core.models.gguf_import import gguf_source
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.paths import AllowedRoots, check_job_id, check_outside_state, check_writable
from lmtuner_core.run import RunDir
from lmtuner_core.stages import stage_data_refusal

if TYPE_CHECKING:
    from lmtuner_core.planning.ray_cluster import RayAddresses

TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# ---------------------------------------------------------------------------------------------- checking


def checked_prompt_dataset(config: TrainConfig, roots: AllowedRoots):
    """GRPO's dataset spec with its file resolved, and its prompt rows, every one read and checked here."""
    from lmtuner_core.data.prompt_rows import load_prompt_rows

    source = resolve_dataset(config.dataset, roots)
    if source.registry_dir is not None:
        raise LmtunerError("dataset: stage grpo reads a prompts file by path, not a dataset_info.json entry",
                           field="dataset")  # fmt: skip
    loaded = load_prompt_rows(config.dataset, roots, config.graders)
    return config.dataset.model_copy(
        update={"path": str(roots.resolve(config.dataset.path or "", "dataset.path"))}
    ), loaded


def check_config(
    config: TrainConfig, roots: AllowedRoots, run_dir: RunDir, *, dry_run: bool = False
) -> tuple[TrainConfig, list[str]]:
    """Resolves every path (inside the allowed roots) and reads the data once, so a bad job is refused before
    a process is spent on it. Returns the config as the child will see it, and warnings."""
    method = METHODS[config.method]
    if method.not_yet:
        raise LmtunerError(
            f"method: {config.method!r} is not available in this version: {method.not_yet}", field="method"
        )

    for tracker in config.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise LmtunerError(
                f"report_to: {tracker!r} needs the {TRACKER_PACKAGES[tracker]} package (pip install "
                f"{TRACKER_PACKAGES[tracker]}); or remove it — metrics.jsonl is always written",
                field="report_to",
            )
    warnings: list[str] = []
    updates: dict = {"model": resolve_model(config.model, roots, trust_remote_code=config.trust_remote_code)}
    updates["model_gguf"] = gguf_source(updates["model"])
    if config.deepspeed is not None:
        updates["deepspeed"] = check_deepspeed(config, roots)
    if config.model == updates["model"] and not config.model.startswith("/"):
        warnings.append(
            f"model {shown(config.model)} is a hub id: the training process downloads it unless it is cached"
        )
    if config.stage == "grpo":  # prompts-only rows, checked with the graders' reference columns
        updates["dataset"], loaded = checked_prompt_dataset(config, roots)
        updates["graders"] = resolved_graders(config.graders, roots, config.trust_remote_code)
    else:
        updates["dataset"], loaded = checked_dataset(config.dataset, roots, "dataset")
        refusal = stage_data_refusal(config.stage, loaded.format)
        if refusal:
            raise LmtunerError(f"dataset: {refusal}", field="dataset")
    if loaded.skipped:
        warnings.append(f"{len(loaded.skipped)} malformed rows will be skipped; first: {loaded.skipped[0]}")
    if config.eval_dataset is not None:
        updates["eval_dataset"], held_out = checked_dataset(config.eval_dataset, roots, "eval_dataset")
        if data_shape(held_out.format) != data_shape(loaded.format):
            raise LmtunerError(
                f"eval_dataset: it holds {held_out.format} rows and the dataset {loaded.format} rows; held-out rows "
                "must be of the same kind",
                field="eval_dataset",
            )
        if updates["eval_dataset"] == updates["dataset"]:
            raise LmtunerError(
                "eval_dataset: it names the training data itself; held-out rows must be rows the model never trains "
                "on — give another file, or omit eval_dataset to hold out a share of dataset (eval_fraction)",
                field="eval_dataset",
            )
    else:
        held_out = held_out_count(len(loaded.examples), config.dataset.eval_fraction)
        if not held_out and config.report.enabled and config.stage != "grpo":
            warnings.append(
                f"no held-out rows ({len(loaded.examples)} rows, eval_fraction {config.dataset.eval_fraction}): the "
                "report cannot say whether the model got better; give an eval_dataset or more rows"
            )
    output = roots.resolve(config.output_dir, "output_dir") if config.output_dir else run_dir.default_output
    if config.output_dir:
        check_outside_state(output, run_dir.root.parents[1], "output_dir")  # run folders live in $LMTUNER_HOME/runs
        check_writable(output, "output_dir")
    if output.exists() and any(output.iterdir()):
        raise LmtunerError(
            f"output_dir: {output} already holds files; choose an empty or new folder (nothing is overwritten)",
            field="output_dir",
        )
    updates["output_dir"] = str(output)
    if config.resume_from:
        resume = roots.resolve(config.resume_from, "resume_from")
        if not resume.is_dir():
            raise LmtunerError(f"resume_from: checkpoint folder {resume} not found", field="resume_from")
        updates["resume_from"] = str(resume)
    checked = config.model_copy(update=updates)
    return TrainConfig.model_validate(checked.model_dump()), warnings


def checked_dataset(spec: DatasetSpec, roots: AllowedRoots, field: str) -> tuple[DatasetSpec, LoadedData]:
    """The dataset spec as the child will read it (its file resolved inside the roots, or the dataset_info.json
    entry's folder), and its rows, read once here so a bad row is refused before a process is spent."""
    try:
        source = resolve_dataset(spec, roots)
        loaded = load_examples(spec, roots, source)
    except LmtunerError as exc:
        if field == "dataset":
            raise
        raise LmtunerError(f"{field}: {exc}", field=field) from None  # the readers name `dataset` in their messages
    if source.registry_dir is not None:  # a dataset_info.json entry: the child looks it up the same way
        update = {"name": spec.name or spec.path, "path": None, "dataset_dir": str(source.registry_dir)}
    else:
        update = {"path": str(roots.resolve(spec.path or "", f"{field}.path"))}
    return spec.model_copy(update=update), loaded


def check_deepspeed(config: TrainConfig, roots: AllowedRoots):
    """The deepspeed settings with a user's config_file resolved (inside the allowed roots) and read as JSON."""
    from lmtuner_core.jobs.distributed import read_user_deepspeed_config

    if importlib.util.find_spec("deepspeed") is None:
        raise LmtunerError(
            "deepspeed: the deepspeed package is not installed (pip install 'lmtuner[train]'); or remove deepspeed",
            field="deepspeed",
        )
    cannot = METHODS[config.method].deepspeed
    if cannot:
        raise LmtunerError(f"deepspeed: method {config.method!r} {cannot}", field="deepspeed")
    settings = config.deepspeed
    if settings is None or settings.config_file is None:
        return settings
    path = roots.resolve(settings.config_file, "deepspeed.config_file")
    try:
        read_user_deepspeed_config(path)
    except ValueError as exc:
        raise LmtunerError(
            f"deepspeed.config_file: {exc}; give a DeepSpeed JSON file, or omit config_file to have one generated",
            field="deepspeed.config_file",
        ) from None
    return settings.model_copy(update={"config_file": str(path)})


# ---------------------------------------------------------------------------------------------- running


class JobService:
    """The job operations the tools and the CLI share. No backend is named here: each job's launcher
    (jobs/launcher.py) does what differs."""

    def __init__(self, home: Path, roots: AllowedRoots, ray_addresses: RayAddresses | None = None):
        self.home = home
        self.roots = roots
        self.store = JobStore(home)
        # The owner's settings per backend: the Ray clusters a job may be sent to (unconfined by default, as
        # AllowedRoots(None): the CLI).
        settings = {} if ray_addresses is None else {"ray": ray_addresses}
        self.launchers = Launchers(LaunchContext(home, roots, self.store, settings))
        self.launchers[LOCAL]  # this machine's queue is always scheduled
        (home / "runs").mkdir(exist_ok=True)

    def run_dir(self, job_id: str) -> RunDir:
        return RunDir(self.home / "runs" / job_id)

    # -------------------------------------------------------------------------------------------- submit

    def submit(
        self,
        config: TrainConfig,
        *,
        dry_run: bool = False,
        force: bool = False,
        gate: Callable[[TrainConfig, str], bool] | None = None,
    ) -> tuple[JobRecord | None, TrainConfig, list[str]]:
        """Checks the config, and with its launcher whether it can run there (a job that would not fit its devices
        is refused unless force); unless dry_run, records the job and hands it to its launcher. `gate(checked,
        devices)`, called once everything is checked and before anything is written, may hold the start back
        (False): the answer is then that of a dry run (start_training's confirmation before spending)."""
        job_id = new_job_id()
        run = self.run_dir(job_id)
        launcher = self.launchers.for_config(config)
        config = launcher.confine(config)  # what the server reaches and writes is checked first, before any connection
        checked, warnings = check_config(config, self.roots, run, dry_run=dry_run)
        placement = launcher.check(checked, force=force)  # a dry run is refused as the real start is
        warnings += placement.warnings
        if dry_run or (gate is not None and not gate(checked, placement.devices)):
            return None, checked, warnings
        try:
            run.root.mkdir(parents=True)
            run.config.write_text(checked.to_json(), encoding="utf-8")
            write_deepspeed_config(checked.model_dump(), run.root, on_gpu=placement.on_gpu)
        except OSError as exc:
            raise LmtunerError(f"cannot write the run folder {run.root}: {exc.strerror}; free disk space") from None
        record = self.store.create(
            job_id=job_id, run_dir=run.root, model=checked.model, method=checked.method,
            output_dir=Path(checked.output_dir or run.default_output), devices=placement.devices,
            backend=launcher.name,
        )  # fmt: skip
        self._hand_over(record, run, checked)
        record = self.store.get(job_id)
        if record is not None and record.status == "queued":
            warnings.append(f"queued: devices {placement.devices} are busy; the job starts when they are free")
        return record, checked, warnings

    def _hand_over(self, record: JobRecord, run: RunDir, config: TrainConfig) -> None:
        """Gives a queued job to its launcher: a backend that takes it returns a handle and the job is running
        there; otherwise it waits on this machine's queue, which is scheduled now. A refusal fails the job."""
        try:
            handle = self.launchers.for_record(record).submit(record, run, config)
        except LmtunerError as exc:
            self.store.update(record.job_id, status="failed", finished_at=time.time(), error=str(exc))
            raise
        if handle is None:
            self.schedule()
            return
        now = time.time()
        self.store.update(record.job_id, status="running", started_at=now, claimed_at=now, handle=handle)

    def schedule(self) -> list[str]:
        """Brings the running jobs up to date, then starts every queued job that can start now; returns their ids."""
        for record in self.store.list(statuses=("running",)):
            self.refresh(record, schedule=False)
        started: list[str] = []
        for launcher in self.launchers.built():
            started += launcher.start_queued()
        return started

    # -------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        record = self.store.get(job_id)
        if record is None:
            raise NotFoundError(f"job_id: no job {shown(job_id)}; list_jobs shows the jobs there are", field="job_id")
        return self.refresh(record)

    def refresh(self, record: JobRecord, *, schedule: bool = True) -> JobRecord:
        """Brings a non-final record up to date through its launcher (any server can: the record holds the
        backend and its handle); when a job has ended or gone back to the queue, starts what was waiting."""
        if record.status in TERMINAL:
            return record
        if record.status == "queued":
            # Whoever watches only a queued job must still see it start once the job ahead of it has died.
            if schedule and record.job_id in self.schedule():
                return self.store.get(record.job_id) or record
            return record
        ending = self.launchers.for_record(record).poll(record)
        if ending is not None:
            self.finish(record, ending)
        now = self.store.get(record.job_id) or record
        if now.status != record.status and schedule:
            self.schedule()
            now = self.store.get(record.job_id) or now
        return now

    def finish(self, record: JobRecord, ending: Ending) -> None:
        """Records how a job ended (once: two processes noticing the same ending do not overwrite each other)."""
        self.store.update(
            record.job_id, only_if_status=("queued", "running"), status=ending.status, error=ending.error,
            exit_code=ending.exit_code, finished_at=time.time(),
        )  # fmt: skip

    def list(self, status: str | None = None) -> list[JobRecord]:
        if status is not None and status not in STATUSES:
            raise LmtunerError(
                f"status: {shown(status)} is not a job status; accepted: {', '.join(STATUSES)}", field="status"
            )
        self.schedule()
        return self.store.list(statuses=(status,) if status else None)

    def progress(self, record: JobRecord, log_lines: int | None = 20, with_report: bool = True) -> JobProgress:
        progress = read_progress(record, log_lines, with_report)
        if record.status == "queued":
            progress.queue_position = self.store.queue_position(record)
        view = self.launchers.for_record(record).view(record)
        if view is not None:
            setattr(progress, record.backend, view)  # JobProgress has a field of each cluster backend's name
        return progress

    # -------------------------------------------------------------------------------------------- resume

    def resume(self, job_id: str) -> tuple[JobRecord, TrainConfig]:
        """Puts a failed or cancelled job back to its backend, to continue from its newest checkpoint with the
        optimizer, scheduler and step count it had. Same job id, same run folder; metrics keep appending."""
        record = self.get(job_id)
        if record.status not in ("failed", "cancelled"):
            hint = "start a new job with resume_from to train further" if record.status == "completed" else ""
            raise LmtunerError(
                f"job_id: job {job_id} is {record.status}; only failed or cancelled jobs resume"
                + (f"; {hint}" if hint else ""),
                field="job_id",
            )
        run = RunDir(Path(record.run_dir))
        config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
        config, note = self.launchers.for_record(record).resume(record, config, run)
        run.config.write_text(config.to_json(), encoding="utf-8")
        for stale in (run.state, run.exit):
            stale.unlink(missing_ok=True)
        with run.log.open("a", encoding="utf-8") as log:
            log.write(note + "\n")
        self.store.update(
            job_id, only_if_status=("failed", "cancelled"), status="queued", error=None, exit_code=None,
            finished_at=None, pid=None, pid_started_at=None, cancel_requested=0, claimed_at=None,
        )  # fmt: skip
        self._hand_over(self.store.get(job_id), run, config)  # type: ignore[arg-type]
        return self.store.get(job_id), config  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------------- cancel

    def cancel(self, job_id: str, grace_seconds: float = 20.0) -> JobRecord:
        """Asks the job's processes to stop (they save a checkpoint and exit), then has them killed if they have
        not exited within grace_seconds. A queued job is simply taken off the queue."""
        record = self.get(job_id)
        if record.status in TERMINAL:
            return record
        self.store.update(job_id, cancel_requested=1)
        ending = self.launchers.for_record(record).stop(record, grace_seconds)
        if ending is not None:
            self.finish(record, ending)
            return self.get(job_id)
        record = self.refresh(self.store.get(job_id))  # type: ignore[arg-type]
        if record.status == "failed":  # killed during cancel: that is what was asked for
            self.store.update(job_id, status="cancelled", error=None)
        return self.store.get(job_id)  # type: ignore[return-value]
