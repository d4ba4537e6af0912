"""What an agent sees besides tools: prompts, resources, the loss curve, confinement, secrets, a second client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import time
from pathlib import Path

import anyio
import mcp
import pytest

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import build_server
from tests.helpers import LMTUNER_MCP, TOKEN, call_error, call_ok, http_server, quick_config

PLANTED = {
    "WANDB_API_KEY": "wandbkey-planted-5c1d2e3f4a5b6c7d8e9f",
    "HF_TOKEN": "hf_PlantedTokenAbcdefghijklmnopqrstu",
    "LMTUNER_TOKEN": "bearer-planted-0a9b8c7d6e5f",
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_model):
    """One completed job, shared by the read-only checks below."""
    home = tmp_path_factory.mktemp("home")
    data = write_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", n=16)

    async def scenario():
        async with mcp.Client(build_server(home=home, roots=[data.parent, tiny_model])) as client:
            started = await call_ok(client, "start_training", {"config": quick_config(tiny_model, data, max_steps=4)})
            while True:
                status = await call_ok(client, "job_status", {"job_id": started["job_id"], "wait_seconds": 10})
                if status["status"] != "running":
                    return status

    final = anyio.run(scenario)
    assert final["status"] == "completed", final["error"]
    return home, final


def test_loss_curve_resource_and_include_plot_return_valid_pngs(finished_job):
    home, final = finished_job
    job_id = final["job_id"]

    async def scenario():
        async with mcp.Client(build_server(home=home)) as client:
            templates = await client.list_resource_templates()
            png = await client.read_resource(f"lmtuner://jobs/{job_id}/loss.png")
            log = await client.read_resource(f"lmtuner://jobs/{job_id}/log")
            metrics = await client.read_resource(f"lmtuner://jobs/{job_id}/metrics")
            config = await client.read_resource(f"lmtuner://jobs/{job_id}/config")
            with_plot = await client.call_tool("job_status", {"job_id": job_id, "include_plot": True})
            return templates, png, log, metrics, config, with_plot

    templates, png, log, metrics, config, with_plot = anyio.run(scenario)
    uris = {t.uri_template for t in templates.resource_templates}
    assert {f"lmtuner://jobs/{{job_id}}/{name}" for name in ("log", "metrics", "config", "loss.png")} <= uris
    blob = png.contents[0]
    assert blob.mime_type == "image/png"
    assert png_size(base64.b64decode(blob.blob)) == (640, 400)
    assert "completed; output in" in log.contents[0].text
    assert len(metrics.contents[0].text.splitlines()) == 4
    assert json.loads(config.contents[0].text)["max_steps"] == 4
    images = [c for c in with_plot.content if c.type == "image"]
    assert len(images) == 1 and png_size(base64.b64decode(images[0].data)) == (640, 400)
    assert with_plot.structured_content["status"] == "completed"


def test_prompt_guides_the_agent_and_carries_the_goal(lmtuner_home):
    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home)) as client:
            prompts = await client.list_prompts()
            prompt = await client.get_prompt("fine_tune_assistant", {"goal": "answer like our support team"})
            return prompts, prompt

    prompts, prompt = anyio.run(scenario)
    assert "fine_tune_assistant" in [p.name for p in prompts.prompts]
    text = prompt.messages[0].content.text
    assert "answer like our support team" in text and "dry_run" in text and "inspect_gpus" in text


def test_confinement_refuses_escapes_symlinks_options_and_bad_ids(tiny_model, tmp_path, lmtuner_home):
    root = tmp_path / "root"
    root.mkdir()
    data = write_demo_dataset(root / "demo.jsonl", n=8)
    outside = write_demo_dataset(tmp_path / "outside.jsonl", n=8)
    (root / "sneaky.jsonl").symlink_to(outside)
    (root / "model-link").symlink_to(tiny_model)  # the original model lies outside the root
    shutil.copytree(tiny_model, root / "model")
    base = quick_config(root / "model", data)
    cases = {
        "dot-dot": ({**base, "dataset": str(root / ".." / "outside.jsonl")}, "outside the allowed folders"),
        "absolute": ({**base, "dataset": "/etc/passwd"}, "outside the allowed folders"),
        "symlink-data": ({**base, "dataset": str(root / "sneaky.jsonl")}, "outside the allowed folders"),
        "symlink-model": ({**base, "model": str(root / "model-link")}, "outside the allowed folders"),
        "option-like": ({**base, "dataset": "-rf"}, "starts with '-'"),
        "option-output": ({**base, "output_dir": "--help"}, "starts with '-'"),
    }

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[root])) as client:
            out = {name: await call_error(client, "start_training", {"config": c}) for name, (c, _) in cases.items()}
            out["job-id"] = await call_error(client, "job_status", {"job_id": "../../etc/passwd"})
            out["cancel-id"] = await call_error(client, "cancel_job", {"job_id": "-9"})
            return out

    async def read_resource(uri: str) -> str:
        async with mcp.Client(build_server(home=lmtuner_home, roots=[root])) as client:
            try:
                await client.read_resource(uri)
            except BaseException as exc:  # the SDK raises its protocol error inside exception groups
                return " | ".join(leaf_messages(exc))
        return "read succeeded"

    messages = anyio.run(scenario)
    for name, (_, fragment) in cases.items():
        assert fragment in messages[name], (name, messages[name])
    assert "is not a job id" in messages["job-id"] and "is not a job id" in messages["cancel-id"]
    assert "Unknown resource" in anyio.run(read_resource, "lmtuner://jobs/..%2F..%2Fetc/log")
    assert "is not a job id" in anyio.run(read_resource, "lmtuner://jobs/NOT_AN_ID/log")


def leaf_messages(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [m for sub in exc.exceptions for m in leaf_messages(sub)]
    return [str(exc)]


def test_planted_secrets_never_reach_output_logs_or_config(tiny_model, tmp_path, lmtuner_home, monkeypatch):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    seen: list[str] = []

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            # An error message that would echo a token the user pasted into a path.
            bad = quick_config(tiny_model, str(tmp_path / f"{PLANTED['HF_TOKEN']}.jsonl"))
            seen.append(await call_error(client, "start_training", {"config": bad}))
            started = await call_ok(client, "start_training", {"config": quick_config(tiny_model, data, max_steps=2)})
            seen.append(json.dumps(started))
            while True:
                status = await call_ok(client, "job_status", {"job_id": started["job_id"], "wait_seconds": 10})
                seen.append(json.dumps(status))
                if status["status"] != "running":
                    break
            seen.append(json.dumps(await call_ok(client, "list_jobs", {})))
            seen.append(json.dumps(await call_ok(client, "inspect_gpus", {})))
            return status

    final = anyio.run(scenario)
    assert final["status"] == "completed"
    run_dir = Path(final["run_dir"])
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".log", ".md", ""}]
    texts = seen + [p.read_text(errors="replace") for p in files]
    for name, value in PLANTED.items():
        leaks = [t[:200] for t in texts if value in t]
        assert not leaks, f"{name} leaked: {leaks}"
    assert "***" in seen[0]  # the echoed token was redacted, not dropped silently


def test_fastmcp_client_drives_the_flow_over_stdio_and_http(tiny_model, tmp_path, lmtuner_home):
    fastmcp = pytest.importorskip("fastmcp")
    from fastmcp.client.transports import StdioTransport

    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    roots = ["--root", str(tmp_path), "--root", str(tiny_model)]
    env = {**os.environ, "LMTUNER_HOME": str(lmtuner_home)}

    async def flow(client) -> dict:
        async with client:
            hardware = await client.call_tool("inspect_gpus", {})
            assert hardware.structured_content["cpu"]["cores"] >= 1
            started = await client.call_tool("start_training", {"config": quick_config(tiny_model, data, max_steps=2)})
            job_id = started.structured_content["job_id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                status = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 10})
                if status.structured_content["status"] != "running":
                    return status.structured_content
            raise AssertionError("job did not finish")

    stdio = fastmcp.Client(StdioTransport(command=LMTUNER_MCP, args=roots, env=env))
    assert anyio.run(flow, stdio)["status"] == "completed"
    with http_server(lmtuner_home, *roots) as (url, _):
        over_http = anyio.run(flow, fastmcp.Client(url, auth=TOKEN))
    assert over_http["status"] == "completed"
