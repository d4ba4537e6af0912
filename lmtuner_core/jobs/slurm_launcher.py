"""Jobs on a Slurm cluster: read with `scontrol`, checked before submitting, submitted with submitit (sbatch),
followed with `scontrol`/`sacct`, stopped with `scancel`.

Server side (stdlib and pydantic at import; submitit only inside `submit`), for an `lmtuner-mcp` running on a
machine of the cluster (a login node) with the Slurm commands on its PATH: `read_cluster` lists partitions and
nodes (CPUs, memory, GPUs) for inspect_gpus and propose_config; `check_request` refuses a partition or a resource
request the cluster cannot give, naming what it has, before anything is submitted; `SlurmLauncher` submits the job
with submitit (one task per GPU, or one per CPU node; `--requeue`), records the Slurm job id in the store, and any
server follows it by that id (after a restart too). Every Slurm command runs with a time limit.

Cluster side: submitit runs `SlurmTask` in each task. It sets torch.distributed's variables from Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's first node as MASTER_ADDR, through submitit's
TorchDistributedEnvironment), continues from the newest checkpoint of the run folder when there is one (a job Slurm
requeued after a node failure, a time limit or a resume), and runs the training entry point. The run folder, the
data, the model, output_dir and submitit's folder must be on storage every node sees at the same path
(docs/CLUSTER.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from lmtuner_core.config import SlurmSettings, TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.jobs.launcher import Ending, LaunchContext, Placement, handle_json, read_handle, tracker_environment
from lmtuner_core.jobs.store import JobRecord
from lmtuner_core.methods import METHODS
from lmtuner_core.run import RunDir
from lmtuner_core.secrets import SERVER_ONLY, redact

COMMAND_TIMEOUT_SECONDS = 10.0  # each scontrol/sacct/scancel call; sbatch gets SUBMIT_TIMEOUT_SECONDS
SUBMIT_TIMEOUT_SECONDS = 60
SLURM_FOLDER = "slurm"  # submitit's folder by default, inside the run folder
UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")
# Slurm job states (scontrol's JobState, sacct's State) of a job that will still run or runs now.
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
    "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT",
})  # fmt: skip
# Node states in which a node takes no new job (a flag such as DRAIN may follow the base state: 'IDLE+DRAIN').
UNAVAILABLE_NODE_STATES = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN", "FUTURE", "INVAL", "MAINT")
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=")


class SlurmNode(BaseModel):
    name: str = Field(description="The node's name in Slurm. Example: 'gpu-017'.")
    state: str = Field(description="Its state as Slurm says it: IDLE, MIXED, ALLOCATED, DOWN, IDLE+DRAIN, ...")
    available: bool = Field(description="False when it takes no new job (down, drained, failing).")
    partitions: list[str] = Field(description="The partitions it belongs to.")
    cpus: int = Field(description="CPU cores Slurm gives out on it.")
    memory_mib: int = Field(description="Memory Slurm gives out on it (RealMemory), MiB.")
    gpus: int = Field(description="GPUs (gres/gpu) on it.")
    gpu_type: str | None = Field(None, description="The GPUs' type as the gres names it. Example: 'a100'.")


class SlurmPartition(BaseModel):
    name: str = Field(description="The partition's name. Example: 'gpu'.")
    default: bool = Field(description="True for the partition a job without `partition` goes to.")
    state: str = Field(description="UP, DOWN (queues, starts nothing), DRAIN or INACTIVE (takes no job).")
    nodes: list[str] = Field(description="Its nodes.")
    max_time_minutes: int | None = Field(None, description="Longest time limit a job may have; None: unlimited.")
    default_time_minutes: int | None = Field(None, description="A job's time limit when it names none.")
    max_nodes: int | None = Field(None, description="Most nodes one job may take; None: all of them.")
    allow_accounts: list[str] | None = Field(None, description="Accounts it admits; None: all.")
    allow_qos: list[str] | None = Field(None, description="QOS it admits; None: all.")


class SlurmClusterReport(BaseModel):
    cluster: str | None = Field(None, description="The cluster's name (ClusterName).")
    partitions: list[SlurmPartition] = Field(description="Its partitions.")
    nodes: list[SlurmNode] = Field(description="Its nodes with their CPUs, memory and GPUs.")


class SlurmJobView(BaseModel):
    """How a job runs on its Slurm cluster, asked of the cluster by its Slurm job id."""

    job_id: str = Field(description="The Slurm job id (squeue, sacct, scancel take it). Example: '4242'.")
    state: str = Field(description="Slurm's state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, NODE_FAIL, ...")
    nodes: list[str] = Field(default_factory=list, description="The nodes it runs (or ran) on.")
    reason: str | None = Field(None, description="Why it waits or ended, as Slurm says it. Example: 'Resources'.")
    restarts: int = Field(0, description="Times Slurm requeued it (node failure, time limit); each run continued "
                          "from the newest checkpoint.")  # fmt: skip
    partition: str | None = Field(None, description="The partition it runs in.")


# ---------------------------------------------------------------------------------------------- Slurm commands


def slurm_command(*args: str, timeout: float = COMMAND_TIMEOUT_SECONDS, field: str = "slurm") -> str:
    """A Slurm client command's output, or an LmtunerError within `timeout` naming what failed."""
    program = shutil.which(args[0])
    if program is None:
        raise LmtunerError(
            f"{field}: the Slurm commands are not installed here ({args[0]} not found on PATH); lmtuner-mcp must run "
            "on a machine of the cluster (a login node) whose PATH has scontrol, sbatch and scancel",
            field=field,
        )
    try:
        done = subprocess.run([program, *args[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LmtunerError(
            f"{field}: the Slurm controller did not answer `{' '.join(args[:3])}` within {timeout:g} s; is "
            "slurmctld up (`scontrol ping`)?",
            field=field,
        ) from None
    if done.returncode != 0:
        said = redact((done.stderr or done.stdout).strip().splitlines()[-1:][0] if (done.stderr or done.stdout).strip()
                      else f"exit code {done.returncode}")  # fmt: skip
        raise LmtunerError(f"{field}: `{' '.join(args[:3])}` failed: {said[:300]}", field=field)
    return done.stdout


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol show … -o` output, one record a line, as dicts. Hand-written: values may hold spaces (OS=Linux 6.1
    #1 SMP, Reason=Not responding), so a value runs to the next ' Key=' rather than to the next space."""
    records = []
    for line in text.splitlines():
        matches = list(_KEY.finditer(line))
        if not matches:
            continue
        record = {}
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
            record[match.group(1)] = line[match.end() : end].strip()
        records.append(record)
    return records


def parse_minutes(value: str) -> int | None:
    """A Slurm time ('UNLIMITED', '30', '5:00' (min:s), '2:00:00', '1-00:00:00', '2-12') in whole minutes; None
    for unlimited (or unreadable: no limit is assumed rather than a wrong one)."""
    value = value.strip()
    if value.upper() in UNLIMITED:
        return None
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    try:
        parts = [int(p) for p in rest.split(":")]
        day_count = int(days or 0)
    except ValueError:
        return None
    if "-" in value:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return day_count * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def expand_hostlist(hostlist: str) -> list[str]:
    """'n[1-3,7],gpu01' -> ['n1', 'n2', 'n3', 'n7', 'gpu01'] (Slurm's hostlist form, one bracket per name; zero
    padding kept). Hand-written rather than a `scontrol show hostnames` call on every job_status."""
    names: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", hostlist):
        prefix, ranges, suffix = match.groups()
        if not prefix and not ranges:
            continue
        if ranges is None:
            names.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                names.append(f"{prefix}{low}{suffix}")
                continue
            for number in range(int(low), int(high) + 1):
                names.append(f"{prefix}{str(number).zfill(len(low))}{suffix}")
    return names


def _gpus(record: dict[str, str]) -> tuple[int, str | None]:
    """The node's GPU count and type, from CfgTRES (gres/gpu=4) or Gres (gpu:a100:4(S:0-1),gpu:v100:2)."""
    gpu_type = None
    count = 0
    for entry in re.split(r",(?![^(]*\))", record.get("Gres", "")):
        fields = entry.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            count += int(fields[-1])
            gpu_type = fields[1] if len(fields) == 3 else gpu_type
    tres = dict(item.partition("=")[::2] for item in record.get("CfgTRES", "").split(",") if "=" in item)
    if tres.get("gres/gpu", "").isdigit():
        count = int(tres["gres/gpu"])
    return count, gpu_type


def _int(value: str | None, default: int = 0) -> int:
    with contextlib.suppress(TypeError, ValueError):
        return int(value)  # type: ignore[arg-type]
    return default


def _names(value: str | None) -> list[str] | None:
    if not value or value.upper() == "ALL":
        return None
    return [v for v in value.split(",") if v]


def read_cluster(field: str = "slurm") -> SlurmClusterReport:
    """The cluster's partitions and nodes, from `scontrol show partition/node -o` (each within the time limit)."""
    partitions = parse_records(slurm_command("scontrol", "show", "partition", "-o", field=field))
    nodes = parse_records(slurm_command("scontrol", "show", "node", "-o", field=field))
    node_list = []
    for record in nodes:
        if "NodeName" not in record:
            continue
        state = record.get("State", "UNKNOWN")
        gpus, gpu_type = _gpus(record)
        node_list.append(
            SlurmNode(
                name=record["NodeName"], state=state,
                available=not any(flag in state.upper() for flag in UNAVAILABLE_NODE_STATES),
                partitions=[p for p in record.get("Partitions", "").split(",") if p],
                cpus=_int(record.get("CPUTot")), memory_mib=_int(record.get("RealMemory")), gpus=gpus,
                gpu_type=gpu_type,
            )
        )  # fmt: skip
    partition_list = [
        SlurmPartition(
            name=record["PartitionName"], default=record.get("Default", "NO").upper() == "YES",
            state=record.get("State", "UP"),
            nodes=[n.name for n in node_list if record["PartitionName"] in n.partitions],
            max_time_minutes=parse_minutes(record.get("MaxTime", "UNLIMITED")),
            default_time_minutes=parse_minutes(record.get("DefaultTime", "NONE")),
            max_nodes=None if record.get("MaxNodes", "UNLIMITED").upper() in UNLIMITED else _int(record["MaxNodes"]),
            allow_accounts=_names(record.get("AllowAccounts")), allow_qos=_names(record.get("AllowQos")),
        )
        for record in partitions
        if "PartitionName" in record
    ]  # fmt: skip
    cluster = None
    with contextlib.suppress(LmtunerError):
        for line in slurm_command("scontrol", "show", "config", field=field).splitlines():
            if line.startswith("ClusterName"):
                cluster = line.split("=", 1)[1].strip()
    return SlurmClusterReport(cluster=cluster, partitions=partition_list, nodes=node_list)


# ---------------------------------------------------------------------------------------------- checking, planning


def describe_node(node: SlurmNode) -> str:
    gpus = f"{node.gpus} GPU{'s' if node.gpus != 1 else ''}" + (f" {node.gpu_type}" if node.gpu_type else "")
    state = "" if node.available else f", {node.state.lower()}"
    return f"{node.name} ({node.cpus} CPUs, {node.memory_mib / 1024:.1f} GiB, {gpus if node.gpus else 'no GPU'}{state})"


def describe_partition(partition: SlurmPartition) -> str:
    limit = "no time limit" if partition.max_time_minutes is None else f"at most {partition.max_time_minutes} min"
    default = "default, " if partition.default else ""
    return f"{partition.name} ({default}{len(partition.nodes)} nodes, {limit}, {partition.state.lower()})"


def pick_partition(report: SlurmClusterReport, name: str | None, field: str = "slurm.partition") -> SlurmPartition:
    """The partition a job goes to: the one named, else the default one; refused naming the partitions there are."""
    have = ", ".join(describe_partition(p) for p in report.partitions) or "none"
    if name is None:
        for partition in report.partitions:
            if partition.default:
                return partition
        raise LmtunerError(f"{field}: this cluster has no default partition; name one of: {have}", field=field)
    for partition in report.partitions:
        if partition.name == name:
            return partition
    raise LmtunerError(
        f"{field}: {shown(name)} is not a partition of this cluster; its partitions: {have}", field=field
    )


def check_request(
    settings: SlurmSettings, report: SlurmClusterReport, method_needs_cuda: str | None = None
) -> list[str]:
    """Refuses a job the partition cannot run at all — unknown partition, more nodes than it has, GPUs, CPUs or
    memory no node of it has, a time limit over its maximum, an account or QOS it does not admit — naming what it
    has. A request that fits nodes that are busy or down now is accepted (it waits in the queue), with a warning."""
    partition = pick_partition(report, settings.partition)
    where = f"partition {partition.name!r}"
    members = [n for n in report.nodes if n.name in partition.nodes]
    have = "; its nodes: " + (", ".join(describe_node(n) for n in members) or "none")
    if partition.state.upper() in ("INACTIVE", "DRAIN"):
        raise LmtunerError(f"slurm.partition: {where} is {partition.state.lower()} and takes no job; "
                           f"other partitions: {', '.join(p.name for p in report.partitions)}",
                           field="slurm.partition")  # fmt: skip
    tasks = settings.tasks_per_node()
    needs = {
        "slurm.gpus_per_node": (lambda n: n.gpus >= settings.gpus_per_node, f"{settings.gpus_per_node} GPU(s)"),
        "slurm.cpus_per_task": (
            lambda n: n.cpus >= tasks * (settings.cpus_per_task or 1),
            f"{tasks * (settings.cpus_per_task or 1)} CPUs ({tasks} task(s) x {settings.cpus_per_task or 1})",
        ),
        "slurm.mem_gb": (
            lambda n: settings.mem_gb is None or n.memory_mib >= settings.mem_gb * 1024,
            f"{settings.mem_gb:g} GB of memory" if settings.mem_gb else "",
        ),
    }
    if method_needs_cuda and settings.gpus_per_node == 0:
        raise LmtunerError(f"method: this method needs a CUDA GPU ({method_needs_cuda}); set slurm.gpus_per_node "
                           f"(and a partition with GPUs){have}", field="slurm.gpus_per_node")  # fmt: skip
    if settings.nodes > len(members):
        raise LmtunerError(f"slurm.nodes: {settings.nodes} node(s) asked, but {where} has {len(members)}{have}",
                           field="slurm.nodes")  # fmt: skip
    fitting = members
    for name, (fits, what) in needs.items():
        count = sum(1 for n in members if fits(n))
        if count < settings.nodes:
            raise LmtunerError(
                f"{name}: {settings.nodes} node(s) with {what} each asked, but {where} has {count} such node(s){have}",
                field=name,
            )
        fitting = [n for n in fitting if fits(n)]
    if len(fitting) < settings.nodes:
        raise LmtunerError(f"slurm.nodes: {settings.nodes} node(s) asked, but {where} has {len(fitting)} node(s) "
                           f"with all of it{have}", field="slurm.nodes")  # fmt: skip
    if partition.max_nodes is not None and settings.nodes > partition.max_nodes:
        raise LmtunerError(f"slurm.nodes: {where} gives one job at most {partition.max_nodes} node(s){have}",
                           field="slurm.nodes")  # fmt: skip
    limit = partition.max_time_minutes
    if settings.time_minutes is not None and limit is not None and settings.time_minutes > limit:
        raise LmtunerError(
            f"slurm.time_minutes: {settings.time_minutes} min is over the {limit} min limit of {where}; ask at most "
            f"{limit}, or use another partition: {', '.join(describe_partition(p) for p in report.partitions)}",
            field="slurm.time_minutes",
        )
    for name, allowed in (("account", partition.allow_accounts), ("qos", partition.allow_qos)):
        value = getattr(settings, name)
        if value is not None and allowed is not None and value not in allowed:
            raise LmtunerError(f"slurm.{name}: {where} admits {', '.join(allowed)}, not {value!r}",
                               field=f"slurm.{name}")  # fmt: skip
    warnings = []
    ready = [n for n in fitting if n.available]
    if len(ready) < settings.nodes:
        warnings.append(f"slurm: only {len(ready)} of the {len(fitting)} nodes of {where} that fit this job take "
                        "jobs now (the others are down or drained): it waits in the queue")  # fmt: skip
    if settings.time_minutes is None and partition.default_time_minutes is None and limit is not None:
        warnings.append(f"slurm.time_minutes not set: the job gets {where}'s limit of {limit} min")
    if settings.folder is None:
        warnings.append("slurm.folder not set: submitit's files go to the run folder, which every node must see")
    return warnings


def plan_slurm(report: SlurmClusterReport, partition_name: str | None) -> tuple[SlurmSettings, str]:
    """Slurm settings that use a partition whole: one task per GPU on the GPU nodes that have the most GPUs (the
    CPUs split between the GPUs), or on a CPU-only partition one task per node with the CPUs of its leanest node;
    and the reason, in words."""
    partition = pick_partition(report, None if partition_name in (None, "default") else partition_name,
                               field="slurm_partition")  # fmt: skip
    members = [n for n in report.nodes if n.name in partition.nodes and n.available] or [
        n for n in report.nodes if n.name in partition.nodes
    ]
    if not members:
        raise LmtunerError(f"slurm_partition: partition {partition.name!r} has no node", field="slurm_partition")
    most_gpus = max(n.gpus for n in members)
    chosen = [n for n in members if n.gpus == most_gpus]
    nodes = min(len(chosen), partition.max_nodes or len(chosen))
    if most_gpus:
        cpus = max(1, min(n.cpus // most_gpus for n in chosen))
        settings = SlurmSettings(partition=partition.name, nodes=nodes, gpus_per_node=most_gpus, cpus_per_task=cpus)
        why = f"{nodes} node(s) with {most_gpus} GPU(s) each, one training process per GPU with {cpus} CPU(s)"
    else:
        cpus = max(1, min(n.cpus for n in chosen))
        settings = SlurmSettings(partition=partition.name, nodes=nodes, cpus_per_task=cpus)
        why = f"{nodes} CPU node(s), one training process per node with {cpus} CPU(s)"
    world = nodes * settings.tasks_per_node()
    return settings, (
        f"Slurm partition {partition.name!r}: {why}; data parallel, so the global batch is x {world}. Set "
        "slurm.time_minutes, slurm.account and slurm.qos as your site asks."
    )


# ---------------------------------------------------------------------------------------------- following a job


def job_view(job_id: str) -> SlurmJobView:
    """The job as the controller knows it (`scontrol show job`, while it runs and for MinJobAge after), else as
    accounting remembers it (`sacct`); state 'GONE' when neither knows it."""
    try:
        records = parse_records(slurm_command("scontrol", "show", "job", "-o", job_id, field="job_id"))
    except LmtunerError as exc:
        if "Invalid job id" not in str(exc):
            raise
        records = []
    if records:
        record = records[0]
        nodes = record.get("NodeList", "")
        reason = record.get("Reason", "None")
        return SlurmJobView(
            job_id=job_id, state=record.get("JobState", "UNKNOWN"),
            nodes=expand_hostlist(nodes) if nodes and nodes != "(null)" else [],
            reason=None if reason in ("None", "(null)") else reason, restarts=_int(record.get("Restarts")),
            partition=record.get("Partition"),
        )  # fmt: skip
    try:
        lines = slurm_command("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,NodeList,Partition,ExitCode",
                              field="job_id").strip().splitlines()  # fmt: skip
    except LmtunerError:
        lines = []
    if not lines:
        return SlurmJobView(job_id=job_id, state="GONE", reason="the Slurm cluster does not know this job")
    state, nodes, partition, exit_code = [*lines[-1].split("|"), "", "", ""][:4]
    return SlurmJobView(
        job_id=job_id, state=state.split()[0] if state else "UNKNOWN",
        nodes=expand_hostlist(nodes) if nodes and nodes != "None assigned" else [], partition=partition or None,
        reason=f"exit code {exit_code}" if exit_code and exit_code != "0:0" else None,
    )  # fmt: skip


def slurm_folder(config: TrainConfig, run: RunDir) -> Path:
    """Where submitit keeps the job's script, pickles and per-task logs: slurm.folder, else the run folder's slurm/."""
    assert config.slurm is not None
    return Path(config.slurm.folder) if config.slurm.folder else run.root / SLURM_FOLDER


def job_environment(home: Path) -> dict[str, str]:
    """Variables the job's tasks get beyond the submitting environment (never secrets: they are on sbatch's
    command line)."""
    return {"LMTUNER_HOME": str(home), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def submit_job(run: RunDir, config: TrainConfig, home: Path, time_minutes: int, trackers: dict[str, str]) -> str:
    """Submits the job with submitit (one sbatch job of nodes x tasks_per_node tasks) and returns its Slurm job id.
    `time_minutes`: the job's time limit (0: none), which submitit also needs to tell a time limit from preemption."""
    assert config.slurm is not None
    settings = config.slurm
    try:
        import submitit
    except ImportError:
        raise LmtunerError(
            "slurm: submitting to Slurm needs the submitit package (pip install 'lmtuner[cluster]')", field="slurm"
        ) from None

    extra = {**job_environment(home), **trackers}

    class Executor(submitit.SlurmExecutor):
        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            # submitit runs sbatch with this process's environment and no time limit: ours drops the server's own
            # secrets (the job sees the rest, as a local job does) and adds the job's variables, within a limit.
            # (Overrides submitit's hook; it has no parameter for either.)
            unset = [f"--unset={name}" for name in SERVER_ONLY]
            sets = [f"{k}={v}" for k, v in extra.items()]
            return ["timeout", str(SUBMIT_TIMEOUT_SECONDS), "env", *unset, *sets, "sbatch", str(submission_file_path)]

    folder = slurm_folder(config, run)
    python = settings.python or sys.executable
    executor = Executor(folder=folder, python=shlex.quote(python), max_num_timeout=3)
    parameters: dict = {
        "job_name": f"lmtuner-{run.root.name}", "nodes": settings.nodes, "ntasks_per_node": settings.tasks_per_node(),
        "partition": settings.partition, "cpus_per_task": settings.cpus_per_task, "account": settings.account,
        "qos": settings.qos, "time": time_minutes,
        "gpus_per_node": settings.gpus_per_node or None, "mem": f"{settings.mem_gb:g}GB" if settings.mem_gb else None,
        "stderr_to_stdout": True, "additional_parameters": {"requeue": True},
    }  # fmt: skip
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    try:
        job = executor.submit(SlurmTask(str(run.root)))
    except Exception as exc:  # submitit raises FailedJobError/FailedSubmissionError, CalledProcessError, OSError
        said = redact(str(exc)).strip().splitlines()
        detail = next((line for line in said if "error" in line.lower()), said[-1] if said else type(exc).__name__)
        raise LmtunerError(f"slurm: sbatch refused the job: {detail[:400]}", field="slurm") from None
    return str(job.job_id)


def time_limit(settings: SlurmSettings, report: SlurmClusterReport) -> int:
    """The job's time limit in minutes: slurm.time_minutes, else the partition's default, else its maximum; 0 (no
    limit) on a partition without one. Always given to sbatch: submitit's own default is 5 minutes."""
    partition = pick_partition(report, settings.partition)
    return settings.time_minutes or partition.default_time_minutes or partition.max_time_minutes or 0


def cancel_job(job_id: str) -> None:
    slurm_command("scancel", job_id, field="job_id")


# ---------------------------------------------------------------------------------------------- cluster side


def first_node_address(nodelist: str) -> str:
    """The address of the job's first node, where rank 0 listens: its NodeAddr in Slurm (the name itself on most
    clusters; an IP where names do not resolve)."""
    first = expand_hostlist(nodelist)[0]
    with contextlib.suppress(LmtunerError, IndexError):
        address = parse_records(slurm_command("scontrol", "show", "node", "-o", first))[0].get("NodeAddr")
        if address:
            return address
    return first


def export_rendezvous() -> tuple[int, int, int]:
    """Sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE from Slurm's SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID and SLURM_JOB_NODELIST (submitit's TorchDistributedEnvironment; MASTER_ADDR
    from the first node's NodeAddr). CUDA_VISIBLE_DEVICES stays as Slurm set it: each task uses cuda:LOCAL_RANK."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    os.environ.update(
        MASTER_ADDR=first_node_address(os.environ.get("SLURM_JOB_NODELIST", env.master_addr)),
        MASTER_PORT=str(env.master_port), RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.local_world_size),
    )  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return env.rank, env.local_rank, env.world_size


def slurmd_timeout() -> int:
    """The cluster's SlurmdTimeout in seconds: how long a silent node takes to be declared down (300 by default)."""
    with contextlib.suppress(LmtunerError):
        for line in slurm_command("scontrol", "show", "config").splitlines():
            if line.startswith("SlurmdTimeout"):
                return _int(line.split("=", 1)[1].split()[0], 300)
    return 300


def wait_for_node_failure(run: RunDir, rank: int) -> None:
    """After this task's training failed in a job of several processes: when no other process recorded a failure
    (failure-rank-N.json), the likeliest cause is a peer whose node crashed, which Slurm declares down only after
    SlurmdTimeout. Ending now would end the job FAILED before that, and Slurm requeues only a job that is still
    running when its node fails; so this task waits up to SlurmdTimeout + 60 s (at most 15 min) for Slurm to
    requeue the job (it then kills this task), and gives up at once if another process records its own failure.
    Hand-written: neither Slurm nor submitit tells a dead peer from a failing one."""
    mine = f"rank {rank}:"
    wait = min(slurmd_timeout() + 60, 900)
    print(f"[lmtuner] rank {rank}: training stopped on an error; waiting up to {wait} s in case a node of the job "
          "failed (Slurm then requeues the job, which continues from its newest checkpoint)", flush=True)  # fmt: skip
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if any(not reason.startswith(mine) for reason in run.failures()):
            return  # another process failed for its own reason: the job failed
        time.sleep(1.0)


class SlurmTask:
    """What submitit runs in each Slurm task (pickled by reference: this module must be importable on the nodes):
    the rendezvous from Slurm's environment, then the recipe's lifecycle (training.train.run_recipe), continuing
    from the run folder's newest checkpoint when it has one (Slurm requeued the job after a node failure or a time
    limit; resume_job). Only global rank 0 writes state.json and train.log: the run folder is shared by every node.
    `checkpoint` makes submitit requeue the job when it reaches its time limit or is preempted."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> str:
        from lmtuner_core.run import StateFile
        from lmtuner_core.training.ray_worker import end_tee, tee_output
        from lmtuner_core.training.train import install_stop_handler, run_recipe

        run = RunDir(Path(self.run_dir))
        stop = install_stop_handler()  # scancel: SIGTERM to every task, which saves a checkpoint and stops
        rank, _, world = export_rendezvous()
        config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
        if rank == 0 and _int(os.environ.get("SLURM_RESTART_COUNT")):
            for stale in run.root.glob("failure-rank-*.json"):  # the run Slurm requeued left them
                stale.unlink(missing_ok=True)
        saved = run.latest_checkpoint()  # the same on every task: the previous run of this job has ended
        if saved is not None:
            config = config.model_copy(update={"resume_from": str(saved)})
        tee = tee_output(run.log) if rank == 0 else None  # train.log reads as a local job's; submitit keeps a copy
        try:
            if rank == 0:
                restarts = _int(os.environ.get("SLURM_RESTART_COUNT"))
                again = f", run {restarts + 1} (requeued by Slurm)" if restarts else ""
                resuming = f"; resuming from {saved}" if saved is not None else ""
                print(f"[lmtuner] slurm job {os.environ.get('SLURM_JOB_ID')}: {world} task(s) on "
                      f"{os.environ.get('SLURM_JOB_NODELIST', '?')}{again}{resuming}", flush=True)  # fmt: skip
            return run_recipe(run, StateFile(run, enabled=rank == 0), stop, config=config)
        except BaseException:
            if _int(os.environ.get("SLURM_JOB_NUM_NODES"), 1) > 1 and not stop.is_set():
                wait_for_node_failure(run, rank)  # a peer on another node may have died with its node
            raise
        finally:
            if tee is not None:
                end_tee(tee)

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SlurmTask(self.run_dir))


# ---------------------------------------------------------------------------------------------- the launcher


def wait_until_ended(job_id: str, timeout: float) -> SlurmJobView:
    deadline = time.monotonic() + timeout
    view = job_view(job_id)
    while view.state in LIVE_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
        view = job_view(job_id)
    return view


def ending_of(view: SlurmJobView, run: RunDir) -> Ending | None:
    """The job's ending from Slurm's state; None while it runs or waits (a requeued job waits again)."""
    if view.state in LIVE_STATES:
        return None
    state = run.read_state()
    if view.state == "COMPLETED":
        return Ending("completed", None, 0)
    if view.state == "CANCELLED":
        return Ending("cancelled")
    if view.state == "GONE" and state.get("status") in ("completed", "cancelled"):
        return Ending(state["status"])  # Slurm forgot it (no accounting) after it ended: the run folder says how
    error = state.get("error") if state.get("status") == "failed" else None
    error = error or "; ".join(run.failures()) or None
    why = f" ({view.reason})" if view.reason else ""
    return Ending("failed", error or f"Slurm job {view.job_id} ended {view.state}{why}; see train.log")


class SlurmLauncher:
    """Jobs on a Slurm cluster (TrainConfig `slurm`), for a server on a machine of the cluster. Handle: {"job_id":
    the Slurm job id}; the cluster is the one this machine's Slurm commands reach (SLURM_CONF)."""

    name = "slurm"

    def __init__(self, context: LaunchContext):
        self.context = context

    def confine(self, config: TrainConfig) -> TrainConfig:
        """slurm.folder (submitit's files) resolved inside the allowed roots, like output_dir."""
        assert config.slurm is not None
        if config.slurm.folder is None:
            return config
        folder = str(self.context.roots.resolve(config.slurm.folder, "slurm.folder"))
        return config.model_copy(update={"slurm": config.slurm.model_copy(update={"folder": folder})})

    def check(self, config: TrainConfig, *, force: bool) -> Placement:
        """The cluster is read and the request compared with the partition's nodes (Slurm places the tasks)."""
        assert config.slurm is not None
        warnings = check_request(config.slurm, read_cluster(), METHODS[config.method].needs_cuda)
        return Placement(devices=self.name, warnings=warnings, on_gpu=config.slurm.gpus_per_node > 0)

    def submit(self, record: JobRecord, run: RunDir, config: TrainConfig) -> str:
        assert config.slurm is not None
        limit = time_limit(config.slurm, read_cluster())
        extra = tracker_environment(run, dict(os.environ))
        job_id = submit_job(run, config, self.context.home, limit, extra)
        with run.log.open("a", encoding="utf-8") as log:
            log.write(f"[lmtuner] submitted to Slurm as job {job_id} ({config.slurm.nodes} node(s) x "
                      f"{config.slurm.tasks_per_node()} task(s))\n")  # fmt: skip
        return handle_json(job_id=job_id)

    def start_queued(self) -> list[str]:
        return []  # Slurm queues its jobs

    def poll(self, record: JobRecord) -> Ending | None:
        """The job's state, asked of the cluster by its Slurm job id; None while it runs, waits, is requeued, or
        the controller does not answer."""
        job_id = read_handle(record).get("job_id")
        if not job_id:
            return None
        try:
            view = job_view(str(job_id))
        except LmtunerError:
            return None
        return ending_of(view, RunDir(Path(record.run_dir)))

    def stop(self, record: JobRecord, grace_seconds: float) -> Ending | None:
        """scancel: Slurm sends every task SIGTERM (each saves a checkpoint and stops), then SIGKILL after the
        cluster's KillWait. Waits up to grace_seconds (at least 5 s) for Slurm to say the job ended."""
        job_id = read_handle(record).get("job_id")
        if not job_id:
            return Ending("cancelled")  # never reached the cluster
        try:
            cancel_job(str(job_id))
        except LmtunerError:
            if job_view(str(job_id)).state in LIVE_STATES:
                raise  # scancel failed on a job that still runs; one that just ended is reported below
        view = wait_until_ended(str(job_id), max(grace_seconds, 5.0))
        if view.state in LIVE_STATES:
            raise LmtunerError(
                f"job_id: Slurm has not ended job {job_id} yet (it is {view.state}); call cancel_job again",
                field="job_id",
            )
        if view.state == "COMPLETED":
            return None  # it finished before the cancel reached it: poll says so
        return Ending("cancelled")

    def resume(self, record: JobRecord, config: TrainConfig, run: RunDir) -> tuple[TrainConfig, str]:
        """From the newest complete checkpoint of the run folder, in a new Slurm job (checked against the cluster
        again: it may have changed)."""
        if config.slurm is None:
            raise LmtunerError(f"job_id: job {record.job_id}'s config.json has no `slurm` settings", field="job_id")
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise LmtunerError(
                f"job_id: job {record.job_id} saved no checkpoint before it stopped, so there is nothing to resume; "
                "start it again (a smaller save_steps keeps more progress next time)",
                field="job_id",
            )
        check_request(config.slurm, read_cluster(), METHODS[config.method].needs_cuda)
        config = TrainConfig.model_validate({**config.model_dump(), "resume_from": str(checkpoint)})
        return config, f"[lmtuner] resuming on the Slurm cluster from {checkpoint}"

    def view(self, record: JobRecord) -> SlurmJobView | None:
        job_id = read_handle(record).get("job_id")
        if not job_id:
            return None
        try:
            return job_view(str(job_id))
        except LmtunerError:
            return SlurmJobView(job_id=str(job_id), state="UNKNOWN", reason="the Slurm controller did not answer")
