"""A real two-node Ray cluster on this machine, for the tests: a head on 127.0.0.2 and a worker node on 127.0.0.3.

Ray rewrites 127.0.0.1 to the machine's address, and with one address for both nodes Ray Train sees one node:
two loopback addresses make two nodes. Each node runs under its own `ray start --block` in its own session and
temp dir, so the cluster is stopped by process group, never with `ray stop` (which ends every Ray process on the
machine, other people's too). Ports are picked free; the dashboard (Jobs API) listens on 127.0.0.2 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.helpers import free_port

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class RayCluster:
    dashboard: str  # http://127.0.0.2:PORT: the Jobs API
    gcs_address: str
    temp_dirs: list[Path]
    nodes: list[subprocess.Popen]


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--num-cpus", "1", "--object-store-memory", "200000000",
             "--disable-usage-stats", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _node_processes(nodes: list[subprocess.Popen], temp_dirs: list[Path]) -> list[psutil.Process]:
    """Every process of our cluster: the descendants of our `ray start` processes (Ray renames its workers, e.g.
    'ray::RayTrainWorker', so their command lines no longer say whose they are), and any process carrying one
    of our temp dirs (unique paths) on its command line."""
    found: dict[int, psutil.Process] = {}
    for node in nodes:
        try:
            for proc in psutil.Process(node.pid).children(recursive=True):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(str(d) in cmdline for d in temp_dirs):
            found[proc.pid] = proc
    return list(found.values())


def stop_cluster(nodes: list[subprocess.Popen], temp_dirs: list[Path]) -> None:
    """SIGTERM to each node's process group, then SIGKILL to whatever of ours is left."""
    ours = _node_processes(nodes, temp_dirs)
    for node in reversed(nodes):
        with suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
    _, left = psutil.wait_procs(ours, timeout=5)
    for node in nodes:
        with suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=10)
    for proc in left + _node_processes([], temp_dirs):
        with suppress(psutil.Error):
            proc.kill()


@contextmanager
def ray_cluster(logs: Path):
    """Starts the two nodes, waits until the dashboard sees both, yields the cluster, stops it."""
    temp_dirs = [Path(tempfile.mkdtemp(prefix="lmtray-", dir="/tmp")) for _ in range(2)]  # short: socket paths
    gcs_port, dashboard_port = free_port(), free_port()
    dashboard = f"http://{HEAD_IP}:{dashboard_port}"
    nodes = [
        _start_node(
            [
                "--head",
                "--node-ip-address",
                HEAD_IP,
                "--port",
                str(gcs_port),
                "--dashboard-host",
                HEAD_IP,
                "--dashboard-port",
                str(dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--temp-dir",
                str(temp_dirs[0]),
            ],
            logs / "ray-head.log",
        )
    ]
    try:
        _wait_for(lambda: _dashboard_nodes(dashboard) >= 1, 90, "the Ray head", logs / "ray-head.log", nodes[0])
        nodes.append(
            _start_node(
                [
                    "--address",
                    f"{HEAD_IP}:{gcs_port}",
                    "--node-ip-address",
                    WORKER_IP,
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--temp-dir",
                    str(temp_dirs[1]),
                ],
                logs / "ray-worker.log",
            )
        )
        _wait_for(
            lambda: _dashboard_nodes(dashboard) >= 2, 90, "the Ray worker node", logs / "ray-worker.log", nodes[1]
        )
        yield RayCluster(dashboard, f"{HEAD_IP}:{gcs_port}", temp_dirs, nodes)
    finally:
        stop_cluster(nodes, temp_dirs)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _dashboard_nodes(dashboard: str) -> int:
    """Live nodes the dashboard knows, 0 while it does not answer yet."""
    try:
        answer = httpx.get(f"{dashboard}/api/v0/nodes", params={"limit": 10}, timeout=5)
        result = answer.json()["data"]["result"]["result"]
        return sum(1 for node in result if node["state"] == "ALIVE")
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return 0


def _wait_for(condition, timeout: float, what: str, log: Path, node: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if node.poll() is not None:
            raise RuntimeError(f"{what} exited with {node.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout}s:\n{log.read_text()[-3000:]}")


def ray_worker_pids(cluster: RayCluster) -> list[int]:
    """Pids of the live ray::RayTrainWorker processes of our cluster (their title names the actor class)."""
    pids = []
    for proc in _node_processes(cluster.nodes, cluster.temp_dirs):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids
