"""The job dashboard, an MCP App (issue 25): in a real headless Chromium, inside a minimal host page that speaks the
Apps bridge (tests/apps_host.html), the View follows a real job of a real lmtuner-mcp over stdio: its chart holds the
points of the job's metrics.jsonl and grows as the job trains, and its cancel button cancels the job. And a client
that did not declare Apps sees the server as before: no `_meta.ui`, no `ui://` resource, the same schemas, results."""

from __future__ import annotations

import base64
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import mcp
import pytest
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import TOOLS, build_server
from server.dashboard import DASHBOARD_URI
from tests.helpers import quick_config, server_params, wait_for_end
from tests.test_oauth_browser import CHROMIUM, INSTALL

if TYPE_CHECKING:
    from playwright.async_api import FrameLocator

HOST_PAGE = Path(__file__).with_name("apps_host.html")
SNAPSHOTS = Path(__file__).with_name("__toolsnaps__")
APPS = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
BOUND = {"start_training", "job_status", "tune_config"}


@pytest.fixture
def demo_data(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "data" / "demo.jsonl", n=64)


def wire(result) -> dict:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def metric_values(run_dir: str, key: str) -> dict[int, float]:
    """{step: value} of one key of the job's metrics.jsonl."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is missing: {INSTALL}")


@dataclass
class Shown:
    """The View in the test host: its frame, and what it asked the host to relay to the server."""

    view: FrameLocator
    relayed: list[tuple[str, dict]] = field(default_factory=list)
    answered: list[dict] = field(default_factory=list)  # the server's answer to each relayed request, in order
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def clean(self) -> None:
        """Self-contained under its strict CSP: nothing fetched, nothing refused."""
        assert not [line for line in self.console if "Content Security Policy" in line], self.console
        assert all(url.startswith(("about:", "data:")) for url in self.requests), self.requests


@asynccontextmanager
async def shown_by_host(client, tool, arguments: dict, result):
    """Render the tool's View in tests/apps_host.html in headless Chromium, as a host does after the agent's call; the
    View's tools/call and resources/read go through the host to `client`, a real MCP session."""
    from playwright.async_api import async_playwright

    (resource,) = (await client.read_resource(tool.meta["ui"]["resourceUri"])).contents
    assert resource.mime_type == APP_MIME_TYPE

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = await browser.new_page()
            shown = Shown(view=page.frame_locator("#view"))

            async def relay(method: str, params: dict) -> dict:
                shown.relayed.append((method, params))
                if method == "tools/call":
                    answer = wire(await client.call_tool(params["name"], params.get("arguments") or {}))
                else:
                    answer = wire(await client.read_resource(params["uri"]))
                shown.answered.append(answer)
                return answer

            page.on("console", lambda message: shown.console.append(message.text))
            page.on("request", lambda request: shown.requests.append(request.url))
            await page.expose_function("mcpRelay", relay)
            await page.set_content(HOST_PAGE.read_text())
            await page.evaluate(
                "([html, meta, tool, input, result]) => window.showApp(html, meta, tool, input, result)",
                [resource.text, resource.meta, wire(tool), arguments, wire(result)],
            )
            yield shown
        finally:
            await browser.close()


async def until(check, what: str, shown: Shown, timeout: float = 60):
    """The first true value of `await check()` within timeout seconds (a bound on a hang, not a speed test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await anyio.sleep(0.25)
    raise AssertionError(f"the dashboard never showed {what}; last relayed: {shown.relayed[-5:]}")


def drawn(view: FrameLocator, series: str):
    """The chart's points of one series as (step, value), read from the circles' data attributes."""
    script = "els => els.map(e => [Number(e.dataset.step), Number(e.dataset.value)])"
    return view.locator(f"circle.pt.{series}").evaluate_all(script)


def at_least(view: FrameLocator, series: str, n: int):
    async def check():
        points = await drawn(view, series)
        return points if len(points) >= n else None

    return check


def text_is(view: FrameLocator, selector: str, text: str):
    async def check():
        return (await view.locator(selector).text_content()) == text

    return check


def done(view: FrameLocator, selector: str, busy: str):
    """Whether a button's answer came: its output holds something other than the text shown while it works."""

    async def check():
        return (await view.locator(selector).text_content()) not in ("", busy)

    return check


