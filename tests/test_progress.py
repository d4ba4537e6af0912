"""Every tool that reports progress, called through real MCP clients (a `lmtuner-mcp` process over stdio and over
Streamable HTTP), once with a progress token and once without. With one, notifications arrive and the last one
reaches the total; without one, the same call succeeds. (generate through vLLM: tests/test_serving.py.)

The progress callback used to be called with `anyio.from_thread.run` and no event-loop token, which fails in any
thread that is not AnyIO's worker thread: tests that called the tools below the MCP layer could not see it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from lmtuner_core.data.sample_data import write_demo_dataset
from tests.helpers import http_client, http_server, stdio_client


def calls(model: Path, data: Path, out: Path) -> dict[str, dict]:
    """One call of each progress-reporting tool, small enough for a few seconds each on the tiny model."""
    return {
        "analyze_dataset": {"dataset": str(data), "model": str(model)},
        "propose_config": {"model": str(model), "dataset": str(data)},
        "generate": {"model": str(model), "prompts": ["Add 2 and 3.", "Hi"], "max_new_tokens": 4,
                     "engine": "transformers"},
        "evaluate": {"model": str(model), "dataset": str(data), "max_samples": 3, "max_new_tokens": 4},
        "quantize": {"model": str(model), "method": "bnb-int8", "output_dir": str(out / "int8")},
    }  # fmt: skip


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    return folder, write_demo_dataset(folder / "demo.jsonl", n=24)


async def call_each(client, arguments_by_tool: dict[str, dict], with_token: bool) -> dict[str, list]:
    """Each tool's progress notifications, after asserting that the call succeeded."""
    seen: dict[str, list] = {}
    for tool, arguments in arguments_by_tool.items():
        updates: list = []

        async def on_progress(done, total, message, updates=updates):
            updates.append((done, total, message))

        callback = on_progress if with_token else None
        result = await client.call_tool(tool, arguments, progress_callback=callback)
        assert not result.is_error, f"{tool} (progress token: {with_token}) failed: {result.content[0].text}"
        seen[tool] = updates
    return seen


@pytest.mark.parametrize("transport", ["stdio", "http"])
@pytest.mark.parametrize("with_token", [True, False], ids=["with-progress-token", "without"])
def test_every_progress_tool_answers_over_mcp(work, tiny_model, lmtuner_home, transport, with_token):
    folder, data = work
    out = folder / f"{transport}-{with_token}"
    arguments = calls(tiny_model, data, out)

    async def over_stdio():
        async with stdio_client(lmtuner_home, [folder, tiny_model]) as client:
            return await call_each(client, arguments, with_token)

    async def over_http(url):
        async with http_client(url) as client:
            return await call_each(client, arguments, with_token)

    if transport == "stdio":
        seen = anyio.run(over_stdio)
    else:
        with http_server(lmtuner_home, "--root", str(folder), "--root", str(tiny_model)) as (url, _):
            seen = anyio.run(over_http, url)
    for tool, updates in seen.items():
        if not with_token:
            assert updates == [], tool
            continue
        assert updates, f"{tool} sent no progress notification"
        done, total, message = updates[-1]
        assert total and done == total and message, (tool, updates)
