"""Jobs on a real two-node Ray cluster (head 127.0.0.2 + worker node 127.0.0.3, one CPU each), through MCP.

One cluster for the module (starting one costs ≈15 s). Every job trains the tiny model on two Ray Train
workers, one per node (gloo), at a global batch of 4 rows per step (2 per worker), so its per-step losses can
be compared with a local single-process job at batch 4. Each scenario starts its own lmtuner-mcp over stdio;
the kill scenario follows its job from a second server process, as after a restart.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import anyio
import psutil
import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.ray_launcher import (
    RAY_ADDRESSES_ENV,
    RayClusterReport,
    RayNode,
    dashboard_url,
    plan_workers,
    workers_that_fit,
)
from tests.helpers import call_error, call_ok, quick_config, read_losses, stdio_client, wait_for_end
from tests.ray_cluster import HEAD_IP, WORKER_IP, ray_cluster, ray_worker_pids

# Two ranks each average the loss over their own rows' tokens before the gradients are averaged, so per-step
# losses differ from one process's token-weighted mean over the same 4 rows (tests/test_distributed.py measured
# ≤ 4.9e-3 with torchrun); the same tolerance as there.
DDP_TOLERANCE = 0.02
STEPS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    started = time.monotonic()
    with ray_cluster(logs) as running:
        print(f"\nRay cluster up in {time.monotonic() - started:.1f}s at {running.dashboard}")
        # The servers the tests start (they inherit the environment) may reach this cluster, and port 9 of its
        # head, where nobody answers: every other address is refused before any connection.
        before = os.environ.get(RAY_ADDRESSES_ENV)
        os.environ[RAY_ADDRESSES_ENV] = f"{running.dashboard},http://{HEAD_IP}:9"
        try:
            yield running
        finally:
            if before is None:
                os.environ.pop(RAY_ADDRESSES_ENV, None)
            else:
                os.environ[RAY_ADDRESSES_ENV] = before


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", n=32)


def ray_config(model: Path, data: Path, address: str, **overrides) -> dict:
    ray = {"address": address, "num_workers": 2, "max_failures": 1, **overrides.pop("ray", {})}
    return quick_config(
        model, data, **{"max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 1, "ray": ray, **overrides}
    )


async def wait_for_step(client, job_id: str, step: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 5, "log_lines": 0})
        assert status["status"] == "running", status
        if status["step"] >= step:
            return status
    raise AssertionError(f"job {job_id} did not reach step {step} within {timeout}s")


def workers_left(cluster, within: float) -> list[int]:
    """RayTrainWorker processes still alive after up to `within` seconds (Ray ends them a moment after the job)."""
    deadline = time.monotonic() + within
    while (pids := ray_worker_pids(cluster)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def wait_for_ray_checkpoint(run_dir: Path, timeout: float = 60) -> None:
    """Until Ray Train has registered a checkpoint of this job (it polls the workers' reports every 2 s)."""
    snapshot = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while not snapshot.is_file():
        assert time.monotonic() < deadline, f"Ray registered no checkpoint within {timeout}s"
        time.sleep(0.2)


def test_wrong_address_and_missing_resources_are_clear_errors_in_seconds(cluster, tiny_model, data, tmp_path):
    roots = [tmp_path, data.parent, tiny_model]

    async def scenario():
        async with stdio_client(tmp_path / "home", roots) as client:
            started = time.monotonic()
            nobody = await call_error(
                client, "start_training", {"config": ray_config(tiny_model, data, f"http://{HEAD_IP}:9")}
            )
            seconds = time.monotonic() - started
            too_many = await call_error(
                client,
                "start_training",
                {"config": ray_config(tiny_model, data, cluster.dashboard, ray={"num_workers": 3})},
            )
            gpus = await call_error(
                client,
                "start_training",
                {"config": ray_config(tiny_model, data, cluster.dashboard, ray={"use_gpu": True})},
            )
            bad = await call_error(client, "start_training", {"config": ray_config(tiny_model, data, "head:8265")})
            outside = ray_config(tiny_model, data, cluster.dashboard, ray={"storage_path": "/etc/lmtuner-checkpoints"})
            confined = await call_error(client, "start_training", {"config": outside})
            hardware = await call_ok(client, "inspect_gpus", {"ray_address": cluster.dashboard})
            jobs = await call_ok(client, "list_jobs", {})
            plan = await call_ok(
                client,
                "propose_config",
                {"model": str(tiny_model), "dataset": str(data), "ray_address": cluster.dashboard},
            )
            dry = await call_ok(client, "start_training", {"config": plan["config"], "dry_run": True})
            return nobody, seconds, too_many, gpus, bad, confined, hardware, jobs, plan, dry

    nobody, seconds, too_many, gpus, bad, confined, hardware, jobs, plan, dry = anyio.run(scenario)
    assert "ray.address: no Ray dashboard answers at http://127.0.0.2:9" in nobody and seconds < 15
    assert "ray.num_workers: 3 workers of CPU 1 each do not fit" in too_many and "its nodes hold 2" in too_many
    assert f"{HEAD_IP} (CPU 1" in too_many and f"{WORKER_IP} (CPU 1" in too_many  # what the cluster has
    assert "ray.use_gpu: no node of the Ray cluster" in gpus and "'GPU'" in gpus
    assert "config.ray.address" in bad and "'head:8265' is not a Ray cluster address" in bad
    # The path itself is shown as hidden: errors over MCP show no path outside the roots (docs/SECURITY.md).
    assert "ray.storage_path: " in confined and "is outside the allowed folders" in confined, confined
    assert jobs["jobs"] == []  # nothing was submitted or recorded
    nodes = hardware["cluster"]["nodes"]
    assert sorted(n["node_ip"] for n in nodes) == [HEAD_IP, WORKER_IP] and all(n["alive"] for n in nodes)
    assert hardware["cluster"]["total"]["CPU"] == 2
    # propose_config plans one worker per node of this CPU-only cluster, and the plan passes start_training's checks.
    assert plan["config"]["ray"]["num_workers"] == 2 and plan["config"]["ray"]["resources_per_worker"] == {"CPU": 1}
    assert any("Ray cluster at" in line for line in plan["rationale"])
    assert dry["status"] == "dry_run" and dry["config"]["ray"]["address"] == cluster.dashboard


def test_two_workers_on_two_nodes_match_a_local_run_and_the_adapter_loads(cluster, tiny_model, data, tmp_path):
    roots = [tmp_path, data.parent, tiny_model]

    async def scenario():
        async with stdio_client(tmp_path / "home", roots) as client:
            local = await call_ok(
                client, "start_training", {"config": quick_config(tiny_model, data, max_steps=STEPS, batch_size=4)}
            )
            local_final = await wait_for_end(client, local["job_id"])
            started = await call_ok(
                client, "start_training", {"config": ray_config(tiny_model, data, cluster.dashboard)}
            )
            final = await wait_for_end(client, started["job_id"])
            listed = await call_ok(client, "list_jobs", {})
            answer = await call_ok(
                client, "generate",
                {"model": str(tiny_model), "adapter": final["output_dir"], "prompts": ["What is 2 plus 3?"],
                 "max_new_tokens": 4},
            )  # fmt: skip
            curve = await client.read_resource(f"lmtuner://jobs/{final['job_id']}/loss.png")
            return local_final, started, final, listed, answer, curve

    local_final, started, final, listed, answer, curve = anyio.run(scenario)
    assert local_final["status"] == "completed", local_final["error"]
    assert started["status"] == "running" and started["config"]["ray"]["num_workers"] == 2
    assert final["status"] == "completed", f"{final['error']}\n" + "\n".join(final["log_tail"])
    assert final["step"] == STEPS and final["devices"] == "ray"
    ray = final["ray"]
    assert ray["job_id"] == f"lmtuner-{final['job_id']}" and ray["restarts"] == 0
    assert sorted(w["rank"] for w in ray["workers"]) == [0, 1] and ray["nodes"] == [HEAD_IP, WORKER_IP]
    assert {j["job_id"]: j["status"] for j in listed["jobs"]}[final["job_id"]] == "completed"

    losses, baseline = read_losses(final["run_dir"]), read_losses(local_final["run_dir"])
    differences = [abs(a - b) for a, b in zip(losses, baseline, strict=True)]
    print(
        f"\nRay 2 workers: {losses}\n  local batch 4: {baseline}\n  |difference| max {max(differences):.2e}; "
        f"submit to completed {final['elapsed_seconds']}s (local job {local_final['elapsed_seconds']}s)"
    )
    assert max(differences) < DDP_TOLERANCE and losses[-1] < losses[0]
    output = Path(final["output_dir"])
    assert (output / "adapter_model.safetensors").is_file()
    assert json.loads((output / "lmtuner_artifact.json").read_text())["base_model"] == str(tiny_model)
    assert len(answer["outputs"]) == 1  # the adapter loaded onto the base and generated
    assert curve.contents[0].mime_type == "image/png"  # the loss-curve resource, as for a local job
    checkpoints = list(Path(final["run_dir"], "ray", final["job_id"]).glob("checkpoint_*/checkpoint"))
    assert checkpoints, "Ray Train kept no checkpoint in storage_path"


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_a_dpo_or_grpo_job_runs_on_two_workers_on_two_nodes(stage, cluster, tiny_model, tmp_path):
    """Issue 24: the stages beyond SFT go through the same seam — the Ray workers pick the stage's recipe (TRL's
    DPOTrainer, GRPOTrainer) and job_status shows its reward metrics as for a local job."""
    from tests.test_preference import pair_rows, write_jsonl

    if stage == "dpo":
        data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
        extra: dict = {}
    else:
        rows = [{"prompt": f"Say {word}", "answer": word} for word in ("cat", "dog", "sun", "tree") * 4]
        data = write_jsonl(tmp_path / "prompts.jsonl", rows)
        extra = {"graders": [{"type": "string_check", "reference": "answer", "operation": "contains"}],
                 "grpo": {"num_generations": 4, "max_completion_length": 6}, "report": False,
                 "batch_size": 4}  # fmt: skip
    config = ray_config(tiny_model, data, cluster.dashboard, stage=stage, learning_rate=5e-4, logging_steps=1,
                        **extra)  # fmt: skip

    async def scenario():
        async with stdio_client(tmp_path / "home", [tmp_path, tiny_model]) as client:
            started = await call_ok(client, "start_training", {"config": config})
            return await wait_for_end(client, started["job_id"])

    final = anyio.run(scenario)
    assert final["status"] == "completed", f"{final['error']}\n" + "\n".join(final["log_tail"])
    assert final["devices"] == "ray" and final["ray"]["nodes"] == [HEAD_IP, WORKER_IP]
    assert final["stage"] == stage and final["step"] == STEPS
    records = [json.loads(line) for line in Path(final["run_dir"], "metrics.jsonl").read_text().splitlines()]
    key = "rewards_accuracy" if stage == "dpo" else "reward_mean"
    assert any(key in r for r in records), records[-3:]  # the stage's own metrics, from the rank-0 worker
    assert (Path(final["output_dir"]) / "adapter_model.safetensors").is_file()


def test_killed_worker_restarts_from_its_checkpoint_then_cancel_and_resume(cluster, tiny_model, data, tmp_path):
    """One job through every fault: the worker on the second node killed (Ray restarts the group from its
    checkpoint), then cancelled (no worker left), then resumed from storage_path to completion. It is started
    by one server and followed by another, as after a server restart: the second one reattaches by the Ray
    job id."""
    roots = [tmp_path, data.parent, tiny_model]
    config = ray_config(tiny_model, data, cluster.dashboard, max_steps=100, save_steps=10, logging_steps=5)

    async def start():
        async with stdio_client(tmp_path / "home", roots) as client:
            return await call_ok(client, "start_training", {"config": config})

    started = anyio.run(start)
    job_id, run_dir = started["job_id"], Path(started["run_dir"])

    async def follow():
        async with stdio_client(tmp_path / "home", roots) as client:
            await wait_for_step(client, job_id, 11)
            wait_for_ray_checkpoint(run_dir)  # Ray registered the step-10 checkpoint
            before = await call_ok(client, "job_status", {"job_id": job_id, "log_lines": 0})
            workers = before["ray"]["workers"]
            assert sorted(w["node_ip"] for w in workers) == [HEAD_IP, WORKER_IP]  # SPREAD: one worker per node
            # Ray does not promise which rank lands on which node: kill the one on the second node, whatever its rank.
            victim = next(w for w in workers if w["node_ip"] == WORKER_IP)
            assert victim["pid"] in ray_worker_pids(cluster)
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.time()
            deadline = time.monotonic() + 180
            while True:  # until the restarted group has trained a few steps past its checkpoint
                restarted = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 5, "log_lines": 0})
                assert restarted["status"] == "running" and time.monotonic() < deadline, restarted
                if restarted["ray"]["restarts"] == 1 and restarted["step"] >= 25:
                    break
            cancel_started = time.monotonic()
            cancelled = await call_ok(client, "cancel_job", {"job_id": job_id})
            left = workers_left(cluster, within=10)
            cancel_seconds = time.monotonic() - cancel_started
            resumed = await call_ok(client, "resume_job", {"job_id": job_id})
            final = await wait_for_end(client, job_id, timeout=300)
            return before, victim, killed_at, restarted, cancelled, cancel_seconds, left, resumed, final

    before, victim, killed_at, restarted, cancelled, cancel_seconds, left, resumed, final = anyio.run(follow)
    log = (run_dir / "train.log").read_text()
    ray = restarted["ray"]
    attempts = [json.loads(line) for line in (run_dir / "ray_attempts.jsonl").read_text().splitlines()]
    print(
        f"\nkilled rank {victim['rank']} (pid {victim['pid']}) at step {before['step']}; a new group started "
        f"{attempts[1]['started_at'] - killed_at:.1f}s later from {ray['resumed_from']}; cancel_job and no worker "
        f"left after {cancel_seconds:.1f}s; {len(attempts)} attempts in all"
    )
    assert ray["attempts"] == 2 and ray["resumed_from"] and "checkpoint_" in ray["resumed_from"]
    assert victim["pid"] not in [w["pid"] for w in ray["workers"]]  # a new worker group
    assert "resuming from" in log

    assert cancelled["status"] == "cancelled"
    assert left == []  # no RayTrainWorker left on either node
    assert not any(psutil.pid_exists(w["pid"]) for w in ray["workers"])

    assert "/ray/" in resumed["config"]["resume_from"] and resumed["status"] == "running"
    assert final["status"] == "completed", f"{final['error']}\n{log[-3000:]}"
    assert final["step"] == 100 and final["ray"]["job_id"] != ray["job_id"] and final["ray"]["resumed_from"]
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps.count(5) == 1 and steps[-1] == 100  # each restart continued from a checkpoint, not from step 0


