"""Load on the HTTP server while a job trains: 50 concurrent clients each alternate job_status and
list_jobs. Baseline in the same run: the same load on a bare SDK server's trivial tool (the transport's
floor on this machine). Prints p50/p99 latency, error count and the ratio.

    .venv/bin/python bench/mcp_load.py [--clients 50] [--calls 10] [--sdk-client]

The load comes from thin clients by default: each opens its own MCP session over httpx (initialize,
notifications/initialized) and then posts raw JSON-RPC tools/call requests, timing each from the request to the
complete response. The SDK's client (--sdk-client) also validates every result against the tool's output schema
in the load generator's process, which on 2 shared cores adds its own CPU time to every measured call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.training.tiny_model import make_tiny_model
from tests.helpers import TOKEN, free_port, http_client, http_server, quick_config

BARE_HTTP = """
import sys
from mcp.server.mcpserver import MCPServer
server = MCPServer("bare")
@server.tool()
def ping() -> str:
    return "pong"
server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"""


def _rpc_result(response) -> dict:
    """The JSON-RPC message of a Streamable HTTP response, sent as JSON or as one SSE event."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:"):
                return json.loads(line[5:])
        raise RuntimeError("no data in the event stream")
    return response.json()


async def hammer_thin(
    url: str, calls: list[tuple[str, dict]], clients: int, token: str | None
) -> tuple[list[float], int]:
    import httpx
    from mcp.types import LATEST_PROTOCOL_VERSION

    latencies: list[float] = []
    errors = 0
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    async def one_client(http):
        nonlocal errors
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": LATEST_PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "mcp_load", "version": "1"}}}  # fmt: skip
        response = await http.post(url, json=init, headers=headers)
        session = {**headers}
        if "mcp-session-id" in response.headers:
            session["mcp-session-id"] = response.headers["mcp-session-id"]
        version = _rpc_result(response)["result"]["protocolVersion"]
        session["mcp-protocol-version"] = version
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        for number, (tool, args) in enumerate(calls, start=1):
            params = {"name": tool, "arguments": args}
            request = {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": params}
            started = time.perf_counter()
            try:
                response = await http.post(url, json=request, headers=session)
                message = _rpc_result(response)
                errors += "error" in message or bool(message.get("result", {}).get("isError"))
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http, anyio.create_task_group() as group:
        for _ in range(clients):
            group.start_soon(one_client, http)
    return latencies, errors


async def hammer(url: str, calls: list[tuple[str, dict]], clients: int, token: str | None) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0

    async def one_client():
        nonlocal errors
        async with http_client(url, token=token) as client:
            for tool, args in calls:
                started = time.perf_counter()
                try:
                    result = await client.call_tool(tool, args)
                    errors += bool(result.is_error)
                except Exception:
                    errors += 1
                latencies.append(time.perf_counter() - started)

    async with anyio.create_task_group() as group:
        for _ in range(clients):
            group.start_soon(one_client)
    return latencies, errors


def report(name: str, latencies: list[float], errors: int) -> float:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"{name:<34} calls {len(ordered):>4}  errors {errors}  p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    return p50


def wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--sdk-client", action="store_true", help="Load with the SDK's client instead of thin ones.")
    args = parser.parse_args()
    load = hammer if args.sdk_client else hammer_thin
    work = Path(tempfile.mkdtemp(prefix="lmtuner-load-"))
    home = work / "home"
    home.mkdir()
    model = make_tiny_model(work / "tiny")
    data = write_demo_dataset(work / "demo.jsonl", n=64)

    os.environ["LMTUNER_MAX_CPU_JOBS"] = "1"
    with http_server(home, "--root", str(work)) as (url, _):

        async def start():
            async with http_client(url) as client:
                result = await client.call_tool(
                    "start_training", {"config": quick_config(model, data, max_steps=100_000, save_steps=10**6)}
                )
                return result.structured_content["job_id"]

        async def until_training(job_id):
            async with http_client(url) as client:
                while (await client.call_tool("job_status", {"job_id": job_id})).structured_content["step"] < 1:
                    await anyio.sleep(0.5)

        job_id = anyio.run(start)
        anyio.run(until_training, job_id)
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_HTTP, str(port)], stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            bare_lat, bare_err = anyio.run(
                load, f"http://127.0.0.1:{port}/mcp", [("ping", {})] * args.calls, args.clients, None
            )
        finally:
            bare.terminate()
            bare.wait()
        calls = [("job_status", {"job_id": job_id}), ("list_jobs", {})] * (args.calls // 2)
        ours_lat, ours_err = anyio.run(load, url, calls, args.clients, TOKEN)

        async def cancel():
            async with http_client(url) as client:
                await client.call_tool("cancel_job", {"job_id": job_id})

        anyio.run(cancel)

    kind = "SDK clients" if args.sdk_client else "thin clients"
    print(f"{args.clients} concurrent {kind} x {args.calls} calls, {os.cpu_count()} cores, a training job running:")
    base = report("bare SDK server, trivial tool", bare_lat, bare_err)
    ours = report("lmtuner job_status + list_jobs", ours_lat, ours_err)
    print(f"ratio p50 lmtuner / bare: {ours / base:.2f}")


if __name__ == "__main__":
    main()
