"""The Ray backend: jobs checked against the cluster, submitted through Ray's Jobs API and trained there by Ray
Train's TorchTrainer (training/ray_worker.py, the cluster side).

Stdlib, httpx and pydantic at import; ray only inside the calls. `RayLauncher.check` reaches the cluster's dashboard
and compares what the job asks for with what its nodes have, before anything is submitted (planning/ray_cluster.py
reads the cluster); `submit` hands the job to the Jobs API (JobSubmissionClient) with a runtime_env that ships
lmtuner_core; `poll` and `stop` follow and end it by its Ray job id, which the job store keeps in the job's handle,
so a restarted server reattaches. The run folder, the data, the model and output_dir must be on storage every node
sees at the same path (docs/CLUSTER.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.jobs.launcher import Ending, LaunchContext, Placement, handle_json, read_handle, tracker_environment
from lmtuner_core.jobs.store import JobRecord
from lmtuner_core.paths import AllowedRoots

# Cluster inspection and worker planning live in planning/; these names stay importable from here.
from lmtuner_core.planning.ray_cluster import (  # noqa: F401
    DASHBOARD_PORT,
    RAY_ADDRESSES_ENV,
    REACH_TIMEOUT_SECONDS,
    RayAddresses,
    RayClusterReport,
    RayNode,
    _no_redirects,
    _reach,
    check_cluster,
    cluster_failure,
    cluster_report,
    dashboard_origin,
    dashboard_url,
    describe_resources,
    plan_workers,
    workers_that_fit,
)
from lmtuner_core.run import RunDir
from lmtuner_core.training.ray_worker import ATTEMPTS_FILE, RAY_STORAGE_DIR, latest_ray_checkpoint, storage_path  # noqa: F401

RAY_WORKER_MODULE = "lmtuner_core.training.ray_worker"  # the Ray job's entry point (its driver)
TERMINAL_RAY_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# storage_path schemes of remote storage, passed to Ray as given; file:// and local:// (pyarrow's local disk) and
# plain paths are folders here, held to the allowed roots; any other scheme is refused.
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
LOCAL_STORAGE_SCHEMES = ("file", "local")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RayWorker(BaseModel):
    rank: int = Field(description="The worker's torch.distributed rank.")
    node_ip: str = Field(description="IP address of the node it runs on.")
    pid: int = Field(description="Its process id on that node (a ray::RayTrainWorker process).")


class RayJobView(BaseModel):
    """How a job runs on its Ray cluster, read from the store and the run folder."""

    job_id: str = Field(description="The Ray job's submission id (Ray dashboard, `ray job status ID`).")
    address: str = Field(description="The cluster's address.")
    attempts: int = Field(0, description="Times the worker group started in this submission (1 = no restart).")
    restarts: int = Field(0, description="Worker-group restarts after a failure (each from the last checkpoint).")
    resumed_from: str | None = Field(None, description="The checkpoint the current attempt started from.")
    workers: list[RayWorker] = Field(default_factory=list, description="The current attempt's workers.")
    nodes: list[str] = Field(default_factory=list, description="IP addresses of the nodes the workers run on.")


_CLIENTS: dict[str, object] = {}  # one JobSubmissionClient per dashboard: making one costs a version check


def _client(address: str, field: str = "ray.address"):
    """A JobSubmissionClient for the cluster. The dashboard is probed first with a timeout on every use, since
    Ray's client (requests) waits without one: a cluster gone quiet is an error in seconds, not a hang. Callers
    check the address against the owner's list first (cluster_report); a recorded job's address passed it."""
    url = dashboard_url(address, field)
    _reach(url, field)
    if url in _CLIENTS:
        return _CLIENTS[url]
    from ray.job_submission import JobSubmissionClient

    try:
        client = _CLIENTS[url] = _no_redirects(JobSubmissionClient)(url)
    except Exception as exc:  # requests' exceptions, Ray's RuntimeError/ValueError: none is quoted
        raise cluster_failure(field, "reaching the Ray Jobs API", url, exc) from None
    return client


def confine_storage_path(value: str, roots: AllowedRoots, field: str = "ray.storage_path") -> str:
    """storage_path as Ray will get it: a remote store's URI (s3://, gs://, abfss://, hdfs:// …) as given; a folder
    on this machine's disk (a plain, relative or ~ path, or a file:// or local:// URI, which pyarrow maps to the
    local disk) resolved inside the allowed roots and given as a plain absolute path; any other scheme refused.
    Connects to nothing."""
    match = _SCHEME.match(value)
    if match is None:
        return str(roots.resolve(value, field))
    scheme = match.group(1).lower()
    if scheme in REMOTE_STORAGE_SCHEMES:
        return value
    remote = ", ".join(f"{name}://" for name in REMOTE_STORAGE_SCHEMES)
    accepted = f"a folder such as '/shared/checkpoints', or a URI of {remote}"
    if scheme not in LOCAL_STORAGE_SCHEMES:
        raise LmtunerError(
            f"{field}: {shown(value)} has a scheme Ray's storage does not use here; accepted: {accepted}", field=field
        )
    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise LmtunerError(
            f"{field}: {shown(value)} is not a plain {scheme}:// URI of a folder on this machine (no host, query or "
            f"fragment); accepted: {accepted}",
            field=field,
        )
    return str(roots.resolve(unquote(parts.path), field))


def job_environment(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """The variables the job's driver and workers get through the runtime_env (never secrets: Ray shows them)."""
    return {
        "LMTUNER_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise each worker line reaches the job log twice
        "RAY_COLOR_PREFIX": "0",  # plain '(RayTrainWorker pid=…)' prefixes in train.log, no terminal colours
        **extra,
    }


