"""The launcher seam: where a job's training processes run — this machine (`local`), a Ray cluster (`ray`), later
a Slurm cluster (`slurm`) — behind one protocol, so `JobService` has no backend branches.

The job store keeps, per job, the backend's name (`JobRecord.backend`) and an opaque handle (`JobRecord.handle`,
JSON text only the backend reads: a Ray submission id and the cluster's address; a Slurm job id), so any server
— restarted, or another process — rebuilds the launcher from the record and follows the job (`poll`, `stop`,
`view`): that is how it attaches after a restart. The run folder (config.json, state.json, train.log, metrics,
checkpoints; `lmtuner_core.run`) is the contract every backend's training entry point writes, whatever ran it.

## Adding a backend

One new module, its config block, one registry line:

1. `TrainConfig.<name>`: a settings block (`None` = not this backend), in `lmtuner_core/config.py`; its validator
   refuses the fields the backend cannot honour (as `ray` refuses `nodes` and `deepspeed`).
2. A module `lmtuner_core/jobs/<name>_launcher.py` with a class implementing `Launcher` below (read the
   docstrings of each method: they are the contract), built with `(context: LaunchContext)`.
   Its training entry point (the command it submits, run on the cluster) calls
   `lmtuner_core.training.train.run_recipe` (start, stop on signal, final state, peak memory), as the local
   and Ray entry points do, so state.json reads the same whatever ran the job.
3. One line in `BACKENDS` below: `Backend("<name>", "<TrainConfig field>", "<module>:<Class>")`.
   The module is imported only when a job of that backend is submitted or read (the server starts without it).

Then `job_status` shows the backend's `view` under a `JobProgress` field of the backend's name (declare it in
`jobs/progress.py`, typed by the view's model), and `inspect_gpus` / `propose_config` read the cluster through
`planning/` (a cluster's inspection and worker planning are planning, not launching).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmtuner_core.errors import LmtunerError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lmtuner_core.config import TrainConfig
    from lmtuner_core.jobs.store import JobRecord, JobStore
    from lmtuner_core.paths import AllowedRoots
    from lmtuner_core.run import RunDir

LOCAL = "local"


@dataclass(frozen=True)
class Backend:
    """One registry entry: the backend's name (kept in the job store), the TrainConfig field that selects it,
    and where its Launcher class is ("module:Class", imported on first use)."""

    name: str
    config_field: str | None
    launcher: str


# The registry. A job runs on the first backend whose config field is set, else on this machine.
BACKENDS: tuple[Backend, ...] = (
    Backend(LOCAL, None, "lmtuner_core.jobs.local_launcher:LocalLauncher"),
    Backend("ray", "ray", "lmtuner_core.jobs.ray_launcher:RayLauncher"),
    Backend("slurm", "slurm", "lmtuner_core.jobs.slurm_launcher:SlurmLauncher"),
)


@dataclass
class LaunchContext:
    """What every launcher is built with: the state folder, the allowed roots, the job store, and the owner's
    per-backend settings (keyed by backend name, e.g. "ray": the RayAddresses the server may reach)."""

    home: Path
    roots: AllowedRoots
    store: JobStore
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Placement:
    """The answer of `Launcher.check`: the job can run here. `devices` is what the store and job_status show it
    holding ('cpu', '0,1' — the local queue books these —, or the backend's name for a cluster job)."""

    devices: str
    warnings: list[str] = field(default_factory=list)
    on_gpu: bool = False  # whether its processes get GPUs (a generated DeepSpeed JSON pins memory only then)


@dataclass
class Ending:
    """How a job ended, as its backend saw it: the store records it."""

    status: str  # completed | failed | cancelled
    error: str | None = None
    exit_code: int | None = None


class Launcher(Protocol):
    """What a backend implements. Every method takes plain values and the job's store record; errors for users are
    `LmtunerError`s naming the field (`ray.num_workers`, `slurm.partition`, `job_id`) and what would be accepted.
    A method that reaches a cluster must give up within seconds (no hang) when the cluster does not answer."""

    name: str  # the backend's name, as in BACKENDS and the store

    def __init__(self, context: LaunchContext) -> None: ...

    def confine(self, config: TrainConfig) -> TrainConfig:
        """The config with what the server will reach or write for this backend held to the owner's limits
        (allowed cluster addresses, storage paths inside the allowed roots). Connects to nothing; runs before
        the config's paths and data are checked."""
        ...

    def check(self, config: TrainConfig, *, force: bool) -> Placement:
        """Before anything is written or queued: can this job run here? Refuses (LmtunerError) a request the
        machine or cluster cannot give, naming what it has; a memory estimate that does not fit is refused unless
        `force`. Runs for dry runs too. Returns where the job goes and warnings."""
        ...

    def submit(self, record: JobRecord, run: RunDir, config: TrainConfig) -> str | None:
        """Hands a recorded job (status 'queued', its run folder written) to the backend. Returns the handle
        (JSON text, `handle_json`) of a job the backend has taken — the store then marks it running: the cluster
        does its queueing —, or None for a job left on this machine's queue (`start_queued` starts it). Called
        again by resume_job, with the config to resume. Raises LmtunerError when the backend refuses it (the
        job is then recorded failed with that reason)."""
        ...

    def start_queued(self) -> list[str]:
        """Starts the queued jobs of this backend that can start now; returns their ids. Backends whose
        cluster queues the jobs itself return []."""
        ...

    def poll(self, record: JobRecord) -> Ending | None:
        """A running job's ending, if it has ended; None while it runs, or while its cluster cannot be reached
        (the job stays as last seen). Any server calls this from the record alone (after a restart too)."""
        ...

    def stop(self, record: JobRecord, grace_seconds: float) -> Ending | None:
        """Stops a running job: its processes are asked to save a checkpoint and exit, and are killed after
        grace_seconds. Returns its ending when the stop settled it, None when `poll` will tell (the job may
        have finished before the stop reached it). Raises LmtunerError when the backend has not stopped it yet."""
        ...

    def resume(self, record: JobRecord, config: TrainConfig, run: RunDir) -> tuple[TrainConfig, str]:
        """For resume_job on a failed or cancelled job: the config to run again (resume_from set to the newest
        complete checkpoint the backend kept) and the log line saying so; refuses (LmtunerError, field job_id)
        when there is nothing to resume or the backend cannot take the job back. `submit` runs it next."""
        ...

    def view(self, record: JobRecord) -> BaseModel | None:
        """What job_status shows for this backend under the JobProgress field of its name (the Ray job id, its
        workers and nodes; the Slurm job id, state and nodes); None for the local backend."""
        ...


def handle_json(**values: Any) -> str:
    """A handle as the store keeps it: compact JSON of plain values."""
    return json.dumps(values, separators=(",", ":"), sort_keys=True)


def read_handle(record: JobRecord) -> dict[str, Any]:
    """The record's handle as a dict ({} when it has none or it is unreadable)."""
    try:
        handle = json.loads(record.handle or "{}")
    except ValueError:
        return {}
    return handle if isinstance(handle, dict) else {}


def tracker_environment(run: RunDir, env: dict[str, str]) -> dict[str, str]:
    """Settings for the trackers the run's config.json asks for (none for the others): they write inside the run
    folder, named after the job. wandb runs offline unless the user has a key (or chose a mode); the key itself
    stays in the environment, never in files we write."""
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


def backend_for(config: TrainConfig) -> str:
    """The backend a config selects: the one whose settings block is set, else 'local'. Two blocks at once are
    refused, naming both."""
    chosen = [b for b in BACKENDS if b.config_field and getattr(config, b.config_field, None) is not None]
    if len(chosen) > 1:
        names = " and ".join(f"`{b.config_field}`" for b in chosen)
        raise LmtunerError(
            f"{chosen[1].config_field}: a job runs on one cluster; {names} are both set — keep one",
            field=chosen[1].config_field,
        )
    return chosen[0].name if chosen else LOCAL


def launcher_class(name: str) -> type[Launcher]:
    """The Launcher class registered under `name` (imported now)."""
    for backend in BACKENDS:
        if backend.name == name:
            module, _, attribute = backend.launcher.partition(":")
            return getattr(importlib.import_module(module), attribute)
    known = ", ".join(b.name for b in BACKENDS)
    raise LmtunerError(f"backend: {name!r} is not a launcher of this version (known: {known})", field="backend")


class Launchers:
    """The launchers of one JobService, built on first use and kept (a launcher may hold clients)."""

    def __init__(self, context: LaunchContext):
        self.context = context
        self._built: dict[str, Launcher] = {}

    def __getitem__(self, name: str) -> Launcher:
        if name not in self._built:
            self._built[name] = launcher_class(name)(self.context)
        return self._built[name]

    def for_config(self, config: TrainConfig) -> Launcher:
        return self[backend_for(config)]

    def for_record(self, record: JobRecord) -> Launcher:
        return self[record.backend or LOCAL]

    def built(self) -> list[Launcher]:
        """The launchers built so far, local first (it is always built by the first schedule)."""
        return list(self._built.values())
