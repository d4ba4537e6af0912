"""A real two-node Slurm cluster on this machine, for the tests: munge, MariaDB + slurmdbd (accounting: `sacct`),
slurmctld and two slurmd daemons `n1` and `n2`, all started here, each in the foreground under a Popen we hold.

Everything is the cluster's own: its folder, its slurm.conf (clients find it through SLURM_CONF), its munge socket
and key, its database, free ports for every daemon. Nothing is written under /etc or /run, and it is torn down by
the pids it started, never by name, so a cluster someone else runs on the machine is left alone. Each daemon dies
with the test process (PR_SET_PDEATHSIG) if the test is killed before its teardown. The measured recipe is in
../shared/ENVIRONMENT.md ("Slurm"); the Debian packages: see SLURM_PACKAGES.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lmtuner_core.jobs.distributed import die_with_parent, free_port

SLURM_PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
INSTALL_HINT = (
    f"apt-get install -y --no-install-recommends {SLURM_PACKAGES} (or `make slurm` as root, which `make test` runs)"
)
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "sacct", "sacctmgr", "slurmdbd", "mariadbd",
          "mariadb-install-db", "mariadb")  # fmt: skip
NODES = ("n1", "n2")
NODE_CPUS = 2
PARTITION = "debug"  # the default partition: both nodes, no time limit
SHORT_PARTITION = "short"  # both nodes, at most SHORT_MINUTES a job
SHORT_MINUTES = 5
SLURMD_TIMEOUT = 10  # seconds until a node that stopped answering is DOWN and its jobs requeued


def missing_programs() -> list[str]:
    return [name for name in NEEDED if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node_memory_mib: int
    env: dict[str, str]  # what a client needs: SLURM_CONF (and PATH with the Slurm commands)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 30) -> str:
        """A Slurm client command against this cluster; its output."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def idle_nodes(self) -> list[str]:
        with suppress(RuntimeError, subprocess.TimeoutExpired):
            return sorted(set(self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", timeout=10).split()))
        return []

    def wait_idle(self, nodes=NODES, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sorted(nodes) != [n for n in self.idle_nodes() if n in nodes]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle within {timeout}s:\n" + self.run("sinfo", "-N", "-l"))
            time.sleep(0.25)

    def start_slurmd(self, node: str) -> subprocess.Popen:
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.daemons[f"slurmd-{node}"] = proc = _daemon([_program("slurmd"), "-D", "-N", node], self, f"slurmd-{node}")
        return proc

    def job_processes(self, job_id: str, node: str | None = None) -> list[psutil.Process]:
        """The processes of a Slurm job (its batch script, srun, the tasks, their slurmstepd), found by the job id
        Slurm puts in their environment; with `node`, only those slurmd `node` started."""
        found = []
        for proc in psutil.process_iter(["name"]):
            try:
                env = proc.environ()
            except psutil.Error:
                continue
            if env.get("SLURM_JOB_ID") != job_id and env.get("SLURM_JOBID") != job_id:
                continue
            if node is not None and env.get("SLURMD_NODENAME") != node:
                continue
            found.append(proc)
        return found

    def crash_node(self, node: str, victims: list[psutil.Process]) -> list[int]:
        """A node crash as Slurm sees one: the node's slurmd and the given processes of a job on it (found before,
        with job_processes, so that the kill is immediate) die at once by SIGKILL; the controller hears nothing
        until SlurmdTimeout. Returns the pids killed."""
        procs = [psutil.Process(self.daemons[f"slurmd-{node}"].pid), *victims]
        for proc in procs:
            with suppress(psutil.Error):
                proc.kill()
        self.daemons[f"slurmd-{node}"].wait(timeout=10)
        return [p.pid for p in procs]


def _daemon(command: list[str], cluster: SlurmCluster, name: str, env: dict | None = None) -> subprocess.Popen:
    log = (cluster.root / "log" / f"{name}.out").open("ab")
    try:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or cluster.env,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
    finally:
        log.close()


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the daemon exited ({proc.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout}s")
        time.sleep(0.1)


def _quiet(command: list[str], env: dict[str, str], timeout: float = 10) -> bool:
    with suppress(subprocess.TimeoutExpired, OSError):
        return subprocess.run(command, env=env, capture_output=True, timeout=timeout).returncode == 0
    return False


def stop(cluster: SlurmCluster) -> None:
    """SIGTERM to each daemon we started (nodes first, the database last), SIGKILL after a few seconds, then any
    process still running one of this cluster's jobs (found by their environment's SLURM_CONF)."""
    for name in reversed(list(cluster.daemons)):
        proc = cluster.daemons[name]
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get("SLURM_CONF") == str(cluster.conf) and proc.pid != os.getpid():
                proc.kill()


@contextmanager
def slurm_cluster(root: Path):
    """Starts the cluster in `root` (empty or new) and yields it; stops every daemon it started on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("log", "state", "spool", "mysql", "run"):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    memory = min(4000, psutil.virtual_memory().total // 2**20 // 4)
    cluster = SlurmCluster(
        root=root, conf=conf, node_memory_mib=memory,
        env={**os.environ, "SLURM_CONF": str(conf), "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin"},
    )  # fmt: skip
    try:
        _start(cluster, host)
        yield cluster
    finally:
        stop(cluster)


def _start(cluster: SlurmCluster, host: str) -> None:
    root, env = cluster.root, cluster.env
    # 1. munge, with its own key and socket (slurm.conf's AuthInfo names the socket for every daemon and client)
    key, munge_socket = root / "munge.key", root / "run" / "munge.sock"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    cluster.daemons["munged"] = munged = _daemon(
        [_program("munged"), "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
         f"--pid-file={root / 'run' / 'munged.pid'}", f"--seed-file={root / 'run' / 'munge.seed'}",
         f"--log-file={root / 'log' / 'munged.log'}"],
        cluster, "munged",
    )  # fmt: skip
    _wait(munge_socket.exists, "munged", 20, munged, root / "log" / "munged.out")
    # 2. MariaDB for accounting (sacct): its own data folder, socket and a free TCP port on 127.0.0.1
    datadir, db_socket, db_port = root / "mysql", root / "run" / "mysqld.sock", free_port()
    subprocess.run(
        [_program("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root", "--skip-test-db",
         "--auth-root-authentication-method=socket"],
        env=env, capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    cluster.daemons["mariadbd"] = mariadbd = _daemon(
        [_program("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={db_socket}", f"--port={db_port}",
         "--bind-address=127.0.0.1", "--user=root", "--innodb-buffer-pool-size=32M", "--skip-log-bin",
         f"--pid-file={root / 'run' / 'mysqld.pid'}", f"--log-error={root / 'log' / 'mysqld.err'}"],
        cluster, "mariadbd",
    )  # fmt: skip
    sql = [_program("mariadb"), "--no-defaults", f"--socket={db_socket}", "-u", "root"]
    _wait(lambda: _quiet([*sql, "-e", "select 1"], env), "mariadbd", 60, mariadbd, root / "log" / "mysqld.err")
    password = secrets.token_hex(12)
    subprocess.run(
        [*sql, "-e", f"CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
         "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"],
        env=env, capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    # 3. slurmdbd, then slurm.conf and the cluster registered in the accounting database
    dbd_port, ctld_port = free_port(), free_port()
    node_ports = [free_port() for _ in NODES]
    dbd_conf = cluster.conf.with_name("slurmdbd.conf")  # slurmdbd reads it beside SLURM_CONF
    dbd_conf.write_text(
        f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\nDbdHost=localhost\nDbdAddr=127.0.0.1\n"
        f"DbdPort={dbd_port}\nSlurmUser=root\nStorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
        f"StoragePort={db_port}\nStorageUser=slurm\nStoragePass={password}\nStorageLoc=slurm_acct_db\n"
        f"PidFile={root / 'run' / 'slurmdbd.pid'}\nLogFile={root / 'log' / 'slurmdbd.log'}\n"
    )
    dbd_conf.chmod(0o600)
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={NODE_CPUS} "
        f"RealMemory={cluster.node_memory_mib} State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    cluster.conf.write_text(
        f"""ClusterName=lmtuner{secrets.token_hex(3)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}/%n
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run"}/slurmd-%n.pid
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log"}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
AccountingStoragePass={munge_socket}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout={SLURMD_TIMEOUT}
KillWait=10
MpiDefault=none
{nodes}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName={SHORT_PARTITION} Nodes=ALL MaxTime={SHORT_MINUTES} State=UP
"""
    )
    cluster.daemons["slurmdbd"] = slurmdbd = _daemon([_program("slurmdbd"), "-D"], cluster, "slurmdbd")
    _wait(lambda: _quiet(["sacctmgr", "-n", "list", "cluster"], env), "slurmdbd", 60, slurmdbd,
          root / "log" / "slurmdbd.log")  # fmt: skip
    name = cluster.conf.read_text().split("\n", 1)[0].split("=", 1)[1]
    subprocess.run(["sacctmgr", "-i", "add", "cluster", name], env=env, capture_output=True, timeout=30)
    # 4. the controller and the two nodes
    cluster.daemons["slurmctld"] = _daemon([_program("slurmctld"), "-D"], cluster, "slurmctld")
    for node in NODES:
        cluster.start_slurmd(node)
    cluster.wait_idle()
