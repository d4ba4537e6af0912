"""End to end over stdio, as a desktop host does it: spawn lmtuner-mcp, initialize, train, watch, use the result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtuner_core.data.sample_data import write_demo_dataset
from tests.helpers import call_error, call_ok, quick_config, read_losses, stdio_client, wait_for_end


@pytest.fixture
def demo_data(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "data" / "demo.jsonl", n=64)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_lora_job_completes_and_adapter_changes_the_model(tiny_model, demo_data, lmtuner_home, tmp_path):
    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            started = await call_ok(client, "start_training", {"config": quick_config(tiny_model, demo_data)})
            assert started["status"] == "running" and started["job_id"]
            return await wait_for_end(client, started["job_id"])

    final = anyio.run(scenario)
    assert final["status"] == "completed", final["error"]
    assert final["step"] == final["total_steps"] == 12
    losses = read_losses(final["run_dir"])
    assert len(losses) == 12 and losses[-1] < losses[0]

    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = _logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, final["output_dir"])
    after = _logits(tuned, tokenizer)
    assert (after - before).abs().max() > 1e-3
    artifact = json.loads(Path(final["output_dir"], "lmtuner_artifact.json").read_text())
    assert artifact["adapter"] is True and artifact["base_model"] == str(tiny_model)
    assert Path(final["run_dir"], "config.json").is_file()


def test_full_job_writes_a_model_that_differs_from_the_base(tiny_model, demo_data, lmtuner_home, tmp_path):
    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            config = quick_config(tiny_model, demo_data, method="full", learning_rate=1e-3)
            started = await call_ok(client, "start_training", {"config": config})
            return await wait_for_end(client, started["job_id"])

    final = anyio.run(scenario)
    assert final["status"] == "completed", final["error"]
    losses = read_losses(final["run_dir"])
    assert losses[-1] < losses[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer)
    tuned = _logits(AutoModelForCausalLM.from_pretrained(final["output_dir"]), tokenizer)
    assert (tuned - base).abs().max() > 1e-3


def test_cancel_reaches_cancelled_before_the_grace_period(tiny_model, demo_data, lmtuner_home, tmp_path):
    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            config = quick_config(tiny_model, demo_data, max_steps=100_000, save_steps=1_000_000)
            # 100,000 steps is over the default 30-minute limit: confirmed as a user would (test_confirmation.py)
            started = await call_ok(client, "start_training", {"config": config, "confirmed": True})
            job_id = started["job_id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 5})
                if status["step"] > 0:
                    break
            assert status["status"] == "running" and status["step"] > 0, status
            asked = time.monotonic()
            cancelled = await call_ok(client, "cancel_job", {"job_id": job_id})
            took = time.monotonic() - asked
            after = await call_ok(client, "job_status", {"job_id": job_id})
            listed = await call_ok(client, "list_jobs", {"status": "cancelled"})
            return cancelled, took, after, listed

    cancelled, took, after, listed = anyio.run(scenario)
    assert cancelled["status"] == "cancelled"
    # Cancel waits for the step in progress and a checkpoint: ~1 s each on an idle machine, 12 s measured with two
    # other test suites on the same 2 cores. The bound catches a cancel that waits for the grace period (20 s) or
    # hangs, not a slow step.
    assert took < 20, f"cancel took {took:.1f}s"
    assert after["status"] == "cancelled" and after["error"] is None
    assert cancelled["checkpoints"], "a cancelled job keeps a checkpoint to resume from"
    assert [job["job_id"] for job in listed["jobs"]] == [cancelled["job_id"]]


def test_bad_inputs_are_tool_errors_and_the_server_keeps_answering(tiny_model, demo_data, lmtuner_home, tmp_path):
    no_config = tmp_path / "not-a-model"
    no_config.mkdir()
    broken = tmp_path / "data" / "broken.jsonl"
    good_rows = demo_data.read_text().splitlines()
    broken.write_text("\n".join([good_rows[0], good_rows[1], "{this is not json", good_rows[2]]) + "\n")
    outside = Path("/etc/hostname")
    base = quick_config(tiny_model, demo_data)
    cases = [
        ({**base, "learnig_rate": 1e-4}, ["unknown key 'learnig_rate'", "did you mean 'learning_rate'"]),
        ({**base, "dataset": str(tmp_path / "data" / "missing.jsonl")}, ["dataset", "not found"]),
        ({**base, "learning_rate": -0.1}, ["learning_rate", "greater than 0"]),
        ({**base, "method": "sparse-magic"}, ["method", "'lora'", "'full'"]),
        ({**base, "model": str(no_config)}, ["model", "no config.json"]),
        ({**base, "dataset": str(broken)}, ["line 3", "not JSON", "skip_bad_rows"]),
        ({**base, "dataset": str(outside)}, ["outside the allowed folders", "--root"]),
        ({**base, "method": "adalomo"}, ["adalomo", "needs a CUDA GPU", "'lomo'"]),
    ]

    async def scenario():
        messages = []
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            for config, _ in cases:
                messages.append(await call_error(client, "start_training", {"config": config}))
                listed = await call_ok(client, "list_jobs", {})  # the server still answers
                assert listed["jobs"] == []  # and no half-made job was recorded
            messages.append(await call_error(client, "job_status", {"job_id": "../../etc/passwd"}))
            messages.append(await call_error(client, "job_status", {"job_id": "20991231-000000-beef"}))
        return messages

    messages = anyio.run(scenario)
    for (_, expected), message in zip(cases, messages, strict=False):
        for fragment in expected:
            assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "is not a job id" in messages[-2]
    assert "no job" in messages[-1]


def test_dry_run_resolves_paths_and_starts_nothing(tiny_model, demo_data, lmtuner_home, tmp_path):
    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            config = {"model": str(tiny_model), "dataset": str(demo_data), "method": "full"}
            result = await call_ok(client, "start_training", {"config": config, "dry_run": True})
            listed = await call_ok(client, "list_jobs", {})
            return result, listed

    result, listed = anyio.run(scenario)
    assert result["status"] == "dry_run" and result["job_id"] is None
    assert result["config"]["learning_rate"] == 2e-5  # the full-fine-tune default, filled in
    assert result["config"]["dataset"]["path"] == str(demo_data.resolve())
    assert listed["jobs"] == []
