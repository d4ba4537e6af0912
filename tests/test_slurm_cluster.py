"""Jobs on a real two-node Slurm cluster (slurmctld + slurmd `n1` and `n2` on this machine, two CPUs each, with
accounting), through MCP.

One cluster for the module (starting one costs ≈12 s; tests/slurm_cluster.py). Every job trains the tiny model as
two Slurm tasks, one per node (gloo), at a global batch of 4 rows per step (2 per task), so its per-step losses can
be compared with a local single-process job at batch 4. Each scenario starts its own lmtuner-mcp over stdio; the
crash scenario follows its job from a second server process, as after a restart.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import anyio
import pytest

from lmtuner_core.config import SlurmSettings, parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.slurm_launcher import (
    SlurmClusterReport,
    SlurmNode,
    SlurmPartition,
    check_request,
    expand_hostlist,
    parse_minutes,
    parse_records,
    plan_slurm,
)
from tests.helpers import call_error, call_ok, quick_config, read_losses, stdio_client, wait_for_end
from tests.slurm_cluster import INSTALL_HINT, NODE_CPUS, SHORT_MINUTES, missing_programs, slurm_cluster

# Two ranks each average the loss over their own rows' tokens before the gradients are averaged, so per-step losses
# differ from one process's token-weighted mean over the same 4 rows (tests/test_distributed.py measured ≤ 4.9e-3
# with torchrun); the same tolerance as there.
DDP_TOLERANCE = 0.02
STEPS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_programs():
        pytest.skip(f"the Slurm packages are not installed ({', '.join(missing_programs())} missing): {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip("the test's Slurm daemons (slurmd runs the jobs) need root; run the Slurm tests as root")
    if importlib.util.find_spec("submitit") is None:
        pytest.skip("submitit is not installed: pip install 'lmtuner[cluster]'")
    started = time.monotonic()
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        print(f"\nSlurm cluster up in {time.monotonic() - started:.1f}s ({running.conf})")
        before = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(running.conf)  # the servers the tests start inherit it
        try:
            yield running
        finally:
            if before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = before


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", n=32)


def slurm_config(model: Path, data: Path, **overrides) -> dict:
    slurm = {"nodes": 2, **overrides.pop("slurm", {})}
    return quick_config(
        model, data, **{"max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 1, "slurm": slurm,
                        **overrides}
    )  # fmt: skip


def test_impossible_requests_are_refused_before_submitting(cluster, tiny_model, data, tmp_path):
    roots = [tmp_path, data.parent, tiny_model]

    async def scenario():
        async with stdio_client(tmp_path / "home", roots) as client:
            asks = {
                "partition": {"partition": "gpu-h100"},
                "nodes": {"nodes": 3},
                "gpus": {"gpus_per_node": 1},
                "memory": {"mem_gb": 1000},
                "cpus": {"cpus_per_task": NODE_CPUS + 1},
                "time": {"partition": "short", "time_minutes": SHORT_MINUTES + 5},
            }
            refused = {}
            for name, slurm in asks.items():
                config = slurm_config(tiny_model, data, slurm=slurm)
                refused[name] = await call_error(client, "start_training", {"config": config})
            both = slurm_config(tiny_model, data, ray={"address": "auto"})
            refused["both"] = await call_error(client, "start_training", {"config": both})
            jobs = await call_ok(client, "list_jobs", {})
            hardware = await call_ok(client, "inspect_gpus", {"slurm": True})
            plan = await call_ok(
                client, "propose_config", {"model": str(tiny_model), "dataset": str(data), "slurm_partition": "default"}
            )
            dry = await call_ok(client, "start_training", {"config": plan["config"], "dry_run": True})
            return refused, jobs, hardware, plan, dry

    refused, jobs, hardware, plan, dry = anyio.run(scenario)
    have = f"n1 ({NODE_CPUS} CPUs, {cluster.node_memory_mib / 1024:.1f} GiB, no GPU)"
    assert "slurm.partition: 'gpu-h100' is not a partition of this cluster" in refused["partition"]
    assert "debug (default, 2 nodes, no time limit, up)" in refused["partition"]
    assert f"short (2 nodes, at most {SHORT_MINUTES} min, up)" in refused["partition"]
    assert "slurm.nodes: 3 node(s) asked, but partition 'debug' has 2" in refused["nodes"] and have in refused["nodes"]
    assert "slurm.gpus_per_node: 2 node(s) with 1 GPU(s) each asked" in refused["gpus"] and have in refused["gpus"]
    assert "slurm.mem_gb: 2 node(s) with 1000 GB of memory each" in refused["memory"] and have in refused["memory"]
    assert f"slurm.cpus_per_task: 2 node(s) with {NODE_CPUS + 1} CPUs" in refused["cpus"]
    assert f"slurm.time_minutes: {SHORT_MINUTES + 5} min is over the {SHORT_MINUTES} min limit" in refused["time"]
    assert "slurm, ray: a job runs on one cluster" in refused["both"]
    assert jobs["jobs"] == []  # nothing was recorded ...
    assert cluster.run("squeue", "-h") == ""  # ... or submitted
    slurm = hardware["slurm"]
    assert [p["name"] for p in slurm["partitions"]] == ["debug", "short"] and slurm["partitions"][0]["default"]
    assert slurm["partitions"][1]["max_time_minutes"] == SHORT_MINUTES
    assert [(n["name"], n["cpus"], n["gpus"]) for n in slurm["nodes"]] == [("n1", NODE_CPUS, 0), ("n2", NODE_CPUS, 0)]
    # propose_config plans one task per node of this CPU-only partition, and the plan passes start_training's checks.
    planned = plan["config"]["slurm"]
    assert (planned["partition"], planned["nodes"], planned["gpus_per_node"]) == ("debug", 2, 0)
    assert planned["cpus_per_task"] == NODE_CPUS
    assert any("Slurm partition 'debug'" in line for line in plan["rationale"])
    assert dry["status"] == "dry_run" and dry["config"]["slurm"]["nodes"] == 2


def test_two_tasks_on_two_nodes_match_a_local_run(cluster, tiny_model, data, tmp_path):
    roots = [tmp_path, data.parent, tiny_model]

    async def scenario():
        async with stdio_client(tmp_path / "home", roots) as client:
            local = await call_ok(
                client, "start_training", {"config": quick_config(tiny_model, data, max_steps=STEPS, batch_size=4)}
            )
            local_final = await wait_for_end(client, local["job_id"])
            started = await call_ok(client, "start_training", {"config": slurm_config(tiny_model, data)})
            final = await wait_for_end(client, started["job_id"])
            return local_final, started, final

    local_final, started, final = anyio.run(scenario)
    assert local_final["status"] == "completed", local_final["error"]
    assert started["status"] == "running" and started["config"]["slurm"]["nodes"] == 2
    assert final["status"] == "completed", f"{final['error']}\n" + "\n".join(final["log_tail"])
    assert final["step"] == STEPS and final["devices"] == "slurm"
    slurm = final["slurm"]
    assert slurm["job_id"].isdigit() and slurm["state"] == "COMPLETED" and slurm["nodes"] == ["n1", "n2"]
    assert slurm["restarts"] == 0 and slurm["partition"] == "debug"
    log = Path(final["run_dir"], "train.log").read_text()
    assert f"slurm job {slurm['job_id']}: 2 task(s) on n[1-2]" in log
    losses, baseline = read_losses(final["run_dir"]), read_losses(local_final["run_dir"])
    differences = [abs(a - b) for a, b in zip(losses, baseline, strict=True)]
    print(
        f"\nSlurm 2 tasks on 2 nodes: {losses}\n  local batch 4: {baseline}\n  |difference| max {max(differences):.2e}"
        f"; submit to completed {final['elapsed_seconds']}s (local job {local_final['elapsed_seconds']}s)"
    )
    assert max(differences) < DDP_TOLERANCE and losses[-1] < losses[0]
    assert (Path(final["output_dir"]) / "adapter_model.safetensors").is_file()


def wait_until(check, what: str, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(every)
    return value


def test_node_crash_is_requeued_from_its_checkpoint_then_reattach_cancel_and_resume(
    cluster, tiny_model, data, tmp_path
):
    """One job through every fault: started by one server and followed by another (a restart: it reattaches by the
    Slurm job id); the second node crashes (its slurmd and its task SIGKILLed) and Slurm requeues the job, which
    continues from its checkpoint; then it is cancelled (no task left on either node) and resumed to the end."""
    roots = [tmp_path, data.parent, tiny_model]
    config = slurm_config(tiny_model, data, max_steps=300, save_steps=10, logging_steps=5)

    async def start():
        async with stdio_client(tmp_path / "home", roots) as client:
            return await call_ok(client, "start_training", {"config": config})

    started = anyio.run(start)  # that server is gone now
    job_id, run_dir = started["job_id"], Path(started["run_dir"])

    async def follow():
        async with stdio_client(tmp_path / "home", roots) as client:
            status = lambda: call_ok(client, "job_status", {"job_id": job_id, "log_lines": 0})  # noqa: E731
            attached = await status()
            slurm_id = attached["slurm"]["job_id"]
            # The task on n2 (its Python, found by SLURM_JOB_ID and SLURMD_NODENAME), looked up before the kill.
            victims = await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: cluster.job_processes(slurm_id, "n2"), "the task on n2", 180)
            )
            checkpoint = run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json"
            await anyio.to_thread.run_sync(lambda: wait_until(checkpoint.is_file, "checkpoint-10", 180, 0.05))
            killed = cluster.crash_node("n2", victims)
            crashed_at = time.monotonic()
            # Slurm declares n2 down after SlurmdTimeout and requeues the job; the task on n1 waits for that.
            requeued = await _until(status, lambda s: s["slurm"]["restarts"] == 1, 120)
            cluster.start_slurmd("n2")
            await anyio.to_thread.run_sync(lambda: cluster.wait_idle(("n2",)))
            await anyio.to_thread.run_sync(lambda: release_requeue_hold(cluster, slurm_id))
            rerun = await _until(status, lambda s: s["slurm"]["state"] == "RUNNING" and s["step"] >= 20, 180)
            rerun_seconds = time.monotonic() - crashed_at
            cancelled = await call_ok(client, "cancel_job", {"job_id": job_id})
            left, squeue = await anyio.to_thread.run_sync(lambda: _processes_left(cluster, slurm_id, 15))
            resumed = await call_ok(client, "resume_job", {"job_id": job_id})
            final = await wait_for_end(client, job_id, timeout=300)
            return attached, killed, requeued, rerun, rerun_seconds, cancelled, left, squeue, resumed, final

    attached, killed, requeued, rerun, rerun_seconds, cancelled, left, squeue, resumed, final = anyio.run(follow)
    log = (run_dir / "train.log").read_text()
    print(
        f"\nreattached to Slurm job {attached['slurm']['job_id']} ({attached['slurm']['state']}); crashed n2 (pids "
        f"{killed}); requeued, running again past step 20 {rerun_seconds:.0f}s after the crash (the ~2 min hold "
        f"skipped); cancelled; resumed as Slurm job {final['slurm']['job_id']}"
    )
    assert attached["status"] == "running" and attached["slurm"]["nodes"] in ([], ["n1", "n2"])
    assert requeued["status"] == "running"  # a requeue is not an ending
    assert "run 2 (requeued by Slurm); resuming from" in log and "checkpoint-10" in log
    assert rerun["slurm"]["restarts"] == 1 and rerun["slurm"]["nodes"] == ["n1", "n2"]

    assert cancelled["status"] == "cancelled" and left == [] and squeue == ""  # no task left, nothing queued

    assert "/checkpoints/checkpoint-" in resumed["config"]["resume_from"] and resumed["status"] == "running"
    assert final["status"] == "completed", f"{final['error']}\n{log[-3000:]}"
    assert final["step"] == 300 and final["slurm"]["job_id"] != attached["slurm"]["job_id"]
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps.count(5) == 1 and steps[-1] == 300  # each run continued from a checkpoint, not from step 0


async def _until(status, condition, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = await status()
        assert current["status"] == "running", current
        if condition(current):
            return current
        assert time.monotonic() < deadline, f"not within {timeout}s: {current['slurm']}"
        await anyio.sleep(0.5)


def _processes_left(cluster, slurm_id: str, within: float) -> tuple[list[str], str]:
    """The job's processes still alive on either node (found by their SLURM_JOB_ID) and what squeue still lists of
    it, after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        procs = cluster.job_processes(slurm_id)
        queued = cluster.run("squeue", "-h", "-j", slurm_id).strip()
        if (not procs and not queued) or time.monotonic() > deadline:
            return [f"{p.pid} {p.name()}" for p in procs], queued
        time.sleep(0.2)