@pytest.mark.parametrize(
    ("ray", "expected"),
    [
        ({"address": "head:8265"}, "ray.address: 'head:8265' is not a Ray cluster address"),
        ({"address": "auto", "num_workers": 0}, "ray.num_workers: Input should be greater than or equal to 1"),
        ({"address": "auto", "resources_per_worker": {"GPU": 1}}, "asks for a GPU but use_gpu is false"),
        ({"address": "auto", "use_gpu": True, "resources_per_worker": {"CPU": 4}}, "asks for no 'GPU'"),
        ({"address": "auto", "resources_per_worker": {"CPU": -1}}, "resource 'CPU': -1 is not an amount"),
        ({"address": "auto", "workers": 2}, "unknown key 'workers'"),
        ({"address": "auto", "python": "python3 -c 'x'"}, "is not an absolute interpreter path"),
    ],
)
def test_bad_ray_settings_are_refused_by_name(ray, expected):
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({"model": "m", "dataset": "d.jsonl", "ray": ray})
    assert expected in str(caught.value)


def test_ray_refuses_the_local_launch_settings_and_plans_workers_per_node():
    for other in ({"nodes": {"count": 2}}, {"processes_per_node": 2}, {"deepspeed": {"stage": 2}}):
        with pytest.raises(LmtunerError, match="ray: "):
            parse_train_config({"model": "m", "dataset": "d.jsonl", "ray": {"address": "auto"}, **other})
    assert dashboard_url("ray://10.0.0.5:10001") == "http://10.0.0.5:8265"
    assert dashboard_url("http://head:8265/") == "http://head:8265"
    node = {"node_id": "n", "node_ip": "10.0.0.5", "is_head": False, "alive": True}
    report = RayClusterReport(
        address="auto", dashboard="auto", total={},
        nodes=[RayNode(**node, resources={"CPU": 16, "GPU": 2}), RayNode(**node, resources={"CPU": 8, "GPU": 4})],
    )  # fmt: skip
    assert workers_that_fit({"CPU": 8, "GPU": 1}, report) == 3  # 2 on the first node (CPUs), 1 on the second
    assert workers_that_fit({"CPU": 1}, report) == 24
    settings, why = plan_workers(report)  # propose_config's plan: one worker per GPU, the CPUs of the leanest node
    assert (settings.num_workers, settings.use_gpu, settings.resources_per_worker) == (6, True, {"CPU": 2, "GPU": 1})
    assert "6 workers, one per GPU of the 2 GPU node(s)" in why