@needs_chromium
def test_dashboard_charts_a_running_job_and_its_cancel_button_cancels_it(tiny_model, demo_data, lmtuner_home, tmp_path):
    async def scenario():
        async with mcp.Client(server_params(lmtuner_home, [tmp_path, tiny_model]), extensions=[APPS]) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["start_training"].meta["ui"]["resourceUri"] == DASHBOARD_URI
            # The agent starts a job that would run for a long time; the host renders the tool's View beside it.
            # an endless job: over the default 30-minute limit, so confirmed as a user would (test_confirmation.py)
            config = quick_config(tiny_model, demo_data, max_steps=100_000, save_steps=1_000_000)
            arguments = {"config": config, "confirmed": True}
            started = await client.call_tool("start_training", arguments)
            assert not started.is_error, started.content[0].text
            job_id = started.structured_content["job_id"]
            try:
                async with shown_by_host(client, tools["start_training"], arguments, started) as shown:
                    view = shown.view
                    first = await until(at_least(view, "train", 3), "three loss points", shown)
                    title = await view.locator("#title").text_content()
                    running = await view.locator("#status").text_content()

                    # It keeps following: later the chart reaches a step the first drawing had not.
                    async def newer():
                        points = await drawn(view, "train")
                        return points if points[-1][0] > first[-1][0] else None

                    later = await until(newer, "a newer point", shown)
                    step_text = await view.locator("#step").text_content()
                    await view.locator("#cancel").click()
                    await until(text_is(view, "#status", "cancelled"), "the job cancelled", shown)
            finally:
                status = (await client.call_tool("job_status", {"job_id": job_id})).structured_content
                if status["status"] not in ("completed", "failed", "cancelled"):
                    await client.call_tool("cancel_job", {"job_id": job_id})
            return job_id, title, running, first, later, step_text, status, shown

    job_id, title, running, first, later, step_text, status, shown = anyio.run(scenario)
    assert title == f"lmtuner · job {job_id}" and running == "running"
    # The chart's points are the job's own: each drawn (step, loss) is that step's record in metrics.jsonl.
    losses = metric_values(status["run_dir"], "loss")
    for step, value in first + later:
        assert losses[int(step)] == value, (step, value, losses.get(int(step)))
    assert first[0][0] == min(losses) and later[-1][0] > first[-1][0]
    assert re.fullmatch(r"\d+ / 100000", step_text)
    # The button went through the host to the server: cancel_job for this job, and the job is cancelled.
    assert ("tools/call", {"name": "cancel_job", "arguments": {"job_id": job_id}}) in shown.relayed
    assert status["status"] == "cancelled"
    asked = {(m, p.get("name") or p.get("uri")) for m, p in shown.relayed}
    assert ("tools/call", "job_status") in asked and ("resources/read", f"lmtuner://jobs/{job_id}/metrics") in asked
    shown.clean()


@needs_chromium
def test_dashboard_of_a_completed_job_shows_its_report_and_compares_base_and_tuned(tiny_model, demo_data,
                                                                                  lmtuner_home, tmp_path):  # fmt: skip
    prompt = "What is 3 plus 4?"

    async def scenario():
        async with mcp.Client(server_params(lmtuner_home, [tmp_path, tiny_model]), extensions=[APPS]) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            config = quick_config(tiny_model, {"path": str(demo_data), "eval_fraction": "auto"}, max_steps=12,
                                  eval_steps=4, report={"max_rows": 4, "samples": 2, "retention": False})  # fmt: skip
            started = await client.call_tool("start_training", {"config": config})
            assert not started.is_error, started.content[0].text
            job_id = started.structured_content["job_id"]
            final = await wait_for_end(client, job_id)
            assert final["status"] == "completed", final["error"]
            # The agent asks for the job's status; the host shows the dashboard for that call.
            arguments = {"job_id": job_id}
            result = await client.call_tool("job_status", arguments)
            async with shown_by_host(client, tools["job_status"], arguments, result) as shown:
                view = shown.view
                await until(text_is(view, "#status", "completed"), "the job completed", shown)
                await until(lambda: view.locator("#report").is_visible(), "the report", shown)
                report = await view.locator("#report-stats .stat").all_inner_texts()
                samples = await view.locator("#samples tbody tr").count()
                evals = await until(at_least(view, "eval", 2), "held-out loss points", shown)
                await view.locator("#prompt").fill(prompt)
                await view.locator("#compare").click()
                await until(done(view, "#compare-out", "generating…"), "the answers", shown, 120)
                answers = [await view.locator(f"#{which}-answer").text_content() for which in ("base", "tuned")]
                await view.locator("#export-dir").fill("/proc/not-a-root")
                await view.locator("#export").click()
                await until(done(view, "#export-out", "exporting…"), "the export's answer", shown)
                exported = await view.locator("#export-out").text_content()
            return final, report, samples, evals, answers, exported, shown

    final, report, samples, evals, answers, exported, shown = anyio.run(scenario)
    stats = dict(line.split("\n", 1) for line in report)
    assert stats["verdict"] == final["report"]["verdict"] and stats["metric"] == final["report"]["metric"]
    assert samples == len(final["report"]["samples"]) == 2
    eval_losses = metric_values(final["run_dir"], "eval_loss")
    assert all(eval_losses[int(step)] == value for step, value in evals)
    # Compare asked the server through the host for the base model's answer and then the adapter's, and shows them.
    generated = [
        (params["arguments"], answer["structuredContent"]["outputs"][0]["text"])
        for (method, params), answer in zip(shown.relayed, shown.answered, strict=True)
        if method == "tools/call" and params["name"] == "generate"
    ]
    assert [args.get("adapter") for args, _ in generated] == [None, final["output_dir"]]
    assert all(args["model"] == final["model"] and args["prompts"] == [prompt] for args, _ in generated)
    assert answers == [text for _, text in generated]
    # Export called export_model through the host, and the tool's refusal is shown as text.
    assert "output_dir" in exported and "allowed" in exported, exported
    shown.clean()


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
    assert not re.search(r"\b(src|href)=", html)
    script = html.replace("never innerHTML", "")
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy and "unsafe" not in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
