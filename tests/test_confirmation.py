"""Confirmation before spending (issue 25): a job over the owner's limits asks the user through elicitation, or,
for a client that cannot be asked, answers with a preview and starts only when called again with confirmed: true.
Through the real server over stdio and Streamable HTTP, on both protocol versions the SDK speaks."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import mcp
import pytest
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import ElicitResult

from tests.helpers import TOKEN, call_ok, http_server, quick_config, server_params, wait_for_end

MODES = ["legacy", "2026-07-28"]  # the initialize handshake (2025-11-25) and the modern protocol


def write_rows(folder: Path) -> Path:
    path = folder / "train.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w} {w}."} for w in ["red", "green", "blue", "gold"] * 4]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Asker:
    """An elicitation callback that answers as a user would, and remembers what it was shown."""

    def __init__(self, action: str, start: bool = True) -> None:
        self.action, self.start, self.messages, self.schemas = action, start, [], []

    async def __call__(self, context, params) -> ElicitResult:
        self.messages.append(params.message)
        self.schemas.append(params.requested_schema)
        return ElicitResult(action=self.action, content={"start": self.start} if self.action == "accept" else None)


def stdio(home: Path, roots: list[Path]) -> StdioServerParameters:
    params = server_params(home, roots)
    params.args = [*params.args, "--confirm-over-minutes", "0"]  # every job is over the limit
    return params


async def job_ids(client) -> list[str]:
    return [job["job_id"] for job in (await call_ok(client, "list_jobs", {}))["jobs"]]


async def check_flow(connect, config: dict) -> None:
    """declined -> no job; accepted -> a job; a client without elicitation -> a preview, then a job only with
    confirmed: true."""
    no = Asker("decline")
    async with connect(no) as client:
        result = await call_ok(client, "start_training", {"config": config})
        assert result["status"] == "declined" and result["job_id"] is None
        assert await job_ids(client) == []
    assert len(no.messages) == 1
    shown = no.messages[0]
    assert "Estimated wall time" in shown and "Memory" in shown and "Writes" in shown and "CPU" in shown
    assert set(no.schemas[0]["properties"]) == {"start"}

    async with connect(Asker("accept", start=False)) as client:  # the form answered "don't start"
        assert (await call_ok(client, "start_training", {"config": config}))["status"] == "declined"
        assert await job_ids(client) == []

    yes = Asker("accept")
    async with connect(yes) as client:
        started = await call_ok(client, "start_training", {"config": config})
        assert started["status"] in ("running", "queued") and started["job_id"]
        assert await job_ids(client) == [started["job_id"]]
        await call_ok(client, "cancel_job", {"job_id": started["job_id"], "grace_seconds": 0})
    assert len(yes.messages) == 1

    async with connect(None) as client:
        preview = await call_ok(client, "start_training", {"config": config})
        assert preview["status"] == "needs_confirmation" and preview["job_id"] is None
        cost = preview["preview"]
        assert cost["devices"] == "cpu" and cost["estimate"]["wall_seconds"] > 0 and cost["writes"]
        assert cost["memory_per_device_gib"] > 0 and cost["reasons"]
        assert len(await job_ids(client)) == 1  # still only the accepted one
        second = await call_ok(client, "start_training", {"config": config, "confirmed": True})
        assert second["status"] in ("running", "queued") and second["job_id"]
        assert len(await job_ids(client)) == 2
        await call_ok(client, "cancel_job", {"job_id": second["job_id"], "grace_seconds": 0})
        dry = await call_ok(client, "start_training", {"config": config, "dry_run": True})
        assert dry["status"] == "dry_run"  # a dry run spends nothing: never held back


@pytest.mark.parametrize("mode", MODES)
def test_confirmation_over_stdio(tmp_path, tiny_model, mode):
    home = tmp_path / "home"
    data = write_rows(tmp_path)
    config = quick_config(tiny_model, data, max_steps=200)

    @asynccontextmanager
    async def connect(asker):
        async with mcp.Client(stdio(home, [tmp_path, tiny_model]), mode=mode, elicitation_callback=asker) as client:
            yield client

    anyio.run(check_flow, connect, config)


@pytest.mark.parametrize("mode", MODES)
def test_confirmation_over_http(tmp_path, tiny_model, mode):
    home = tmp_path / "home"
    home.mkdir()
    data = write_rows(tmp_path)
    config = quick_config(tiny_model, data, max_steps=200)
    roots = ["--root", str(tmp_path), "--root", str(tiny_model)]
    with http_server(home, *roots, "--confirm-over-minutes", "0") as (url, _):

        @asynccontextmanager
        async def connect(asker):
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
            transport = streamable_http_client(url, http_client=http)
            async with http, mcp.Client(transport, mode=mode, elicitation_callback=asker) as client:
                yield client

        anyio.run(check_flow, connect, config)


def test_default_limits_let_small_jobs_start(tmp_path, tiny_model):
    """With the defaults (30 minutes, one device) a small CPU job starts without asking, and its estimate is kept
    for job_status."""
    home = tmp_path / "home"
    data = write_rows(tmp_path)
    config = quick_config(tiny_model, data, max_steps=3)

    async def run() -> None:
        asker = Asker("decline")
        async with mcp.Client(server_params(home, [tmp_path, tiny_model]), elicitation_callback=asker) as client:
            started = await call_ok(client, "start_training", {"config": config})
            assert started["status"] in ("running", "queued") and started["job_id"]
            status = await wait_for_end(client, started["job_id"])
        assert asker.messages == []
        assert status["status"] == "completed", status["error"]
        estimate = status["estimate"]
        assert estimate["wall_seconds"] > 0 and estimate["basis"].startswith("CPU")
        measured = status["elapsed_seconds"]
        assert status["estimate_error"] == pytest.approx((estimate["wall_seconds"] - measured) / measured, abs=2e-3)

    anyio.run(run)


def test_over_oauth_the_scope_decides_who_may_start_at_all(tmp_path, tiny_model):
    """A read-only token is refused before anyone is asked (and confirmed: true does not help); a train token is
    asked, and starts on yes."""
    from tests.oauth_helpers import oauth_server, register, tokens_for

    home = tmp_path / "home"
    home.mkdir()
    config = quick_config(tiny_model, write_rows(tmp_path), max_steps=200)
    roots = ["--root", str(tmp_path), "--root", str(tiny_model), "--confirm-over-minutes", "0"]
    with oauth_server(home, *roots) as (base, url, _):
        reader = tokens_for(base, register(base, scope="lmtuner:read")["client_id"], scope="lmtuner:read")
        trainer = tokens_for(base, register(base)["client_id"])

        async def start(token: str, asker: Asker, **extra):
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            async with http, mcp.Client(streamable_http_client(url, http_client=http), elicitation_callback=asker) as c:
                result = await c.call_tool("start_training", {"config": config, **extra})
                if not result.is_error and result.structured_content["job_id"]:
                    await call_ok(c, "cancel_job", {"job_id": result.structured_content["job_id"], "grace_seconds": 0})
                return result

        refused_asker, yes = Asker("accept"), Asker("accept")
        refused = anyio.run(lambda: start(reader["access_token"], refused_asker, confirmed=True))
        started = anyio.run(lambda: start(trainer["access_token"], yes))
    assert refused.is_error and "lmtuner:train" in refused.content[0].text and refused_asker.messages == []
    assert not started.is_error and started.structured_content["status"] in ("running", "queued")
    assert len(yes.messages) == 1
