"""The two scopes a token can carry, which tool needs which, and the MCP middleware that enforces them: tools/list
shows only the tools a token may call, and a call without the scope is refused naming it. The SDK checks only
one fixed scope list for the whole /mcp endpoint, so per-tool scopes are ours."""

from __future__ import annotations

from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_REQUEST, CallToolResult, TextContent
from mcp_types.methods import serialize_server_result

READ_SCOPE = "lmtuner:read"
TRAIN_SCOPE = "lmtuner:train"
ALL_SCOPES = [READ_SCOPE, TRAIN_SCOPE]
SCOPE_DESCRIPTIONS = {
    READ_SCOPE: "see hardware, jobs, datasets and servers; generate and evaluate with models",
    TRAIN_SCOPE: "start, resume and cancel training; merge, quantize, serve and stop models (uses GPU time and disk)",
}
# MCP methods that read server state outside tools (job logs, metrics, configs).
READ_METHODS = ("resources/list", "resources/read", "resources/templates/list")


def tool_scope(name: str) -> str | None:
    """The scope a tool needs: lmtuner:read for tools that change nothing, lmtuner:train for the others;
    None for a name that is no tool (the server answers that call with its own error)."""
    from server.app import TOOLS

    for spec in TOOLS:
        if spec.name == name:
            return READ_SCOPE if spec.read_only else TRAIN_SCOPE
    return None


def granted_scopes() -> set[str]:
    """The scopes of the access token of the request being handled (empty without one)."""
    token = get_access_token()
    return set(token.scopes) if token else set()


async def enforce_scopes(ctx: Any, call_next: Any) -> Any:
    """MCP server middleware (`MCPServer.middleware`): filter tools/list, refuse calls outside the token's scopes."""
    scopes = granted_scopes()
    if ctx.method == "tools/list":
        result = await call_next(ctx)
        result["tools"] = [tool for tool in result.get("tools", []) if tool_scope(tool["name"]) in scopes]
        return result
    if ctx.method == "tools/call":
        name = str((ctx.params or {}).get("name", ""))
        needed = tool_scope(name)
        if needed is not None and needed not in scopes:
            refusal = CallToolResult(
                content=[TextContent(type="text", text=_missing_scope_message(f"tool {name}", needed, scopes))],
                is_error=True,
            )
            # A middleware that answers itself owns the wire shape, which differs by protocol version.
            wire = refusal.model_dump(by_alias=True, mode="json", exclude_none=True)
            return serialize_server_result(ctx.method, ctx.protocol_version, wire)
    if ctx.method in READ_METHODS and READ_SCOPE not in scopes:
        raise MCPError(code=INVALID_REQUEST, message=_missing_scope_message(ctx.method, READ_SCOPE, scopes))
    return await call_next(ctx)


def _missing_scope_message(what: str, needed: str, scopes: set[str]) -> str:
    held = ", ".join(sorted(scopes)) or "no scope"
    return (
        f"insufficient_scope: {what} needs the scope {needed}; this access token has {held}. Reconnect the agent "
        f"and have the server's owner approve {needed}."
    )