def release_requeue_hold(cluster, slurm_id: str, within: float = 60) -> None:
    """Slurm holds a requeued job about two minutes (reason BeginTime) before it may start again: an
    administrator's `scontrol update StartTime=now` skips that wait, so the test does not sit through it."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        job = parse_records(cluster.run("scontrol", "show", "job", "-o", slurm_id))[0]
        if job.get("JobState") == "RUNNING":
            return
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            cluster.run("scontrol", "update", f"JobId={slurm_id}", "StartTime=now")
            return
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("slurm", "expected"),
    [
        ({"partition": "gpu queue"}, "slurm.partition: 'gpu queue' is not a Slurm name"),
        ({"nodes": 0}, "slurm.nodes: Input should be greater than or equal to 1"),
        ({"gpus_per_node": -1}, "slurm.gpus_per_node: Input should be greater than or equal to 0"),
        ({"mem_gb": 0}, "slurm.mem_gb: Input should be greater than 0"),
        ({"time_minutes": 0}, "slurm.time_minutes: Input should be greater than or equal to 1"),
        ({"account": "lab;rm"}, "slurm.account: 'lab;rm' is not a Slurm name"),
        ({"python": "python3"}, "slurm.python: 'python3' is not an absolute interpreter path"),
        ({"gpu_per_node": 1}, "unknown key 'gpu_per_node' (did you mean 'gpus_per_node'?)"),
    ],
)
def test_bad_slurm_settings_are_refused_by_name(slurm, expected):
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({"model": "m", "dataset": "d.jsonl", "slurm": slurm})
    assert expected in str(caught.value)


def test_slurm_refuses_the_local_launch_settings_and_reads_slurm_forms():
    for other, named in (
        ({"ray": {"address": "auto"}}, "slurm, ray:"),
        ({"nodes": {"count": 2}}, "slurm: "),
        ({"processes_per_node": 2}, "slurm: "),
        ({"devices": [0]}, "slurm: "),
        ({"deepspeed": {"stage": 2}}, "slurm: "),
    ):
        with pytest.raises(LmtunerError, match=named):
            parse_train_config({"model": "m", "dataset": "d.jsonl", "slurm": {}, **other})
    assert expand_hostlist("gpu[001-003,7],login1,n[1-2]") == [
        "gpu001",
        "gpu002",
        "gpu003",
        "gpu7",
        "login1",
        "n1",
        "n2",
    ]
    assert [parse_minutes(t) for t in ("UNLIMITED", "30", "5:00", "2:00:00", "1-00:00:00", "2-12")] == [
        None, 30, 5, 120, 1440, 3600,
    ]  # fmt: skip
    node = parse_records(
        "NodeName=gpu7 Arch=x86_64 CPUTot=64 RealMemory=515000 Gres=gpu:a100:4(S:0-1) State=IDLE+DRAIN "
        "OS=Linux 6.1.0 #1 SMP Reason=Not responding [slurm@2026-12-06T01:00:00] Partitions=gpu,long"
    )[0]
    assert node["OS"] == "Linux 6.1.0 #1 SMP" and node["Reason"].startswith("Not responding")
    assert node["Gres"] == "gpu:a100:4(S:0-1)" and node["Partitions"] == "gpu,long"


def test_gpu_partitions_are_checked_and_planned_per_gpu():
    """The check and the plan on a GPU cluster as `scontrol` would describe it (no GPU cluster runs here)."""
    records = parse_records(
        "NodeName=g1 CPUTot=64 RealMemory=512000 Gres=gpu:a100:8(S:0-1) State=IDLE Partitions=gpu\n"
        "NodeName=g2 CPUTot=32 RealMemory=256000 Gres=gpu:a100:4 State=MIXED Partitions=gpu\n"
        "NodeName=g3 CPUTot=64 RealMemory=512000 Gres=gpu:a100:8 CfgTRES=cpu=64,gres/gpu=8 State=DOWN+NOT_RESPONDING "
        "Partitions=gpu\n"
    )
    nodes = [
        SlurmNode(name=r["NodeName"], state=r["State"], available="DOWN" not in r["State"],
                  partitions=r["Partitions"].split(","), cpus=int(r["CPUTot"]), memory_mib=int(r["RealMemory"]),
                  gpus=int(r["Gres"].split(":")[2].split("(")[0]), gpu_type="a100")
        for r in records
    ]  # fmt: skip
    gpu = SlurmPartition(name="gpu", default=True, state="UP", nodes=["g1", "g2", "g3"], max_time_minutes=2880,
                         allow_accounts=["lab-nlp"])  # fmt: skip
    report = SlurmClusterReport(partitions=[gpu], nodes=nodes)
    settings, why = plan_slurm(report, "gpu")  # the nodes with the most GPUs that take jobs: g1 alone (g3 is down)
    assert (settings.nodes, settings.gpus_per_node, settings.cpus_per_task) == (1, 8, 8), why
    assert "global batch is x 8" in why
    ok = SlurmSettings(partition="gpu", nodes=2, gpus_per_node=8, cpus_per_task=8, account="lab-nlp")
    assert any("only 1 of the 2 nodes" in w for w in check_request(ok, report))  # g3 is down: it waits
    for asked, expected in (
        ({"nodes": 3}, "slurm.gpus_per_node: 3 node(s) with 8 GPU(s) each asked, but partition 'gpu' has 2"),
        ({"cpus_per_task": 16}, "slurm.cpus_per_task: 2 node(s) with 128 CPUs (8 task(s) x 16) each asked"),
        ({"account": "lab-vision"}, "slurm.account: partition 'gpu' admits lab-nlp, not 'lab-vision'"),
        ({"time_minutes": 3000}, "slurm.time_minutes: 3000 min is over the 2880 min limit"),
    ):
        with pytest.raises(LmtunerError) as caught:
            check_request(ok.model_copy(update=asked), report)
        assert expected in str(caught.value)
        if "node(s)" in expected:  # a resource no node has: the nodes are listed with theirs
            assert "g2 (32 CPUs, 250.0 GiB, 4 GPUs a100)" in str(caught.value)
    with pytest.raises(LmtunerError, match="method: this method needs a CUDA GPU"):
        check_request(SlurmSettings(partition="gpu"), report, method_needs_cuda="bitsandbytes 4-bit")
