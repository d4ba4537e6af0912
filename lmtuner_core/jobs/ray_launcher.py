"""Jobs on a Ray cluster: checked and submitted through Ray's Jobs API, trained by Ray Train's TorchTrainer.

Server side (stdlib, httpx and pydantic at import; ray only inside the calls): `check_cluster` reaches the
cluster's dashboard and compares what the job asks for with what its nodes have, before anything is submitted;
`submit` hands the job to the Jobs API (JobSubmissionClient) with a runtime_env that ships lmtuner_core;
`job_info` and `stop` follow and end it by its Ray job id, which the job store keeps, so a restarted server
reattaches.

Cluster side: the job's entry point, `python -m lmtuner_core.jobs.ray_launcher RUN_DIR RAY_JOB_ID`, runs a
TorchTrainer whose `train_worker` runs our SFTRecipe on each of num_workers ranks with Ray Train's Transformers
integration (prepare_trainer, RayTrainReportCallback): checkpoints go to storage_path, and a restarted worker
group (FailureConfig.max_failures) continues from the newest one. The run folder, the data, the model and
output_dir must be on storage every node sees at the same path (docs/CLUSTER.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field

from lmtuner_core.config import RAY_ADDRESS, RAY_RESOURCE_STEP, RaySettings, TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.jobs.run_folder import RunDir
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.secrets import redact

DASHBOARD_PORT = 8265  # Ray's default; a ray:// address names the client port, the dashboard is here
REACH_TIMEOUT_SECONDS = 5.0
ATTEMPTS_FILE = "ray_attempts.jsonl"  # one line per start of the worker group: who ran where, resumed from what
RAY_STORAGE_DIR = "ray"  # the default storage_path, inside the run folder
TERMINAL_RAY_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
RAY_ADDRESSES_ENV = "LMTUNER_RAY_ADDRESSES"  # the owner's allow-list of clusters, comma-separated
VERSION_ANSWER_LIMIT = 64 * 1024  # bytes of /api/version read: Ray answers about 200
RAY_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,39}")
# storage_path schemes of remote storage, passed to Ray as given; file:// and local:// (pyarrow's local disk) and
# plain paths are folders here, held to the allowed roots; any other scheme is refused.
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
LOCAL_STORAGE_SCHEMES = ("file", "local")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
log = logging.getLogger(__name__)
# Ray resources that are bookkeeping, not capacity: left out of what is reported.
_INTERNAL_RESOURCE_PREFIXES = ("node:", "accelerator_type:")


class RayNode(BaseModel):
    node_id: str = Field(description="Ray's id of the node.")
    node_ip: str = Field(description="The node's IP address. Example: '10.0.0.5'.")
    is_head: bool = Field(description="True for the head node.")
    alive: bool = Field(description="False for a node that left the cluster.")
    resources: dict[str, float] = Field(description="Its total resources: CPU, GPU, memory (bytes), custom ones.")


class RayClusterReport(BaseModel):
    address: str = Field(description="The address that was asked.")
    dashboard: str = Field(description="The dashboard (Jobs API) address used. Example: 'http://10.0.0.5:8265'.")
    ray_version: str | None = Field(None, description="The cluster's Ray version.")
    nodes: list[RayNode] = Field(description="The cluster's nodes.")
    total: dict[str, float] = Field(description="Resources of the live nodes added up.")


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


# ---------------------------------------------------------------------------------------------- server side


def dashboard_url(address: str, field: str = "ray.address") -> str:
    """The dashboard (Jobs API) URL of a cluster address; 'auto' stays 'auto' (Ray resolves it locally)."""
    if not RAY_ADDRESS.match(address):
        raise LmtunerError(
            f"{field}: {shown(address)} is not a Ray cluster address; accepted: 'http://HOST:8265', "
            "'ray://HOST:10001' or 'auto'",
            field=field,
        )
    address = address.rstrip("/")
    if address.startswith("ray://"):
        host = urlsplit(address).hostname or ""
        return f"http://{'[' + host + ']' if ':' in host else host}:{DASHBOARD_PORT}"
    return address


def dashboard_origin(address: str, field: str) -> str:
    """'scheme://host:port' of the dashboard an address reaches (host lower-cased, default port written out), the
    form the allow-list compares; 'auto' stays 'auto'."""
    url = dashboard_url(address, field)
    if url == "auto":
        return url
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise LmtunerError(
            f"{field}: {shown(address)} has no valid host and port; e.g. 'http://10.0.0.5:8265'", field=field
        )
    host = parts.hostname.lower()
    return f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


class RayAddresses:
    """The Ray clusters this server may reach, set by its owner: `lmtuner-mcp --ray-address ADDR` (repeatable) and
    LMTUNER_RAY_ADDRESSES (comma-separated). An address a caller names (inspect_gpus, propose_config, a TrainConfig's
    ray.address) that is not on the list is refused before any connection: a dashboard address is a URL the server
    fetches, and the server's network is not the caller's. 'auto' (the cluster this machine belongs to, which Ray
    finds from the owner's own settings) is always allowed; with no list it is the only one. An entry allows the
    dashboard it reaches: 'ray://head:10001' allows 'http://head:8265'. None: unconfined (the CLI, whose user is
    the owner, as for AllowedRoots)."""

    def __init__(self, addresses: list[str] | None, source: str = "--ray-address"):
        self.addresses = None if addresses is None else list(dict.fromkeys(a.strip().rstrip("/") for a in addresses))
        self.origins = None
        if self.addresses is not None:
            self.origins = {dashboard_origin(a, source) for a in self.addresses}

    @classmethod
    def from_settings(cls, given: list[str] | None, environ: dict[str, str] | os._Environ) -> RayAddresses:
        """The owner's list: the --ray-address values and LMTUNER_RAY_ADDRESSES, each entry checked."""
        listed = [a for a in (environ.get(RAY_ADDRESSES_ENV) or "").split(",") if a.strip()]
        cls([a.strip() for a in listed], source=RAY_ADDRESSES_ENV)  # an entry that is no address names its setting
        return cls([*(given or []), *listed])

    def describe(self) -> str:
        if self.addresses is None:
            return "any"
        return ", ".join(["auto", *(a for a in self.addresses if a != "auto")])

    def check(self, address: str, field: str) -> str:
        """The dashboard URL of `address`, or a refusal naming the setting that would allow it. Connects to nothing."""
        url = dashboard_url(address, field)
        if self.origins is None or url == "auto" or dashboard_origin(address, field) in self.origins:
            return url
        raise LmtunerError(
            f"{field}: {shown(address)} is not a Ray cluster this server may reach (allowed: {self.describe()}); "
            f"its owner allows a cluster by starting it with `lmtuner-mcp --ray-address {address}` (repeatable) or "
            f"with {RAY_ADDRESSES_ENV}={address} (comma-separated) in its environment",
            field=field,
        )


def _reach(url: str, field: str) -> str | None:
    """The cluster's Ray version from its dashboard, or a clear error within REACH_TIMEOUT_SECONDS. No redirect is
    followed and nothing the address answers is quoted: an error says what kind of failure it was."""
    if url == "auto":
        return None  # Ray finds the local cluster itself (and says so when there is none)
    import httpx

    try:
        with httpx.stream("GET", f"{url}/api/version", timeout=REACH_TIMEOUT_SECONDS, follow_redirects=False) as answer:
            if answer.status_code in (401, 403):
                return None  # it answers and wants Ray's token (RAY_AUTH_MODE=token): Ray's own clients send it
            if answer.is_redirect:
                raise LmtunerError(redirect_refusal(url, answer.status_code, field), field=field)
            if answer.status_code != 200:
                raise LmtunerError(
                    f"{field}: {url} is not a Ray dashboard (its /api/version answers HTTP {answer.status_code}); "
                    "give the dashboard's address, e.g. 'http://HEAD:8265'",
                    field=field,
                )
            body = b""
            deadline = time.monotonic() + REACH_TIMEOUT_SECONDS  # in all: httpx's timeout is per read
            for chunk in answer.iter_bytes():
                body += chunk
                if len(body) > VERSION_ANSWER_LIMIT or time.monotonic() > deadline:
                    raise ValueError("answer too long or too slow")
        version = json.loads(body).get("ray_version")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise LmtunerError(
            f"{field}: no Ray dashboard answers at {url} ({type(exc).__name__}); start the cluster (`ray start "
            "--head`) or give its dashboard address, e.g. 'http://HEAD:8265' (a dashboard bound to the head's "
            "loopback is reached through an SSH tunnel)",
            field=field,
        ) from None
    return version if isinstance(version, str) and RAY_VERSION.fullmatch(version) else None


def redirect_refusal(url: str, status: int, field: str) -> str:
    return (
        f"{field}: {url} answers with a redirect (HTTP {status}), which lmtuner does not follow; give the Ray "
        "dashboard's own address, e.g. 'http://HEAD:8265'"
    )


class RedirectRefused(ConnectionError):
    """A Ray client's request was answered with a redirect, which is not followed."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


def _no_redirects(client_class: type) -> type:
    """Ray's client class, with redirects refused. Its clients (requests) follow a redirect to any host and quote
    what they fetched in their errors, so a dashboard address that redirects would make this server fetch a page
    of the caller's choosing; Ray's dashboard itself never redirects its API."""

    class NoRedirects(client_class):
        def _do_request(self, method: str, endpoint: str, **kwargs):
            kwargs["allow_redirects"] = False
            response = super()._do_request(method, endpoint, **kwargs)
            if response.is_redirect:
                raise RedirectRefused(response.status_code)
            return response

    NoRedirects.__name__ = NoRedirects.__qualname__ = client_class.__name__
    return NoRedirects


def cluster_failure(field: str, doing: str, url: str, exc: BaseException) -> LmtunerError:
    """The error for a failed call into Ray's client: what failed and the exception's type, never its text (Ray
    quotes what the address answered, and the paths of this machine); the text goes to the server log."""
    log.info("Ray: %s at %s failed: %s", doing, url, redact(str(exc))[:2000])
    if isinstance(exc, RedirectRefused):
        return LmtunerError(redirect_refusal(url, exc.status, field), field=field)
    return LmtunerError(
        f"{field}: {doing} at {url} failed ({type(exc).__name__}); check that it is a Ray dashboard and that the "
        "cluster is up (Ray's own message is in the server log)",
        field=field,
    )


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


def cluster_report(address: str, allowed: RayAddresses, field: str = "ray.address") -> RayClusterReport:
    """The cluster's nodes and resources (Ray's state API, through the dashboard); an address off the owner's
    list is refused before any connection."""
    url = allowed.check(address, field)
    version = _reach(url, field)
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    try:
        nodes = _no_redirects(StateApiClient)(address=url).list(
            StateResource.NODES,
            options=ListApiOptions(timeout=int(REACH_TIMEOUT_SECONDS) * 2),
            raise_on_missing_output=False,
        )
    except Exception as exc:  # the state API raises its own exception types, requests' and ConnectionError
        raise cluster_failure(field, "listing the Ray cluster's nodes", url, exc) from None
    report = [
        RayNode(
            node_id=node.node_id,
            node_ip=node.node_ip,
            is_head=bool(node.is_head_node),
            alive=node.state == "ALIVE",
            resources={
                name: amount
                for name, amount in (node.resources_total or {}).items()
                if not name.startswith(_INTERNAL_RESOURCE_PREFIXES)
            },
        )
        for node in nodes
    ]
    total: dict[str, float] = {}
    for node in report:
        if node.alive:
            for name, amount in node.resources.items():
                total[name] = total.get(name, 0) + amount
    return RayClusterReport(address=address, dashboard=url, ray_version=version, nodes=report, total=total)


def describe_resources(resources: dict[str, float]) -> str:
    """'CPU 8, GPU 1, memory 31.2 GiB' — memory amounts in GiB, the rest as counts."""
    parts = []
    for name in sorted(resources, key=lambda n: (n not in ("CPU", "GPU"), n)):
        amount = resources[name]
        parts.append(f"{name} {amount / 2**30:.1f} GiB" if "memory" in name else f"{name} {amount:g}")
    return ", ".join(parts) or "nothing"


def workers_that_fit(need: dict[str, float], report: RayClusterReport) -> int:
    """How many workers of this shape the live nodes hold at once (each worker on one node). Counted in Ray's own
    units of 1/10,000 (RAY_RESOURCE_STEP), so that 10 workers of 0.1 CPU fit one CPU as they do in Ray; a shape
    that asks for nothing fits nowhere (RaySettings refuses it)."""
    units = {name: round(amount / RAY_RESOURCE_STEP) for name, amount in need.items()}
    room = 0
    for node in report.nodes:
        if not node.alive:
            continue
        counts = [
            round(node.resources.get(name, 0) / RAY_RESOURCE_STEP) // unit for name, unit in units.items() if unit > 0
        ]
        room += min(counts, default=0)
    return room


def check_cluster(settings: RaySettings, allowed: RayAddresses) -> list[str]:
    """Refuses a job the cluster cannot run, naming what is missing and what it has; returns warnings."""
    report = cluster_report(settings.address, allowed)
    need = settings.worker_resources()
    have = (
        ", ".join(f"{node.node_ip} ({describe_resources(node.resources)})" for node in report.nodes if node.alive)
        or "no live node"
    )
    unknown = [name for name, amount in need.items() if amount > 0 and not report.total.get(name)]
    if unknown:
        field = (
            "ray.use_gpu"
            if unknown == ["GPU"] and settings.resources_per_worker is None
            else "ray.resources_per_worker"
        )
        raise LmtunerError(
            f"{field}: no node of the Ray cluster at {settings.address} has {' or '.join(map(repr, unknown))}; its "
            f"nodes: {have}. Ask only for what the cluster has, or add such nodes",
            field=field,
        )
    room = workers_that_fit(need, report)
    if room < settings.num_workers:
        raise LmtunerError(
            f"ray.num_workers: {settings.num_workers} workers of {describe_resources(need)} each do not fit the Ray "
            f"cluster at {settings.address}: its nodes hold {room}; nodes: {have}. Lower ray.num_workers or "
            "ray.resources_per_worker, or add nodes",
            field="ray.num_workers",
        )
    warnings = []
    if settings.storage_path is None:
        warnings.append(
            "ray.storage_path not set: checkpoints go to the run folder, which every node must see at the same path"
        )
    return warnings


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


def plan_workers(report: RayClusterReport) -> tuple[RaySettings, str]:
    """Ray settings that use the whole cluster: one worker per GPU (with the CPUs that come with it), or on a
    CPU-only cluster one worker per node with the CPUs of its smallest node; and the reason, in words."""
    alive = [node for node in report.nodes if node.alive]
    if not alive:
        raise LmtunerError(f"ray_address: the Ray cluster at {report.address} has no live node", field="ray_address")
    gpu_nodes = [node for node in alive if node.resources.get("GPU", 0) >= 1]
    if gpu_nodes:
        workers = sum(int(node.resources["GPU"]) for node in gpu_nodes)
        cpus = max(1, min(int(node.resources.get("CPU", 1) // node.resources["GPU"]) for node in gpu_nodes))
        settings = RaySettings(
            address=report.address, num_workers=workers, use_gpu=True, resources_per_worker={"CPU": cpus, "GPU": 1}
        )
        why = f"{workers} workers, one per GPU of the {len(gpu_nodes)} GPU node(s), each with {cpus} CPU(s)"
    else:
        cpus = max(1, min(int(node.resources.get("CPU", 1)) for node in alive))
        workers = len(alive)
        settings = RaySettings(address=report.address, num_workers=workers, resources_per_worker={"CPU": cpus})
        why = f"{workers} workers, one per node (no GPU in the cluster), each with {cpus} CPU(s)"
    return settings, f"Ray cluster at {report.address}: {why}; data parallel, so the global batch is x {workers}."


def storage_path(config: TrainConfig, run: RunDir) -> str:
    """Where Ray Train keeps this job's checkpoints: ray.storage_path, else the run folder's ray/."""
    assert config.ray is not None
    return config.ray.storage_path or str(run.root / RAY_STORAGE_DIR)


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
            entrypoint=shlex.join([python, "-m", "lmtuner_core.jobs.ray_launcher", str(run.root), ray_job_id]),
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


def latest_ray_checkpoint(config: TrainConfig, run: RunDir) -> Path | None:
    """The newest Hugging Face checkpoint Ray Train kept for this job (storage_path/<job>/checkpoint_*/checkpoint),
    by training step; None when there is none. storage_path must be a folder here (not an object-store URI)."""
    root = Path(storage_path(config, run))
    found = []
    for path in (root / run.root.name).glob("checkpoint_*/checkpoint"):
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not finished
        found.append((int(state.get("global_step", 0)), str(path)))
    return Path(max(found)[1]) if found else None


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


# ---------------------------------------------------------------------------------------------- cluster side


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker (a torch.distributed rank; Ray has set up the process group): our recipe, with Ray
    Train reporting each checkpoint to storage_path and resuming from the newest one after a restart."""
    import ray
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from lmtuner_core.jobs.run_folder import StateFile
    from lmtuner_core.stages import recipe_class

    run = RunDir(Path(loop_config["run_dir"]))
    rank = ray.train.get_context().get_world_rank()
    state = StateFile(run, enabled=rank == 0)  # one state.json per job, on shared storage
    config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
    with contextlib.ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()  # set when the worker group restarts, or a resumed run restores
        if checkpoint is not None:
            folder = Path(stack.enter_context(checkpoint.as_directory())) / RayTrainReportCallback.CHECKPOINT_NAME
            config = config.model_copy(update={"resume_from": str(folder)})
        elif config.resume_from is None and (saved := run.latest_checkpoint()) is not None:
            # Ray registers a reported checkpoint when it next polls the workers (every 2 s): a group that died
            # in between restarts without one, though the Trainer's own complete checkpoint is in the run folder.
            config = config.model_copy(update={"resume_from": str(saved)})
        record_attempt(run, loop_config["ray_job_id"], rank, config.resume_from)
        try:
            # The stage's recipe (SFT, DPO, ...); a stop is Ray's: it ends the workers.
            recipe = recipe_class(config.stage)(config, run, state, threading.Event())
            recipe.setup()
            recipe.trainer.add_callback(rank_zero_report_callback())
            recipe.trainer = prepare_trainer(recipe.trainer)
            recipe.train()
            recipe.save()
        except BaseException as exc:
            from lmtuner_core.training.train import explain

            if rank == 0:
                traceback.print_exc()
                state.update(status="failed", error=str(exc) if isinstance(exc, LmtunerError) else explain(exc))
            raise
    if rank == 0:
        state.update(status="completed", phase=None, output_dir=config.output_dir)
        print(f"[lmtuner] completed; output in {config.output_dir}", flush=True)


