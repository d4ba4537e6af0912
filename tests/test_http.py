"""Streamable HTTP: a real lmtuner-mcp process on loopback, a real SDK client, real HTTP requests."""

from __future__ import annotations

import os
import subprocess

import anyio
import httpx2 as httpx
import mcp
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.helpers import INIT, LMTUNER_MCP, MCP_HEADERS, READ_ONLY_TOOLS, TOKEN, free_port, http_server


def test_requests_without_or_with_a_wrong_token_get_401(lmtuner_home):
    with http_server(lmtuner_home) as (url, _):
        missing = httpx.post(url, json=INIT, headers=MCP_HEADERS)
        wrong = httpx.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer nope"})
        foreign = httpx.post(
            url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}
        )
        right = httpx.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 401 and "bearer" in missing.headers["www-authenticate"].lower()
    assert wrong.status_code == 401
    assert foreign.status_code == 403
    assert right.status_code == 200


def test_sdk_client_with_the_token_lists_tools_and_calls_one(lmtuner_home):
    async def scenario(url):
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        async with http, mcp.Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            jobs = await client.call_tool("list_jobs", {})
            return [t.name for t in tools.tools], jobs

    with http_server(lmtuner_home, "--read-only") as (url, _):
        names, jobs = anyio.run(scenario, url)
    assert names == READ_ONLY_TOOLS
    assert not jobs.is_error and jobs.structured_content == {"jobs": []}


def test_non_loopback_address_without_a_token_is_refused(lmtuner_home):
    env = {k: v for k, v in os.environ.items() if k != "LMTUNER_TOKEN"} | {"LMTUNER_HOME": str(lmtuner_home)}
    out = subprocess.run(
        [LMTUNER_MCP, "--http", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "LMTUNER_TOKEN" in out.stderr


def test_loopback_without_a_configured_token_generates_one(lmtuner_home):
    with http_server(lmtuner_home, token=None) as (url, _):
        token_file = lmtuner_home / "http-token"
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) >= 32
        ok = httpx.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})
        refused = httpx.post(url, json=INIT, headers=MCP_HEADERS)
    assert ok.status_code == 200 and refused.status_code == 401