def submit(run: RunDir, config: TrainConfig, ray_job_id: str, env: dict[str, str]) -> None:
    """Submits the job to the cluster's Jobs API and returns at once (the cluster queues and runs it)."""
    assert config.ray is not None
    client = _client(config.ray.address)
    import lmtuner_core

    python = config.ray.python or sys.executable  # the job's bare `python` would be whatever PATH `ray start` had
    try:
        client.submit_job(
            entrypoint=shlex.join([python, "-m", RAY_WORKER_MODULE, str(run.root), ray_job_id]),
            submission_id=ray_job_id,
            runtime_env={
                "py_modules": [str(Path(lmtuner_core.__file__).parent)],  # this server's lmtuner_core, on every node
                "excludes": ["__pycache__"],
                "env_vars": env,
            },
            metadata={"lmtuner_job": run.root.name},
        )
    except Exception as exc:  # the client raises RuntimeError for HTTP errors, ConnectionError for the network
        url = dashboard_url(config.ray.address)
        raise cluster_failure("ray.address", "submitting the job to the Ray cluster", url, exc) from None


def job_info(address: str, ray_job_id: str) -> tuple[str, str | None]:
    """The Ray job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; GONE when the cluster does not know
    it) and Ray's message."""
    client = _client(address)
    try:
        info = client.get_job_info(ray_job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return "GONE", f"the Ray cluster at {address} does not know job {ray_job_id} (was it restarted?)"
        raise cluster_failure("job_id", f"reading Ray job {ray_job_id}", address, exc) from None
    except Exception as exc:  # requests' network errors, a refused redirect
        raise cluster_failure("job_id", f"reading Ray job {ray_job_id}", address, exc) from None
    return str(getattr(info.status, "value", info.status)), info.message


def stop(address: str, ray_job_id: str, timeout: float) -> str:
    """Stops the Ray job (its driver, and with it every worker) and waits for Ray to say so; returns its status."""
    client = _client(address)
    try:
        client.stop_job(ray_job_id)
    except RuntimeError:
        pass  # already finished
    except Exception as exc:  # requests' network errors, a refused redirect
        raise cluster_failure("job_id", f"stopping Ray job {ray_job_id}", address, exc) from None
    deadline = time.monotonic() + max(timeout, 5.0)
    status = "RUNNING"
    while time.monotonic() < deadline:
        status, _ = job_info(address, ray_job_id)
        if status in (*TERMINAL_RAY_STATUSES, "GONE"):
            break
        time.sleep(0.25)
    return status


def read_view(run: RunDir, ray_job_id: str, address: str) -> RayJobView:
    """The Ray side of job_status: this submission's attempts and the current attempt's workers."""
    attempts = []
    with contextlib.suppress(OSError):
        for line in (run.root / ATTEMPTS_FILE).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("ray_job_id") == ray_job_id:
                    attempts.append(record)
    current = attempts[-1] if attempts else {}
    workers = [RayWorker.model_validate(w) for w in current.get("workers", [])]
    return RayJobView(
        job_id=ray_job_id, address=address, attempts=len(attempts), restarts=max(0, len(attempts) - 1),
        resumed_from=current.get("resumed_from"), workers=workers,
        nodes=sorted({w.node_ip for w in workers}),
    )  # fmt: skip


class RayLauncher:
    """Jobs on a Ray cluster (TrainConfig `ray`). Handle: {"address": the cluster, "job_id": the Ray submission id}."""

    name = "ray"

    def __init__(self, context: LaunchContext):
        self.context = context
        # The Ray clusters a job may be sent to; unconfined by default, as AllowedRoots(None) (the CLI).
        self.addresses: RayAddresses = context.settings.get("ray") or RayAddresses(None)

    def confine(self, config: TrainConfig) -> TrainConfig:
        """ray.address checked against the owner's list of clusters and a local storage_path resolved inside the
        allowed roots (like output_dir); connects to nothing."""
        assert config.ray is not None
        self.addresses.check(config.ray.address, "ray.address")
        if config.ray.storage_path is None:
            return config
        storage = confine_storage_path(config.ray.storage_path, self.context.roots)
        return config.model_copy(update={"ray": config.ray.model_copy(update={"storage_path": storage})})

    def check(self, config: TrainConfig, *, force: bool) -> Placement:
        """The cluster is reached and its resources compared with the request (Ray places the workers)."""
        assert config.ray is not None
        warnings = check_cluster(config.ray, self.addresses)
        return Placement(devices=self.name, warnings=warnings, on_gpu=config.ray.use_gpu)

    def submit(self, record: JobRecord, run: RunDir, config: TrainConfig) -> str:
        """Submits to the cluster under `lmtuner-JOB` (a resubmission after resume_job under a new id)."""
        assert config.ray is not None
        ray_job_id = f"lmtuner-{record.job_id}"
        if record.handle is not None:
            ray_job_id += f"-{secrets.token_hex(3)}"
        env = job_environment(self.context.home, tracker_environment(run, dict(os.environ)))
        submit(run, config, ray_job_id, env)
        return handle_json(address=config.ray.address, job_id=ray_job_id)

    def start_queued(self) -> list[str]:
        return []  # the cluster queues its jobs

    def poll(self, record: JobRecord) -> Ending | None:
        """The job's status, asked of its cluster by its Ray job id; None while the cluster cannot be reached."""
        handle = read_handle(record)
        if not handle.get("job_id"):
            return None
        try:
            ray_status, message = job_info(handle.get("address") or "", handle["job_id"])
        except LmtunerError:
            return None
        if ray_status == "SUCCEEDED":
            return Ending("completed", None, 0)
        if ray_status == "STOPPED":
            return Ending("cancelled")
        if ray_status in ("FAILED", "GONE"):
            state = RunDir(Path(record.run_dir)).read_state()
            error = state.get("error") if state.get("status") == "failed" else None
            # Ray's message goes on with the driver's last output (paths of the cluster's machines, tracebacks),
            # which the driver also wrote into train.log: the job's error keeps Ray's first line.
            lines = (message or "").strip().splitlines()
            said = lines[0][:300] if lines else "no message from Ray"
            return Ending("failed", error or f"Ray job {handle['job_id']}: {said} (the job's output is in train.log)")
        return None

    def stop(self, record: JobRecord, grace_seconds: float) -> Ending | None:
        """Ray stops the driver (SIGTERM, then SIGKILL) and with it every worker; the last checkpoint stays."""
        handle = read_handle(record)
        if not handle.get("job_id"):
            return Ending("cancelled")  # never reached the cluster
        ray_status = stop(handle.get("address") or "", handle["job_id"], grace_seconds)
        if ray_status not in (*TERMINAL_RAY_STATUSES, "GONE"):
            raise LmtunerError(
                f"job_id: the Ray cluster has not stopped job {handle['job_id']} yet (it is {ray_status}); "
                "call cancel_job again",
                field="job_id",
            )
        if ray_status == "SUCCEEDED":
            return None  # it finished before the stop reached it: poll says so
        return Ending("cancelled")

    def resume(self, record: JobRecord, config: TrainConfig, run: RunDir) -> tuple[TrainConfig, str]:
        """From the newest checkpoint Ray Train kept in storage_path (Ray Train restores the same run from there)."""
        if config.ray is None:
            raise LmtunerError(f"job_id: job {record.job_id}'s config.json has no `ray` settings", field="job_id")
        where = storage_path(config, run)
        if "://" in where:
            raise LmtunerError(
                f"job_id: job {record.job_id} keeps its checkpoints in {where}, and resume_job reads them from a "
                "folder; start a new job with resume_from set to a downloaded checkpoint",
                field="job_id",
            )
        checkpoint = latest_ray_checkpoint(config, run)
        if checkpoint is None:
            raise LmtunerError(
                f"job_id: job {record.job_id} has no checkpoint in {where}, so "
                "there is nothing to resume; start it again (a smaller save_steps keeps more progress next time)",
                field="job_id",
            )
        check_cluster(config.ray, self.addresses)
        config = TrainConfig.model_validate({**config.model_dump(), "resume_from": str(checkpoint)})
        return config, f"[lmtuner] resuming on the Ray cluster from {checkpoint}"

    def view(self, record: JobRecord) -> RayJobView | None:
        handle = read_handle(record)
        if not handle.get("job_id"):
            return None
        return read_view(RunDir(Path(record.run_dir)), handle["job_id"], handle.get("address") or "")