def rank_zero_report_callback():
    """Ray Train's RayTrainReportCallback, with the checkpoint reported by rank 0 only: the Trainer writes it
    there, and the Trainer calls on_save without a barrier, so another rank would copy a folder rank 0 may
    still be writing (into the same Ray checkpoint). The other ranks report the metrics alone."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class RankZeroReportCallback(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                return super().on_save(args, state, control, **kwargs)
            metrics: dict = {}
            for logged in state.log_history:
                metrics.update(logged)
            ray.train.report(metrics=metrics, checkpoint=None)
            return None

    return RankZeroReportCallback()


def record_attempt(run: RunDir, ray_job_id: str, rank: int, resumed_from: str | None) -> None:
    """Rank 0 appends who runs where to ray_attempts.jsonl (gathered from every rank), so job_status can show
    the workers, their nodes and how often the group restarted."""
    import ray
    import torch.distributed as dist

    me = {"rank": rank, "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    workers = [None] * dist.get_world_size() if dist.is_initialized() else [me]
    if dist.is_initialized():
        dist.all_gather_object(workers, me)
    if rank != 0:
        return
    line = {"ray_job_id": ray_job_id, "started_at": time.time(), "resumed_from": resumed_from, "workers": workers}
    with (run.root / ATTEMPTS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    where = ", ".join(f"rank {w['rank']} pid {w['pid']} on {w['node_ip']}" for w in workers)  # type: ignore[index]
    resuming = f"; resuming from {resumed_from}" if resumed_from else ""
    print(f"[lmtuner] ray: worker group started ({where}){resuming}", flush=True)


def tee_output(log: Path) -> threading.Thread:
    """Copies what this process writes to stdout/stderr (Ray prints its workers' lines here too) into train.log
    as well, so the log tail reads as for a local job while Ray's job log keeps its copy. Hand-written: a pipe
    on fds 1 and 2 and a thread; no library tees file descriptors."""
    read_fd, write_fd = os.pipe()
    console = os.dup(1)
    sink = log.open("ab")

    def pump() -> None:
        while chunk := os.read(read_fd, 65536):
            with contextlib.suppress(OSError):
                os.write(console, chunk)
            sink.write(chunk)
            sink.flush()
        sink.close()

    thread = threading.Thread(target=pump, name="tee-train-log", daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return thread


def end_tee(thread: threading.Thread) -> None:
    """Flushes and closes the tee so the last lines reach train.log before the process exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    thread.join(timeout=5)


def merge_state(run: RunDir, **values) -> None:
    """Sets final fields of state.json while keeping what rank 0 wrote (step, totals)."""
    state = run.read_state()
    state.update(values, updated_at=time.time())
    run.write_state(state)


def main(argv: list[str] | None = None) -> int:
    """The Ray job's driver: a TorchTrainer over train_worker; records how it ended in state.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lmtuner_core.jobs.ray_launcher RUN_DIR RAY_JOB_ID", file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]).resolve())
    tee = tee_output(run.log)
    try:
        config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
        assert config.ray is not None, "config.json has no `ray` settings"
        merge_state(run, status="running", phase="starting Ray workers")
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        settings = config.ray
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"run_dir": str(run.root), "ray_job_id": argv[1]},
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                resources_per_worker=settings.worker_resources(),
                # CPU workers are spread over the nodes (each brings its cores); GPU workers packed (fast NCCL).
                placement_strategy="PACK" if settings.use_gpu else "SPREAD",
            ),
            run_config=RunConfig(
                name=run.root.name, storage_path=storage_path(config, run),
                failure_config=FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
            ),
        )  # fmt: skip
        print(
            f"[lmtuner] ray: {settings.num_workers} workers of {describe_resources(settings.worker_resources())}, "
            f"checkpoints in {storage_path(config, run)}/{run.root.name}",
            flush=True,
        )
        trainer.fit()
        merge_state(run, status="completed", phase=None, output_dir=config.output_dir)
        return 0
    except BaseException as exc:
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError, ValueError):
            worker_error = json.loads(run.state.read_text(encoding="utf-8")).get("error")
            error = worker_error or error
        merge_state(run, status="failed", phase=None, error=error)
        print(f"[lmtuner] failed: {error}", flush=True)
        return 1
    finally:
        end_tee(tee)


if __name__ == "__main__":
    sys.exit(main())
