"""Icons for the server and each tool (MCP `Icon`, 2025-11-25+): small hand-drawn SVGs served as `data:` URIs, so a
host shows them without fetching anything. Each is a 24×24 line drawing in one colour; no script, no external
reference (hosts are told to be careful with SVG)."""

from __future__ import annotations

import base64

from mcp.types import Icon

_COLOUR = "#4f46e5"

# The drawing inside <svg viewBox="0 0 24 24">, per tool; the server's mark is a falling loss curve on its axes.
_SERVER = '<path d="M3 3v18h18"/><path d="M6 7c3 0 4 8 7 8s3-3 8-3"/>'
_TOOL_DRAWINGS = {
    "inspect_gpus": '<rect x="5" y="5" width="14" height="14" rx="2"/>'
    '<path d="M9 1v4M15 1v4M9 19v4M15 19v4M1 9h4M1 15h4M19 9h4M19 15h4"/>',
    "analyze_dataset": '<rect x="3" y="4" width="18" height="16" rx="2"/><path d="M3 10h18M3 15h18M9 4v16"/>',
    "propose_config": '<circle cx="12" cy="12" r="9"/><path d="M15.5 8.5l-2 5-5 2 2-5z"/>',
    "start_training": '<path d="M7 4l13 8-13 8z"/>',
    "job_status": '<path d="M2 12h4l3-7 4 14 3-7h6"/>',
    "list_jobs": '<path d="M8 6h13M8 12h13M8 18h13M3 6h1M3 12h1M3 18h1"/>',
    "cancel_job": '<rect x="5" y="5" width="14" height="14" rx="2"/>',
    "resume_job": '<path d="M4 4v16M9 4l11 8-11 8z"/>',
    "generate": '<path d="M4 5h16v11H9l-5 4z"/><path d="M8 9h8M8 12h5"/>',
    "evaluate": '<path d="M4 13l5 5L20 6"/>',
    "merge_adapter": '<path d="M6 3v6c0 4 6 4 6 8v4M18 3v6c0 4-6 4-6 8"/>',
    "quantize": '<path d="M4 9h16M4 15h16M9 4L7 20M17 4l-2 16"/>',
    "export_model": '<path d="M12 3v12M7 10l5 5 5-5"/><path d="M4 17v3h16v-3"/>',
    "serve_model": '<rect x="3" y="4" width="18" height="7" rx="1"/><rect x="3" y="13" width="18" height="7" rx="1"/>'
    '<path d="M7 7.5h.01M7 16.5h.01"/>',
    "stop_serving": '<rect x="3" y="4" width="18" height="16" rx="1"/><path d="M9 9l6 6M15 9l-6 6"/>',
    "list_servers": '<rect x="3" y="3" width="18" height="5" rx="1"/><rect x="3" y="10" width="18" height="5" rx="1"/>'
    '<rect x="3" y="17" width="18" height="4" rx="1"/>',
    "tune_config": '<path d="M4 21v-7M4 10V3M12 21v-9M12 8V3M20 21v-5M20 12V3M1 14h6M9 8h6M17 16h6"/>',
}
# A tool registered without a drawing of its own (a new tool) still gets one.
_DEFAULT = '<circle cx="12" cy="12" r="8"/>'


def _icon(drawing: str) -> Icon:
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="{_COLOUR}" stroke-width="2" '
        f'stroke-linecap="round" stroke-linejoin="round">{drawing}</svg>'
    )
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    return Icon(src=uri, mime_type="image/svg+xml", sizes=["any"])


def server_icons() -> list[Icon]:
    return [_icon(_SERVER)]


def tool_icons(name: str) -> list[Icon]:
    return [_icon(_TOOL_DRAWINGS.get(name, _DEFAULT))]
