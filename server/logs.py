"""The server's own log: a plain-text file under $LMTUNER_HOME/logs/ that holds what the agent cannot be shown
(full tracebacks of unexpected failures), and a plain stderr handler in place of the SDK's Rich boxes."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import traceback
from pathlib import Path

from lmtuner_core.secrets import redact

LOG_NAME = "server.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Longest exception message repeated to the agent: enough to act on, short enough not to flood its context.
MAX_MESSAGE_CHARS = 500
_LOGGERS: dict[Path, logging.Logger] = {}


def server_log_path(home: Path) -> Path:
    return home / "logs" / LOG_NAME


def server_logger(home: Path) -> logging.Logger:
    """A logger that writes to this home's server.log (rotated at 5 MB, 3 kept). One logger per home, so two
    in-process servers on different homes (as in the tests) never write into each other's file."""
    logger = _LOGGERS.get(home)
    if logger is None:
        logger = _LOGGERS[home] = logging.Logger("lmtuner")  # not in logging's registry: one per home
        path = server_log_path(home)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def configure_process_logging(home: Path) -> None:
    """For the `lmtuner-mcp` process: plain one-line records on stderr (the SDK would install Rich's handler,
    which cuts tracebacks into narrow boxed cells) and warnings from every library into server.log too."""
    root = logging.getLogger()
    if root.handlers:
        return
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stderr)
    root.addHandler(server_logger(home).handlers[0])
    root.setLevel(logging.INFO)
    for chatty in ("mcp", "httpx", "uvicorn.access"):  # a line per request: not what a person reads a log for
        logging.getLogger(chatty).setLevel(logging.WARNING)


def report_unexpected(home: Path, tool: str, request_id: str | None, exc: BaseException) -> str:
    """Logs the full traceback of a failure that is not the user's doing, and returns the message for the agent:
    the tool, the exception's type and message (secrets redacted, cut to a sane length) and where the trace is."""
    trace = redact("".join(traceback.format_exception(exc)))
    server_logger(home).error("tool %s failed (request %s)\n%s", tool, request_id, trace.rstrip())
    detail = redact(str(exc)) or "(no message)"
    if len(detail) > MAX_MESSAGE_CHARS:
        detail = detail[:MAX_MESSAGE_CHARS] + f"… [{len(detail) - MAX_MESSAGE_CHARS} more characters in the log]"
    return (
        f"{tool} failed unexpectedly: {type(exc).__name__}: {detail}. This is not a problem with the arguments; "
        f"the full traceback is in {server_log_path(home)} (request {request_id})."
    )
