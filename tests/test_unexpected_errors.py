"""A failure that is nobody's input mistake, through real MCP clients: the agent reads which tool failed, the
exception's type and message, and where the full traceback is; the server log holds it with a timestamp and the
request id; stderr holds plain lines, not Rich's boxed cells; the server keeps answering."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import anyio

from tests.helpers import call_ok, http_client, http_server, stdio_client

ENTRY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ERROR lmtuner: tool generate failed \(request (\S+)\)$")


def damaged_model(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with its weights file cut in half, as an interrupted copy leaves it."""
    model = folder / "damaged"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


async def fail_then_answer(client, model: Path) -> str:
    result = await client.call_tool("generate", {"model": str(model), "prompts": ["Hi"], "max_new_tokens": 2})
    assert result.is_error
    await call_ok(client, "list_jobs", {})  # the same session still answers
    return result.content[0].text


def test_an_unexpected_failure_names_the_tool_the_exception_and_the_log(tiny_model, tmp_path, lmtuner_home):
    model = damaged_model(tiny_model, tmp_path)

    async def over_stdio():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            return await fail_then_answer(client, model)

    async def over_http(url):
        async with http_client(url) as client:
            return await fail_then_answer(client, model)

    messages = [anyio.run(over_stdio)]
    with http_server(lmtuner_home, "--root", str(tmp_path)) as (url, _):
        messages.append(anyio.run(over_http, url))
    log = lmtuner_home / "logs" / "server.log"
    for message in messages:
        assert "generate failed unexpectedly: SafetensorError: Error while deserializing header" in message
        assert f"the full traceback is in {log} (request " in message
        assert "Traceback" not in message

    entries = [m for line in log.read_text().splitlines() if (m := ENTRY.match(line))]
    assert len(entries) == 2, log.read_text()[-3000:]
    for entry, message in zip(entries, messages, strict=True):
        assert f"(request {entry.group(2)})." in message  # the agent's request id finds its entry
    text = log.read_text()
    assert text.count("Traceback (most recent call last):") >= 2 and "safe_open(" in text
    stderr = next(lmtuner_home.glob("server-*.log")).read_text()  # the HTTP server's stderr, as http_server keeps it
    assert "│" not in stderr and "╭" not in stderr, stderr[-2000:]
