"""Errors a user (or the agent acting for one) can fix: each message names the field and the fix."""

from __future__ import annotations

from pydantic import ValidationError


class LmtunerError(Exception):
    """A problem with what the user asked for. The message is shown as is, so it must say what to change."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFoundError(LmtunerError):
    """A job, run or file that does not exist."""


def format_validation_error(exc: ValidationError, prefix: str = "", root: str = "config") -> str:
    """One line per problem, `field.path: message`, without pydantic's URLs or echoed input values."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in err["loc"])
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or root)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (f" — {msg}" if msg != "Extra inputs are not permitted" else "")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)
