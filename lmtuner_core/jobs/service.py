"""Jobs: check a config, queue it, start its training process when its devices are free, and reconcile.

The server never trains. A job is recorded `queued`; `schedule` claims queued jobs whose devices are free
(in one SQLite write transaction, so two servers never start the same job or overbook a GPU) and spawns each
under `lmtuner_core.jobs.supervisor` in its own session. Whoever looks next — a server, the CLI, or the
supervisor of a job that just ended — concludes finished jobs from their run folders and starts the next.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from lmtuner_core.config import DatasetSpec, TrainConfig
from lmtuner_core.data.datasets import LoadedData, held_out_count, load_examples, resolve_dataset
from lmtuner_core.errors import LmtunerError, NotFoundError, shown
from lmtuner_core.jobs.distributed import write_deepspeed_config
from lmtuner_core.jobs.processes import alive, exit_reason, reap, reap_finished, signal_group, spawn_supervised
from lmtuner_core.jobs.progress import JobProgress, read_progress
from lmtuner_core.jobs.ray_launcher import RayAddresses
from lmtuner_core.jobs.run_folder import RunDir
from lmtuner_core.jobs.store import STATUSES, TERMINAL, JobRecord, JobStore
from lmtuner_core.methods import METHODS
from lmtuner_core.models.gguf_import import gguf_source
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.paths import AllowedRoots, check_job_id, check_outside_state, check_writable
from lmtuner_core.secrets import child_environment

# A job claimed for starting but still without a process after this long lost its starter: queue it again.
CLAIM_TIMEOUT_SECONDS = 60.0
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def cpu_job_slots() -> int:
    """How many CPU-only jobs run at once: $LMTUNER_MAX_CPU_JOBS, else one per 8 cores (at least one), since
    two PyTorch processes on the same few cores each run far slower than half speed."""
    configured = os.environ.get("LMTUNER_MAX_CPU_JOBS")
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise LmtunerError(f"LMTUNER_MAX_CPU_JOBS={shown(configured)} is not a whole number") from None
    return max(1, (os.cpu_count() or 1) // 8)


def resolve_devices(requested: list[int] | str) -> str:
    """The devices a job will hold, as the store keeps them: 'cpu' or '0,1'."""
    from lmtuner_core.planning.hardware import list_gpus

    gpus = [g.index for g in list_gpus()]
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return ",".join(map(str, gpus)) if gpus else "cpu"
    missing = [i for i in requested if i not in gpus]
    if missing:
        have = ", ".join(map(str, gpus)) or "none"
        raise LmtunerError(f"devices: GPU {missing[0]} does not exist here (GPUs: {have}); use 'auto'", field="devices")
    return ",".join(map(str, sorted(set(requested))))


def preflight(config: TrainConfig, devices: str, *, refuse: bool) -> list[str]:
    """Estimates the job's memory on the devices it will use; refuses (refuse=True) or warns when it does not
    fit. A model whose config.json is not local cannot be estimated: that is a warning, not a refusal."""
    from lmtuner_core.planning.hardware import list_gpus
    from lmtuner_core.planning.planner import HardwareSpec, check_fits

    try:
        from lmtuner_core.planning.memory import load_shape

        shape = load_shape(config.model)
    except LmtunerError as exc:
        return [f"memory not checked: {exc}"]
    if devices == "cpu":
        ram = psutil.virtual_memory()
        hardware = HardwareSpec(memory_total_mib=ram.total // 2**20, memory_available_mib=ram.available // 2**20)
    else:
        wanted = {int(i) for i in devices.split(",")}
        hardware = HardwareSpec(gpus=[g for g in list_gpus() if g.index in wanted])
    fits, memory = check_fits(shape, config, hardware)
    if fits:
        return []
    where = "per GPU" if devices != "cpu" else "of RAM"
    message = (
        f"needs about {memory.per_gpu_gib:.1f} GiB {where} but {memory.budget_gib:.1f} GiB is usable (weights "
        f"{memory.weights_gib:.1f}, gradients {memory.gradients_gib:.1f}, optimizer {memory.optimizer_gib:.1f}, "
        f"activations {memory.activations_gib:.1f}, logits {memory.logits_gib:.1f}, overhead {memory.overhead_gib:.1f}"
        " GiB); propose_config finds a setting that fits (qlora, a smaller batch_size or max_seq_len, "
        "gradient_checkpointing)"
    )
    if refuse:
        override = "set force: true (`lmtuner train --force`) to start it anyway"
        raise LmtunerError(f"memory: this job {message}; or {override}", field="config")
    return [f"memory: this job {message}"]


def tracker_environment(run: RunDir, env: dict[str, str]) -> dict[str, str]:
    """Settings for the trackers the run's config.json asks for (none for the others): they write inside the run
    folder, named after the job. wandb runs offline unless the user has a key (or chose a mode); the key itself
    stays in the environment, never in files we write."""
    import json

    try:
        report_to = json.loads(run.config.read_text(encoding="utf-8")).get("report_to") or []
    except (OSError, ValueError):
        report_to = []  # no readable config: the child fails on it with its own message
    extra: dict[str, str] = {}
    if "tensorboard" in report_to:
        extra["TENSORBOARD_LOGGING_DIR"] = str(run.root / "tensorboard")
    if "wandb" in report_to:
        extra.update(
            WANDB_DIR=str(run.root), WANDB_NAME=run.root.name, WANDB_PROJECT=env.get("WANDB_PROJECT", "lmtuner"),
            WANDB_CACHE_DIR=str(run.root / "wandb" / "cache"), WANDB_DATA_DIR=str(run.root / "wandb" / "data"),
        )  # fmt: skip
        if "WANDB_MODE" not in env and not env.get("WANDB_API_KEY"):
            extra["WANDB_MODE"] = "offline"
    return extra


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# ---------------------------------------------------------------------------------------------- checking


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
    updates["dataset"], loaded = checked_dataset(config.dataset, roots, "dataset")
    if loaded.skipped:
        warnings.append(f"{len(loaded.skipped)} malformed rows will be skipped; first: {loaded.skipped[0]}")
    if config.eval_dataset is not None:
        updates["eval_dataset"], held_out = checked_dataset(config.eval_dataset, roots, "eval_dataset")
        if updates["eval_dataset"] == updates["dataset"]:
            raise LmtunerError(
                "eval_dataset: it names the training data itself; held-out rows must be rows the model never trains "
                "on — give another file, or omit eval_dataset to hold out a share of dataset (eval_fraction)",
                field="eval_dataset",
            )
    else:
        held_out = held_out_count(len(loaded.examples), config.dataset.eval_fraction)
        if not held_out and config.report.enabled:
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


def check_processes(config: TrainConfig, devices: str) -> None:
    """More processes than GPUs would put two on one GPU: refused, naming what fits."""
    from lmtuner_core.jobs.distributed import count_devices, processes_per_node

    gpus = count_devices(devices)
    if gpus and processes_per_node(config.model_dump(), devices) > gpus:
        raise LmtunerError(
            f"processes_per_node: {config.processes_per_node} processes but the job has {gpus} GPU(s) ({devices}); "
            f"use at most {gpus}, or 'auto'",
            field="processes_per_node",
        )


# ---------------------------------------------------------------------------------------------- running


class JobService:
    """The job operations the tools and the CLI share."""

    def __init__(self, home: Path, roots: AllowedRoots, ray_addresses: RayAddresses | None = None):
        self.home = home
        self.roots = roots
        # The Ray clusters a job may be sent to; unconfined by default, as AllowedRoots(None) (the CLI).
        self.ray_addresses = ray_addresses or RayAddresses(None)
        self.store = JobStore(home)
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
        """Checks the config and its memory need and, unless dry_run, records the job and starts it if its
        devices are free. A job that would not fit its devices is refused unless force. `gate(checked, devices)`,
        called once everything is checked and before anything is written, may hold the start back (False): the
        answer is then that of a dry run (start_training's confirmation before spending)."""
        job_id = new_job_id()
        run = self.run_dir(job_id)
        if config.ray is not None:  # what the server reaches and writes is checked first, before any connection
            config = self._confine_ray(config)
        checked, warnings = check_config(config, self.roots, run, dry_run=dry_run)
        if checked.ray is not None:
            return self._submit_to_ray(checked, job_id, warnings, dry_run=dry_run, gate=gate)
        devices = resolve_devices(checked.devices)
        check_processes(checked, devices)
        warnings += preflight(checked, devices, refuse=not force)  # a dry run is refused as the real start is
        needs_cuda = METHODS[checked.method].needs_cuda
        if needs_cuda and devices == "cpu":
            raise LmtunerError(f"method: {checked.method!r} needs a CUDA GPU ({needs_cuda})", field="method")
        if checked.liger is True and (devices == "cpu" or importlib.util.find_spec("liger_kernel") is None):
            why = "a CPU job (Triton has no CPU driver)" if devices == "cpu" else "liger-kernel is not installed"
            raise LmtunerError(
                f"liger: true cannot run for {why}; use 'auto' (on where it can run) or false", field="liger"
            )
        if dry_run or (gate is not None and not gate(checked, devices)):
            return None, checked, warnings
        try:
            run.root.mkdir(parents=True)
            run.config.write_text(checked.to_json(), encoding="utf-8")
            write_deepspeed_config(checked.model_dump(), run.root, on_gpu=devices != "cpu")
        except OSError as exc:
            raise LmtunerError(f"cannot write the run folder {run.root}: {exc.strerror}; free disk space") from None
        self.store.create(
            job_id=job_id, run_dir=run.root, model=checked.model, method=checked.method,
            output_dir=Path(checked.output_dir or run.default_output), devices=devices,
        )  # fmt: skip
        self.schedule()
        record = self.store.get(job_id)
        if record is not None and record.status == "queued":
            warnings.append(f"queued: devices {devices} are busy; the job starts when they are free")
        return record, checked, warnings

    def _submit_to_ray(
        self,
        checked: TrainConfig,
        job_id: str,
        warnings: list[str],
        *,
        dry_run: bool,
        gate: Callable[[TrainConfig, str], bool] | None = None,
    ) -> tuple[JobRecord | None, TrainConfig, list[str]]:
        """A job for a Ray cluster: the cluster is reached and its resources compared with the request before
        anything is written; then the job is submitted there and recorded with its Ray job id."""
        from lmtuner_core.jobs import ray_launcher

        assert checked.ray is not None
        warnings += ray_launcher.check_cluster(checked.ray, self.ray_addresses)
        if dry_run or (gate is not None and not gate(checked, "ray")):
            return None, checked, warnings
        run = self.run_dir(job_id)
        try:
            run.root.mkdir(parents=True)
            run.config.write_text(checked.to_json(), encoding="utf-8")
        except OSError as exc:
            raise LmtunerError(f"cannot write the run folder {run.root}: {exc.strerror}; free disk space") from None
        self.store.create(
            job_id=job_id, run_dir=run.root, model=checked.model, method=checked.method,
            output_dir=Path(checked.output_dir or run.default_output), devices="ray",
        )  # fmt: skip
        self._send_to_ray(job_id, checked, f"lmtuner-{job_id}")
        return self.store.get(job_id), checked, warnings

    def _confine_ray(self, config: TrainConfig) -> TrainConfig:
        """The config with ray.address checked against the owner's list of clusters and a local storage_path
        resolved inside the allowed roots (like output_dir); connects to nothing."""
        from lmtuner_core.jobs import ray_launcher

        assert config.ray is not None
        self.ray_addresses.check(config.ray.address, "ray.address")
        if config.ray.storage_path is None:
            return config
        storage = ray_launcher.confine_storage_path(config.ray.storage_path, self.roots)
        return config.model_copy(update={"ray": config.ray.model_copy(update={"storage_path": storage})})

    def _send_to_ray(self, job_id: str, config: TrainConfig, ray_job_id: str) -> None:
        """Submits the job to its cluster and marks it running there (failed, with the reason, if refused)."""
        from lmtuner_core.jobs import ray_launcher

        assert config.ray is not None
        run = self.run_dir(job_id)
        env = ray_launcher.job_environment(self.home, tracker_environment(run, dict(os.environ)))
        try:
            ray_launcher.submit(run, config, ray_job_id, env)
        except LmtunerError as exc:
            self.store.update(job_id, status="failed", finished_at=time.time(), error=str(exc))
            raise
        self.store.update(
            job_id, status="running", started_at=time.time(), claimed_at=time.time(), ray_job_id=ray_job_id,
            ray_address=config.ray.address,
        )  # fmt: skip

    def schedule(self) -> list[str]:
        """Starts every queued job whose devices are free; returns their ids."""
        reap_finished()
        for record in self.store.list(statuses=("running",)):
            self.refresh(record, schedule=False)
        started: list[str] = []
        if not self.store.count("queued"):
            return started  # the common case: no write transaction needed
        for job_id in self.store.claim_startable(cpu_slots=cpu_job_slots()):
            self._spawn(job_id)
            started.append(job_id)
        return started

    def _spawn(self, job_id: str) -> None:
        run = self.run_dir(job_id)
        record = self.store.get(job_id)
        env = child_environment(
            {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "LMTUNER_HOME": str(self.home)}
        )
        if record is not None and record.devices != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = record.devices
        env["LMTUNER_DEVICES"] = record.devices if record is not None else "cpu"  # the supervisor's launch plan
        env.update(tracker_environment(run, env))
        try:
            pid, started_at = spawn_supervised(run, env)
        except OSError as exc:
            self.store.update(job_id, status="failed", finished_at=time.time(), error=f"could not start: {exc}")
            return
        self.store.update(job_id, started_at=time.time(), pid=pid, pid_started_at=started_at)

    # -------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        reap_finished()
        record = self.store.get(job_id)
        if record is None:
            raise NotFoundError(f"job_id: no job {shown(job_id)}; list_jobs shows the jobs there are", field="job_id")
        return self.refresh(record)

    def refresh(self, record: JobRecord, *, schedule: bool = True) -> JobRecord:
        """Brings a non-final record up to date with the run folder and the process table; when a job has
        ended, starts what was waiting for its devices."""
        if record.status in TERMINAL:
            return record
        if record.ray_job_id is not None:
            return self._refresh_ray(record)
        run = RunDir(Path(record.run_dir))
        if record.status == "running" and record.pid is None:
            claimed = record.claimed_at or record.created_at
            if time.time() - claimed > CLAIM_TIMEOUT_SECONDS:  # its starter died between claim and spawn
                self.store.update(record.job_id, only_if_status=("running",), status="queued", claimed_at=None)
                if schedule:
                    self.schedule()
            return self.store.get(record.job_id) or record
        if record.status == "queued":
            # Whoever watches only a queued job must still see it start once the job ahead of it has died.
            if schedule and record.job_id in self.schedule():
                return self.store.get(record.job_id) or record
            return record
        if run.read_state().get("status") in TERMINAL or not alive(record.pid, record.pid_started_at):  # type: ignore[arg-type]
            reap(record.pid)
            self.conclude(record)
            if schedule:
                self.schedule()
        return self.store.get(record.job_id) or record

    def _refresh_ray(self, record: JobRecord) -> JobRecord:
        """A Ray job's status, asked of its cluster by its Ray job id (so any server, restarted or not, follows
        it). While the cluster cannot be reached the job stays as last seen."""
        from lmtuner_core.jobs import ray_launcher

        try:
            ray_status, message = ray_launcher.job_info(record.ray_address or "", record.ray_job_id or "")
        except LmtunerError:
            return record
        if ray_status == "SUCCEEDED":
            self._finish(record, "completed", None, 0)
        elif ray_status == "STOPPED":
            self._finish(record, "cancelled", None, None)
        elif ray_status in ("FAILED", "GONE"):
            state = RunDir(Path(record.run_dir)).read_state()
            error = state.get("error") if state.get("status") == "failed" else None
            # Ray's message goes on with the driver's last output (paths of the cluster's machines, tracebacks),
            # which the driver also wrote into train.log: the job's error keeps Ray's first line.
            lines = (message or "").strip().splitlines()
            said = lines[0][:300] if lines else "no message from Ray"
            error = error or f"Ray job {record.ray_job_id}: {said} (the job's output is in train.log)"
            self._finish(record, "failed", error, None)
        return self.store.get(record.job_id) or record

    def conclude(self, record: JobRecord) -> None:
        """Records how a job whose process has ended (or is ending) finished."""
        run = RunDir(Path(record.run_dir))
        state = run.read_state()
        code = run.read_exit_code()
        if state.get("status") in TERMINAL:
            self._finish(record, state["status"], state.get("error"), code)
        elif record.cancel_requested:
            self._finish(record, "cancelled", None, code)
        else:
            self._finish(record, "failed", exit_reason(code, run), code)

    def _finish(self, record: JobRecord, status: str, error: str | None, code: int | None) -> None:
        self.store.update(
            record.job_id, only_if_status=("queued", "running"), status=status, error=error,
            exit_code=code, finished_at=time.time(),
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
        return progress

    # -------------------------------------------------------------------------------------------- resume

    def resume(self, job_id: str) -> tuple[JobRecord, TrainConfig]:
        """Puts a failed or cancelled job back on the queue, to continue from its newest checkpoint with the
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
        if record.ray_job_id is not None and config.ray is not None:
            return self._resume_on_ray(record, config)
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise LmtunerError(
                f"job_id: job {job_id} saved no checkpoint before it stopped, so there is nothing to resume; start "
                "it again (a smaller save_steps keeps more progress next time)",
                field="job_id",
            )
        config = TrainConfig.model_validate({**config.model_dump(), "resume_from": str(checkpoint)})
        run.config.write_text(config.to_json(), encoding="utf-8")
        for stale in (run.state, run.exit):
            stale.unlink(missing_ok=True)
        with run.log.open("a", encoding="utf-8") as log:
            log.write(f"[lmtuner] resuming from {checkpoint}\n")
        self.store.update(
            job_id, only_if_status=("failed", "cancelled"), status="queued", error=None, exit_code=None,
            finished_at=None, pid=None, pid_started_at=None, cancel_requested=0, claimed_at=None,
        )  # fmt: skip
        self.schedule()
        return self.store.get(job_id), config  # type: ignore[return-value]

    def _resume_on_ray(self, record: JobRecord, config: TrainConfig) -> tuple[JobRecord, TrainConfig]:
        """Submits the job again, under a new Ray job id, from the newest checkpoint Ray Train kept in
        storage_path (Ray Train restores the same run from there)."""
        from lmtuner_core.jobs import ray_launcher

        assert config.ray is not None
        run = RunDir(Path(record.run_dir))
        where = ray_launcher.storage_path(config, run)
        if "://" in where:
            raise LmtunerError(
                f"job_id: job {record.job_id} keeps its checkpoints in {where}, and resume_job reads them from a "
                "folder; start a new job with resume_from set to a downloaded checkpoint",
                field="job_id",
            )
        checkpoint = ray_launcher.latest_ray_checkpoint(config, run)
        if checkpoint is None:
            raise LmtunerError(
                f"job_id: job {record.job_id} has no checkpoint in {where}, so "
                "there is nothing to resume; start it again (a smaller save_steps keeps more progress next time)",
                field="job_id",
            )
        ray_launcher.check_cluster(config.ray, self.ray_addresses)
        config = TrainConfig.model_validate({**config.model_dump(), "resume_from": str(checkpoint)})
        run.config.write_text(config.to_json(), encoding="utf-8")
        run.state.unlink(missing_ok=True)
        with run.log.open("a", encoding="utf-8") as log:
            log.write(f"[lmtuner] resuming on the Ray cluster from {checkpoint}\n")
        self.store.update(
            record.job_id, only_if_status=("failed", "cancelled"), status="queued", error=None, exit_code=None,
            finished_at=None, cancel_requested=0,
        )  # fmt: skip
        self._send_to_ray(record.job_id, config, f"lmtuner-{record.job_id}-{secrets.token_hex(3)}")
        return self.store.get(record.job_id), config  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------------- cancel

    def cancel(self, job_id: str, grace_seconds: float = 20.0) -> JobRecord:
        """Asks the training process to stop (SIGTERM: it saves a checkpoint and exits), then kills its process
        group if it has not exited within grace_seconds. A queued job is simply taken off the queue."""
        record = self.get(job_id)
        if record.status in TERMINAL:
            return record
        self.store.update(job_id, cancel_requested=1)
        if record.ray_job_id is not None:
            from lmtuner_core.jobs import ray_launcher

            # Ray stops the driver (SIGTERM, then SIGKILL) and with it every worker; the last checkpoint stays.
            ray_status = ray_launcher.stop(record.ray_address or "", record.ray_job_id, grace_seconds)
            if ray_status not in (*ray_launcher.TERMINAL_RAY_STATUSES, "GONE"):
                raise LmtunerError(
                    f"job_id: the Ray cluster has not stopped job {record.ray_job_id} yet (it is {ray_status}); "
                    "call cancel_job again",
                    field="job_id",
                )
            if ray_status == "SUCCEEDED":
                return self.refresh(record)  # it finished before the stop reached it
            self._finish(record, "cancelled", None, None)
            return self.get(job_id)
        if record.pid is None or not alive(record.pid, record.pid_started_at):
            self._finish(record, "cancelled", None, None)
            return self.get(job_id)
        signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and alive(record.pid, record.pid_started_at):
            time.sleep(0.1)
        if alive(record.pid, record.pid_started_at):
            signal_group(record.pid, signal.SIGKILL)
            time.sleep(0.2)
        record = self.refresh(self.store.get(job_id))  # type: ignore[arg-type]
        if record.status == "failed":  # killed during cancel: that is what was asked for
            self.store.update(job_id, status="cancelled", error=None)
        return self.store.get(job_id)  # type: ignore[return-value]
