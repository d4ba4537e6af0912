"""The job dashboard as an MCP App (the SDK's `mcp.server.apps`, spec SEP-1865 2026-01-26): a `ui://` HTML resource
that hosts with Apps render in a sandboxed frame beside `start_training` and `job_status`, and the middleware that
keeps the binding away from clients that did not declare Apps, so they see exactly what they saw before."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from importlib import resources
from typing import Any

from mcp.server.apps import APP_MIME_TYPE, Apps, ResourceCsp, client_supports_apps
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from lmtuner_core.methods import METHODS

DASHBOARD_URI = "ui://lmtuner/job-dashboard"
# The tools whose results the dashboard renders. tune_config (the sweep, issue 20) is bound as soon as it is
# registered: the dashboard already shows a job_status's `trials[]`.
DASHBOARD_TOOLS = ("start_training", "job_status", "tune_config")


def dashboard_meta() -> dict[str, Any]:
    """The tool `_meta` that binds a tool to the dashboard (`_meta.ui.resourceUri`)."""
    return {"ui": {"resourceUri": DASHBOARD_URI}}


@cache
def dashboard_html() -> str:
    """The dashboard's HTML: one file, no external fetch, its own CSP allowing only its inline script and style (by
    hash, so not even an injected inline script could run), the adapter methods filled in from the registry."""
    html = resources.files("server").joinpath("dashboard.html").read_text(encoding="utf-8")
    adapters = sorted(name for name, spec in METHODS.items() if spec.adapter)
    html = html.replace("__ADAPTER_METHODS__", json.dumps(adapters))
    csp = "; ".join([
        "default-src 'none'",
        f"script-src {_inline_hash(html, 'script')}",
        f"style-src {_inline_hash(html, 'style')}",
        "img-src data:",
        "connect-src 'none'",
        "form-action 'none'",
        "base-uri 'none'",
    ])  # fmt: skip
    return html.replace("__CSP__", csp)


def _inline_hash(html: str, tag: str) -> str:
    (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)  # exactly one of each, by construction
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def dashboard_apps() -> Apps:
    """The Apps extension with the dashboard resource; MCPServer(extensions=[...]) advertises the capability."""
    apps = Apps()
    apps.add_html_resource(
        DASHBOARD_URI,
        dashboard_html(),
        name="job_dashboard",
        title="lmtuner job dashboard",
        description="Live loss and held-out loss, step, ETA, tokens/s, memory and the result report of a training "
        "job, with buttons to cancel it, compare base and tuned answers, and export it.",
        csp=ResourceCsp(),  # no domain at all: the frame needs no network
        prefers_border=True,
    )
    return apps


async def hide_apps_from_plain_clients(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Server middleware: a client that did not declare the Apps extension (with its HTML MIME type) gets tools/list
    without `_meta.ui` and resources/list without `ui://` resources: the same lists as before the dashboard existed.
    The SDK stamps a tool's `_meta` for every client; the spec asks servers to check the client first."""
    result = await call_next(ctx)
    if ctx.method not in ("tools/list", "resources/list") or client_supports_apps(ctx):
        return result
    data = result.model_dump(by_alias=True, mode="json", exclude_none=True) if hasattr(result, "model_dump") else result
    if not isinstance(data, dict):
        return result
    if ctx.method == "tools/list":
        for tool in data.get("tools", []):
            meta = tool.get("_meta")
            if isinstance(meta, dict) and "ui" in meta:
                rest = {k: v for k, v in meta.items() if k != "ui"}
                if rest:
                    tool["_meta"] = rest
                else:
                    del tool["_meta"]
    else:
        data["resources"] = [r for r in data.get("resources", []) if not str(r.get("uri", "")).startswith("ui://")]
    return data


__all__ = ["APP_MIME_TYPE", "DASHBOARD_TOOLS", "DASHBOARD_URI", "dashboard_apps", "dashboard_html", "dashboard_meta"]
