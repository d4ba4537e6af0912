"""propose_config's time estimate (issue 25): on this machine a CPU plan says it is fitted on measured CPU runs; a
plan for a GPU machine names the GPU's published figure. The accuracy against measured jobs is a bench
(bench/estimate_accuracy.py), not a test: timings depend on what else the machine runs."""

from __future__ import annotations

import json

import anyio
import mcp

from server.app import build_server
from tests.helpers import call_ok

H100 = {
    "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_free_mib": 81000,
              "compute_capability": "9.0", "bf16_supported": True} for i in range(2)],
    "memory_total_mib": 2_000_000,
}  # fmt: skip


def test_plan_carries_an_estimate_that_says_what_it_rests_on(tmp_path, tiny_model):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(40)))

    async def scenario():
        async with mcp.Client(build_server(home=tmp_path / "home", roots=[tmp_path, tiny_model])) as client:
            here = await call_ok(client, "propose_config", {"model": str(tiny_model), "dataset": str(data)})
            gpu = await call_ok(
                client, "propose_config", {"model": str(tiny_model), "dataset": str(data), "hardware": H100}
            )
            return here, gpu

    here, gpu = anyio.run(scenario)
    cpu_estimate, gpu_estimate = here["estimate"], gpu["estimate"]
    assert cpu_estimate["basis"].startswith("CPU") and "measured" in cpu_estimate["basis"]
    assert cpu_estimate["wall_seconds"] > cpu_estimate["train_seconds"] > 0 and cpu_estimate["tokens_per_second"] > 0
    assert cpu_estimate["train_tokens"] > 0
    assert "2x NVIDIA H100" in gpu_estimate["basis"] and "published" in gpu_estimate["basis"]
    # two H100s against two idle CPU cores (0.02 s a micro-batch measured): on a 0.6M-parameter model the per-step
    # overheads, not FLOPs, set the pace, so the GPUs are only a few times faster
    assert gpu_estimate["tokens_per_second"] > 2 * cpu_estimate["tokens_per_second"]
    assert gpu_estimate["train_seconds"] < cpu_estimate["train_seconds"]
