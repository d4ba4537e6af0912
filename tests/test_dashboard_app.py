"""The job dashboard, an MCP App (issue 25): in a real headless Chromium, inside a minimal host page that speaks the
Apps bridge (tests/apps_host.html), the View follows a real job of a real lmtuner-mcp over stdio: its chart holds the
points of the job's metrics.jsonl and grows as the job trains, and its cancel button cancels the job. And a client
that did not declare Apps sees the server as before: no `_meta.ui`, no `ui://` resource, the same schemas, results."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import anyio
import mcp
import pytest
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import TOOLS, build_server
from server.dashboard import DASHBOARD_URI
from tests.helpers import quick_config, server_params
from tests.test_oauth_browser import CHROMIUM, INSTALL

HOST_PAGE = Path(__file__).with_name("apps_host.html")
SNAPSHOTS = Path(__file__).with_name("__toolsnaps__")
APPS = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
BOUND = {"start_training", "job_status"}


@pytest.fixture
def demo_data(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "data" / "demo.jsonl", n=64)


def wire(result) -> dict:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def metrics_losses(run_dir: str) -> dict[int, float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is missing: {INSTALL}")
def test_dashboard_charts_a_running_job_and_its_cancel_button_cancels_it(tiny_model, demo_data, lmtuner_home, tmp_path):
    from playwright.async_api import async_playwright

    relayed: list[tuple[str, dict]] = []
    console: list[str] = []
    requests: list[str] = []

    async def scenario():
        async with mcp.Client(server_params(lmtuner_home, [tmp_path, tiny_model]), extensions=[APPS]) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            uri = tools["start_training"].meta["ui"]["resourceUri"]
            assert uri == tools["job_status"].meta["ui"]["resourceUri"] == DASHBOARD_URI
            (resource,) = (await client.read_resource(uri)).contents
            assert resource.mime_type == APP_MIME_TYPE

            # The agent starts a job that would run for a long time; the host renders the tool's View beside it.
            arguments = {"config": quick_config(tiny_model, demo_data, max_steps=100_000, save_steps=1_000_000)}
            started = await client.call_tool("start_training", arguments)
            assert not started.is_error, started.content[0].text
            job_id = started.structured_content["job_id"]

            async def relay(method: str, params: dict) -> dict:
                relayed.append((method, params))
                if method == "tools/call":
                    return wire(await client.call_tool(params["name"], params.get("arguments") or {}))
                return wire(await client.read_resource(params["uri"]))

            try:
                async with async_playwright() as p:
                    browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                    page = await browser.new_page()
                    page.on("console", lambda message: console.append(message.text))
                    page.on("request", lambda request: requests.append(request.url))
                    await page.expose_function("mcpRelay", relay)
                    await page.set_content(HOST_PAGE.read_text())
                    await page.evaluate(
                        "([html, meta, tool, input, result]) => window.showApp(html, meta, tool, input, result)",
                        [resource.text, resource.meta, wire(tools["start_training"]), arguments, wire(started)],
                    )
                    view = page.frame_locator("#view")
                    points = view.locator("circle.pt.train")

                    async def drawn() -> list[list[float]]:
                        script = "els => els.map(e => [Number(e.dataset.step), Number(e.dataset.value)])"
                        return await points.evaluate_all(script)

                    async def until(check, what: str, timeout: float = 60):
                        deadline = time.monotonic() + timeout
                        while time.monotonic() < deadline:
                            value = await check()
                            if value:
                                return value
                            await anyio.sleep(0.25)
                        raise AssertionError(f"the dashboard never showed {what}; relayed: {relayed[-5:]}")

                    first = await until(lambda: _at_least(drawn(), 3), "three loss points")
                    title = await view.locator("#title").text_content()
                    running = await view.locator("#status").text_content()
                    # It keeps following: later the chart reaches a step the first drawing had not.
                    later = await until(lambda: _beyond(drawn(), first[-1][0]), "a newer point")
                    step_text = await view.locator("#step").text_content()
                    await view.locator("#cancel").click()
                    await until(lambda: _text_is(view.locator("#status"), "cancelled"), "the job cancelled")
                    await browser.close()
            finally:
                status = (await client.call_tool("job_status", {"job_id": job_id})).structured_content
                if status["status"] not in ("completed", "failed", "cancelled"):
                    await client.call_tool("cancel_job", {"job_id": job_id})
            return job_id, title, running, first, later, step_text, status

    job_id, title, running, first, later, step_text, status = anyio.run(scenario)
    assert title == f"lmtuner · job {job_id}" and running == "running"
    # The chart's points are the job's own: each drawn (step, loss) is that step's record in metrics.jsonl.
    losses = metrics_losses(status["run_dir"])
    for step, value in first + later:
        assert losses[int(step)] == value, (step, value, losses.get(int(step)))
    assert first[0][0] == min(losses) and later[-1][0] > first[-1][0]
    assert re.fullmatch(r"\d+ / 100000", step_text)
    # The button went through the host to the server: cancel_job for this job, and the job is cancelled.
    assert ("tools/call", {"name": "cancel_job", "arguments": {"job_id": job_id}}) in relayed
    assert status["status"] == "cancelled"
    methods = {(m, p.get("name") or p.get("uri")) for m, p in relayed}
    assert ("tools/call", "job_status") in methods
    assert ("resources/read", f"lmtuner://jobs/{job_id}/metrics") in methods
    # Self-contained under its strict CSP: nothing fetched, nothing refused.
    assert not [line for line in console if "Content Security Policy" in line], console
    assert all(url.startswith(("about:", "data:")) for url in requests), requests


async def _at_least(points, n: int):
    drawn = await points
    return drawn if len(drawn) >= n else None


async def _beyond(points, step: float):
    drawn = await points
    return drawn if drawn and drawn[-1][0] > step else None


async def _text_is(locator, text: str) -> bool:
    return (await locator.text_content()) == text


def _seen_by(server, apps: bool, mode: str | None, dry_run: dict):
    async def scenario():
        kwargs = {"mode": mode} if mode else {}
        async with mcp.Client(server, extensions=[APPS] if apps else [], **kwargs) as client:
            tools = (await client.list_tools()).tools
            resources = (await client.list_resources()).resources
            dry = await client.call_tool("start_training", dry_run)
            return tools, resources, dry, client.server_info

    return anyio.run(scenario)


@pytest.mark.parametrize("mode", ["legacy", None], ids=["2025-11-25", "2026-07-28"])
def test_a_client_without_apps_sees_the_server_as_before(tiny_model, demo_data, lmtuner_home, tmp_path, mode):
    dry_run = {"config": quick_config(tiny_model, demo_data, output_dir=str(tmp_path / "out")), "dry_run": True}
    server = build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])
    plain_tools, plain_resources, plain_dry, info = _seen_by(server, apps=False, mode=mode, dry_run=dry_run)
    app_tools, app_resources, app_dry, _ = _seen_by(server, apps=True, mode=mode, dry_run=dry_run)

    # Without Apps: no tool carries _meta (none did before), no ui:// resource is listed, the schemas are the snapshots.
    assert [t.meta for t in plain_tools] == [None] * len(TOOLS)
    assert [r.uri for r in plain_resources] == []
    for tool in plain_tools:
        snapshot = json.loads((SNAPSHOTS / f"{tool.name}.json").read_text())
        assert {"input": tool.input_schema, "output": tool.output_schema} == snapshot, tool.name
    # With Apps: the same tools and schemas, plus the binding on the dashboard's tools and the resource listed.
    assert [wire(t) | {"_meta": None} for t in app_tools] == [wire(t) | {"_meta": None} for t in plain_tools]
    assert {t.name for t in app_tools if t.meta} == BOUND
    assert all(t.meta == {"ui": {"resourceUri": DASHBOARD_URI}} for t in app_tools if t.meta)
    assert [r.uri for r in app_resources] == [DASHBOARD_URI]
    # A tool's result does not depend on Apps (the View reads the same structured content).
    assert not plain_dry.is_error, plain_dry.content[0].text
    assert wire(plain_dry) == wire(app_dry)
    # Icons: the server's and one per tool, small self-contained SVGs.
    for icons in [info.icons, *(t.icons for t in plain_tools)]:
        (icon,) = icons
        assert icon.mime_type == "image/svg+xml" and icon.src.startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(icon.src.split(",", 1)[1]).decode()
        assert svg.startswith("<svg") and len(svg) < 600
        assert not re.search(r"script|href|url\(|on\w+=", svg, re.I), svg


def test_the_dashboard_is_one_small_self_contained_file(lmtuner_home):
    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home), extensions=[APPS]) as client:
            return (await client.read_resource(DASHBOARD_URI)).contents[0]

    resource = anyio.run(scenario)
    html = resource.text
    assert resource.mime_type == APP_MIME_TYPE and resource.meta == {"ui": {"csp": {}, "prefersBorder": True}}
    assert len(html.encode()) < 24_000
    # No external reference (the SVG namespace is a name, not a fetch) and no HTML built from strings.
    assert re.findall(r"https?://[^\"' ]+", html) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"\b(src|href)=", html) and "innerHTML" not in html.replace("never innerHTML", "")
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy and "unsafe" not in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
