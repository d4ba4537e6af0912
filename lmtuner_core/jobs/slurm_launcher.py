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
import shlex
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from lmtuner_core.config import SlurmSettings, TrainConfig
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.launcher import Ending, LaunchContext, Placement, handle_json, read_handle, tracker_environment
from lmtuner_core.jobs.store import JobRecord
from lmtuner_core.methods import METHODS
from lmtuner_core.planning.slurm_cluster import (  # noqa: F401  (cluster reading and checking live in planning/)
    COMMAND_TIMEOUT_SECONDS,
    SlurmClusterReport,
    SlurmNode,
    SlurmPartition,
    _int,
    check_request,
    describe_node,
    describe_partition,
    expand_hostlist,
    parse_minutes,
    parse_records,
    pick_partition,
    plan_slurm,
    read_cluster,
    slurm_command,
)
from lmtuner_core.run import RunDir
from lmtuner_core.secrets import SERVER_ONLY, redact

SUBMIT_TIMEOUT_SECONDS = 60
SLURM_FOLDER = "slurm"  # submitit's folder by default, inside the run folder
# Slurm job states (scontrol's JobState, sacct's State) of a job that will still run or runs now.
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
    "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT",
})  # fmt: skip


class SlurmJobView(BaseModel):
    """How a job runs on its Slurm cluster, asked of the cluster by its Slurm job id."""

    job_id: str = Field(description="The Slurm job id (squeue, sacct, scancel take it). Example: '4242'.")
    state: str = Field(description="Slurm's state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, NODE_FAIL, ...")
    nodes: list[str] = Field(default_factory=list, description="The nodes it runs (or ran) on.")
    reason: str | None = Field(None, description="Why it waits or ended, as Slurm says it. Example: 'Resources'.")
    restarts: int = Field(0, description="Times Slurm requeued it (node failure, time limit); each run continued "
                          "from the newest checkpoint.")  # fmt: skip
    partition: str | None = Field(None, description="The partition it runs in.")


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
