"""Test helpers: drive a real `lmtuner-mcp` over stdio with the official SDK client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import mcp
from mcp.client.stdio import StdioServerParameters

from lmtuner_core.jobs.distributed import free_port

TERMINAL = ("completed", "failed", "cancelled")
# What --read-only serves: the tools that change nothing, in registration order.
READ_ONLY_TOOLS = [
    "inspect_gpus",
    "analyze_dataset",
    "test_grader",
    "propose_config",
    "job_status",
    "list_jobs",
    "generate",
    "evaluate",
    "list_servers",
]


def server_params(home: Path, roots: list[Path], cwd: Path | None = None) -> StdioServerParameters:
    command = str(Path(sys.executable).parent / "lmtuner-mcp")
    args = [arg for root in roots for arg in ("--root", str(root))]
    env = {**os.environ, "LMTUNER_HOME": str(home)}
    return StdioServerParameters(command=command, args=args, env=env, cwd=cwd)


@asynccontextmanager
async def stdio_client(home: Path, roots: list[Path]):
    async with mcp.Client(server_params(home, roots)) as client:
        yield client


async def call_ok(client, tool: str, arguments: dict) -> dict:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {result.content[0].text}"
    return result.structured_content


async def call_error(client, tool: str, arguments: dict) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} should have failed: {result.structured_content}"
    return result.content[0].text


async def wait_for_end(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 10})
        if status["status"] in TERMINAL:
            return status
    raise AssertionError(f"job {job_id} did not finish within {timeout}s: {status}")


def read_losses(run_dir: str) -> list[float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def quick_config(model: Path, dataset, **overrides) -> dict:
    """A job small enough for CI: a few steps, short rows, a high learning rate so the loss visibly falls. No rows are
    held out (so no held-out loss, best checkpoint, early stop or report) unless the test asks: those have their own
    tests (test_report.py), and the other tests count steps and checkpoints."""
    config = {
        "model": str(model),
        "dataset": {"eval_fraction": 0.0, **(dataset if isinstance(dataset, dict) else {"path": str(dataset)})},
        "method": "lora",
        "max_steps": 12,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "max_seq_len": 128,
        "logging_steps": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
    }
    config.update(overrides)
    return config


# A raw MCP initialize request and the headers Streamable HTTP wants, for tests that check HTTP status codes.
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


RESULT_MARK = "LMTUNER-RESULT "


def marked_result(stdout: str):
    """The JSON a child script printed after RESULT_MARK. Never the last line: libraries log after it (vLLM's
    shutdown lines), and how much they log depends on the machine."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert len(lines) == 1, f"expected one line starting {RESULT_MARK!r}, got {len(lines)} in:\n{stdout[-3000:]}"
    return json.loads(lines[0].removeprefix(RESULT_MARK))


LMTUNER_MCP = str(Path(sys.executable).parent / "lmtuner-mcp")
TOKEN = "test-token-7f3a"


@contextmanager
def http_server(home: Path, *args: str, token: str | None = TOKEN, port: int | None = None):
    port = port or free_port()
    env = {**os.environ, "LMTUNER_HOME": str(home)}
    env.pop("LMTUNER_TOKEN", None)
    if token:
        env["LMTUNER_TOKEN"] = token
    log_path = home / f"server-{port}.log"  # a file, not a pipe: a long-lived server must never block on it
    with log_path.open("ab") as log:
        proc = subprocess.Popen([LMTUNER_MCP, "--http", "--port", str(port), *args], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@asynccontextmanager
async def http_client(url: str, token: str | None = TOKEN):
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"} if token else None)
    async with http, mcp.Client(streamable_http_client(url, http_client=http)) as client:
        yield client
