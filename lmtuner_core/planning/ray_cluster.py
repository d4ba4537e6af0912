"""A Ray cluster, as planning sees it: its address checked against the owner's list, its nodes and resources read
through the dashboard (for inspect_gpus), the workers a job could use (for propose_config), and whether a job's
workers fit it (before submitting). Stdlib, httpx and pydantic at import; ray only inside the calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from lmtuner_core.config import RAY_ADDRESS, RAY_RESOURCE_STEP, RaySettings
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.secrets import redact

DASHBOARD_PORT = 8265  # Ray's default; a ray:// address names the client port, the dashboard is here
REACH_TIMEOUT_SECONDS = 5.0
RAY_ADDRESSES_ENV = "LMTUNER_RAY_ADDRESSES"  # the owner's allow-list of clusters, comma-separated
VERSION_ANSWER_LIMIT = 64 * 1024  # bytes of /api/version read: Ray answers about 200
RAY_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,39}")
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
