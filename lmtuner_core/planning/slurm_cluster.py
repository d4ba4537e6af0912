"""A Slurm cluster as `scontrol` describes it, for inspect_gpus and propose_config, and the check that refuses a
partition or resource request it cannot give, naming what it has — before anything is submitted. Every Slurm command
runs with a time limit. Cluster reading sits with planning, as `ray_cluster.py` does for Ray; submitting and
following jobs is `jobs/slurm_launcher.py`."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess

from pydantic import BaseModel, Field

from lmtuner_core.config import SlurmSettings
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.secrets import redact

COMMAND_TIMEOUT_SECONDS = 10.0  # each scontrol/sacct/scancel call; sbatch gets SUBMIT_TIMEOUT_SECONDS
UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")
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
