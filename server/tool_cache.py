"""tools/list without importing the tools: the listing (descriptions and JSON schemas) of the last start is kept in
$LMTUNER_HOME/cache and in the user's cache folder (so a new $LMTUNER_HOME starts fast too; `make install` fills it),
keyed by the source files it was built from, and a tool is built (its module imported, its argument model made) on
its first call. Building every schema takes about as long as the SDK's own import; a start that reuses them answers
tools/list nearly as fast as a bare SDK server. Written by hand: the SDK has no schema cache.

    python -m server.tool_cache     # build the listing now (make install runs it)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
from mcp.server.mcpserver.tools import Tool
from pydantic import PrivateAttr

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("lmtuner_core", "tools", "server")  # every module a tool's schema can come from
CACHE_VERSION = 1


def source_key() -> str:
    """A digest of what the schemas depend on: every source file's path, size and modification time (like Python's
    own .pyc check), the SDK's and pydantic's files, and the interpreter."""
    import mcp
    import mcp_types

    entries: list[str] = [str(CACHE_VERSION), sys.version, pydantic.VERSION]
    for package in (Path(mcp.__file__).parent, Path(mcp_types.__file__).parent):
        entries.append(_stat(package / "__init__.py"))
    for folder in SOURCES:
        for root, dirs, files in os.walk(REPO / folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            entries += [_stat(Path(root, f)) for f in sorted(files) if f.endswith(".py")]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:24]


def _stat(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return f"{path} missing"
    return f"{path} {info.st_size} {info.st_mtime_ns}"


SHARED_KEPT = 8  # listings kept in the user's cache folder: several checkouts (worktrees) may share it


def shared_folder() -> Path:
    """The user's cache folder for listings: $LMTUNER_CACHE_DIR, else $XDG_CACHE_HOME/lmtuner, else ~/.cache/lmtuner."""
    folder = os.environ.get("LMTUNER_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "lmtuner"
    return Path(folder).expanduser() / "tool-listings"


def cache_files(home: Path) -> list[Path]:
    """Where the listing of these sources is kept: the home's own, then the user's shared one."""
    name = f"tools-{source_key()}.json"
    return [home / "cache" / name, shared_folder() / name]


ENTRY_KEYS = {"description", "parameters", "output"}


def _trusted(path: Path) -> bool:
    """A listing is shown to the agent word for word: read only a file of this user's that no one else can write."""
    try:
        info = path.stat()
    except OSError:
        return False
    return (not hasattr(os, "getuid") or info.st_uid == os.getuid()) and not info.st_mode & 0o022


def _read(path: Path) -> dict[str, dict[str, Any]]:
    if not _trusted(path):
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: entry for name, entry in data.items() if isinstance(entry, dict) and set(entry) == ENTRY_KEYS}


def load(home: Path) -> dict[str, dict[str, Any]]:
    """The cached listing by tool name (the shared one completed by the home's own); empty when there is none for
    these sources."""
    own, shared = cache_files(home)
    return _read(shared) | _read(own)


def save(home: Path, tools: list[Tool]) -> None:
    """Keeps the listing of `tools` for the next start (merged with what is there: --read-only lists fewer)."""
    listing = load(home) | {
        tool.name: {"description": tool.description, "parameters": tool.parameters, "output": tool.output_schema}
        for tool in tools
    }
    own, shared = cache_files(home)
    for path, kept in ((own, 1), (shared, SHARED_KEPT)):
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as out:  # mkstemp: this user's alone (0600)
                json.dump(listing, out)
            os.replace(tmp, path)
            older = sorted((p for p in path.parent.glob("tools-*.json") if p != path), key=_mtime, reverse=True)
            for old in older[kept - 1 :]:
                old.unlink(missing_ok=True)
        except OSError:  # a read-only folder: starts build the schemas, nothing else changes
            logging.getLogger(__name__).debug("tool listing not cached in %s", path.parent, exc_info=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class DeferredTool(Tool):
    """A tool listed from the cache; its first call builds the real one (make_tool) and every call runs that."""

    _build: Callable[[], Tool] = PrivateAttr()
    _output: dict[str, Any] | None = PrivateAttr(None)
    _built: Tool | None = PrivateAttr(None)

    @classmethod
    def listed(
        cls, name: str, title: str, annotations: Any, entry: dict[str, Any], build: Callable[[], Tool], **extra: Any
    ) -> DeferredTool:
        """`extra`: the tool's icons and meta, as make_tool gives them."""
        tool = cls.model_construct(
            fn=_unbuilt, name=name, title=title, description=entry["description"], parameters=entry["parameters"],
            fn_metadata=None, is_async=True, context_kwarg=None, annotations=annotations, icons=extra.get("icons"),
            meta=extra.get("meta"), resolved_params={}, resolver_plans={},
        )  # fmt: skip
        tool._build, tool._output = build, entry["output"]
        return tool

    @property
    def output_schema(self) -> dict[str, Any] | None:  # type: ignore[override]
        return self._output

    def built(self) -> Tool:
        if self._built is None:
            self._built = self._build()
        return self._built

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        return await self.built().run(arguments, context, convert_result=convert_result)


def _unbuilt(**_: Any) -> None:
    raise RuntimeError("a deferred tool runs through DeferredTool.run")


if __name__ == "__main__":  # build and keep the listing now, as a first start would (make install)
    from server.app import build_server

    with tempfile.TemporaryDirectory() as scratch:
        build_server(home=Path(scratch))
    print(f"tool listing kept in {shared_folder()}")
