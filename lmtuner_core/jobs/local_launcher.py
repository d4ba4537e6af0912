"""The local backend: this machine's queue, its supervisor and torchrun.

A job is recorded `queued` with the devices it will hold; `start_queued` claims queued jobs whose devices are free
(in one SQLite write transaction, so two servers never start the same job or overbook a GPU) and spawns each under
`lmtuner_core.jobs.supervisor` in its own session, which runs `python -m lmtuner_core.training.train RUN_DIR` (or
torchrun over it, jobs/distributed.py). Whoever looks next — a server, the CLI, or the supervisor of a job that
just ended — concludes finished jobs from their run folders and starts the next.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import psutil

from lmtuner_core.config import TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.jobs.launcher import LOCAL, Ending, LaunchContext, Placement, tracker_environment
from lmtuner_core.jobs.processes import alive, exit_reason, reap, reap_finished, signal_group, spawn_supervised
from lmtuner_core.jobs.store import TERMINAL, JobRecord
from lmtuner_core.methods import METHODS
from lmtuner_core.run import RunDir
from lmtuner_core.secrets import child_environment

# A job claimed for starting but still without a process after this long lost its starter: queue it again.
CLAIM_TIMEOUT_SECONDS = 60.0


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


class LocalLauncher:
    """Jobs on this machine: booked on its GPUs (or CPU slots) by the store's queue, run by a supervisor."""

    name = LOCAL

    def __init__(self, context: LaunchContext):
        self.context = context
        self.store = context.store

    def confine(self, config: TrainConfig) -> TrainConfig:
        return config  # output_dir and the data are held to the roots by check_config, as for every backend

    def check(self, config: TrainConfig, *, force: bool) -> Placement:
        devices = resolve_devices(config.devices)
        check_processes(config, devices)
        warnings = preflight(config, devices, refuse=not force)  # a dry run is refused as the real start is
        needs_cuda = METHODS[config.method].needs_cuda
        if needs_cuda and devices == "cpu":
            raise LmtunerError(f"method: {config.method!r} needs a CUDA GPU ({needs_cuda})", field="method")
        if config.liger is True and (devices == "cpu" or importlib.util.find_spec("liger_kernel") is None):
            why = "a CPU job (Triton has no CPU driver)" if devices == "cpu" else "liger-kernel is not installed"
            raise LmtunerError(
                f"liger: true cannot run for {why}; use 'auto' (on where it can run) or false", field="liger"
            )
        return Placement(devices=devices, warnings=warnings, on_gpu=devices != "cpu")

    def submit(self, record: JobRecord, run: RunDir, config: TrainConfig) -> str | None:
        return None  # it waits on this machine's queue: start_queued starts it when its devices are free

    def start_queued(self) -> list[str]:
        reap_finished()
        if not self.store.count("queued"):
            return []  # the common case: no write transaction needed
        started = []
        for job_id in self.store.claim_startable(cpu_slots=cpu_job_slots()):
            self._spawn(job_id)
            started.append(job_id)
        return started

    def _spawn(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            return
        run = RunDir(self.context.home / "runs" / job_id)
        env = child_environment(
            {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "LMTUNER_HOME": str(self.context.home)}
        )
        if record.devices != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = record.devices
        env["LMTUNER_DEVICES"] = record.devices  # the supervisor's launch plan
        env.update(tracker_environment(run, env))
        try:
            pid, started_at = spawn_supervised(run, env)
        except OSError as exc:
            self.store.update(job_id, status="failed", finished_at=time.time(), error=f"could not start: {exc}")
            return
        self.store.update(job_id, started_at=time.time(), pid=pid, pid_started_at=started_at)

    def poll(self, record: JobRecord) -> Ending | None:
        if record.pid is None:
            claimed = record.claimed_at or record.created_at
            if time.time() - claimed > CLAIM_TIMEOUT_SECONDS:  # its starter died between claim and spawn
                self.store.update(record.job_id, only_if_status=("running",), status="queued", claimed_at=None)
            return None
        run = RunDir(Path(record.run_dir))
        if run.read_state().get("status") in TERMINAL or not alive(record.pid, record.pid_started_at):
            reap(record.pid)
            return self.ending(record)
        return None

    def ending(self, record: JobRecord) -> Ending:
        """How a job whose process has ended (or is ending: its supervisor asks) finished, from its run folder."""
        run = RunDir(Path(record.run_dir))
        state = run.read_state()
        code = run.read_exit_code()
        if state.get("status") in TERMINAL:
            return Ending(state["status"], state.get("error"), code)
        if record.cancel_requested:
            return Ending("cancelled", None, code)
        return Ending("failed", exit_reason(code, run), code)

    def stop(self, record: JobRecord, grace_seconds: float) -> Ending | None:
        """SIGTERM to the supervisor's process group (the trainer saves a checkpoint and exits), SIGKILL after
        grace_seconds."""
        if record.pid is None or not alive(record.pid, record.pid_started_at):
            return Ending("cancelled")
        signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and alive(record.pid, record.pid_started_at):
            time.sleep(0.1)
        if alive(record.pid, record.pid_started_at):
            signal_group(record.pid, signal.SIGKILL)
            time.sleep(0.2)
        return None

    def resume(self, record: JobRecord, config: TrainConfig, run: RunDir) -> tuple[TrainConfig, str]:
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise LmtunerError(
                f"job_id: job {record.job_id} saved no checkpoint before it stopped, so there is nothing to resume; "
                "start it again (a smaller save_steps keeps more progress next time)",
                field="job_id",
            )
        config = TrainConfig.model_validate({**config.model_dump(), "resume_from": str(checkpoint)})
        return config, f"[lmtuner] resuming from {checkpoint}"

    def view(self, record: JobRecord) -> None:
        return None
