"""Errors a user (or the agent acting for one) can fix: each message names the field and the fix."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

ECHO_LIMIT = 120  # characters of a caller's value an error message repeats: enough to recognise it
MESSAGE_LIMIT = 2000  # a whole message, whatever it quotes (file contents, a library's error)


def shown(value: Any, limit: int = ECHO_LIMIT) -> str:
    """repr(value) for an error message, cut to about `limit` characters with the full length said: a 10,000-character
    job_id or path is not echoed back whole (into the agent's context, or a log). The start and the end are kept
    (a path's end names the file)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters as text"
    return f"{text[: limit - 25]}…{text[-24:]} ({size})"


def _cut(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT:
        return message
    return f"{message[: MESSAGE_LIMIT - 60]}… (message cut: {len(message):,} characters)"


# An absolute path in a message: starts after a space, quote, bracket, '=' or the start, runs to a space, quote,
# bracket, comma or colon-space (as libraries print them: "File "/x/y.py", line 3", "(/x/y)", "at /x/y: …"). A URL's
# "//host" (after "scheme:") and its path (after the host) are not file paths.
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~-])(?<!:)(?<!:/)/(?!/)(?:[^\s'"(),:\[\]<>]|:(?!\s))+""")
HIDDEN_PATH = "<path outside the allowed folders>"


def hide_outside_paths(message: str, allowed: Iterable[Path] | None) -> str:
    """The message with every absolute path outside `allowed` (the roots and $LMTUNER_HOME) replaced: an error
    shows the user's own files, not where the server's libraries and caches live. None: unconfined (the CLI)."""
    if allowed is None:
        return message
    folders = [Path(a) for a in allowed]
    hidden = False

    def replace(match: re.Match) -> str:
        nonlocal hidden
        path = Path(match.group(0).rstrip("."))
        if any(path == f or path.is_relative_to(f) for f in folders):
            return match.group(0)
        hidden = True
        return HIDDEN_PATH

    shown_message = _ABSOLUTE_PATH.sub(replace, message)
    return shown_message + (" (details in server.log)" if hidden and "server.log" not in message else "")


class LmtunerError(Exception):
    """A problem with what the user asked for. The message is shown as is, so it must say what to change.
    Messages are capped at MESSAGE_LIMIT characters; values the caller gave are quoted through `shown`."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(_cut(message))
        self.field = field


class NotFoundError(LmtunerError):
    """A job, run or file that does not exist."""


@contextmanager
def remote_code_explained(model: str, tool: str) -> Iterator[None]:
    """Turns transformers' refusal to run a model's own code ("contains custom code … pass the argument
    `trust_remote_code=True`") into a message naming the tool's parameter."""
    try:
        yield
    except (ValueError, OSError) as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise remote_code_refusal(model, tool) from None


def remote_code_refusal(model: str, tool: str) -> LmtunerError:
    return LmtunerError(
        f"trust_remote_code: {shown(model)} needs code of its own (Python files in its folder or hub repository) "
        f"to load, and that code is not run unless asked for; if you trust it, call {tool} again with "
        "trust_remote_code: true",
        field="trust_remote_code",
    )


def format_validation_error(exc: ValidationError, prefix: str = "", root: str = "config") -> str:
    """One line per problem, `field.path: message`, without pydantic's URLs or echoed input values."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in err["loc"])
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or root)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = "must be a finite number (not NaN or Infinity)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (f" — {msg}" if msg != "Extra inputs are not permitted" else "")
        if loc and msg.startswith((f"{loc}[", f"{loc}.")):  # the message names its own place (e.g. graders[1].type)
            lines.append(f"{prefix}{msg}")
            continue
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)
