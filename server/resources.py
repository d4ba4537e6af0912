"""Resources: a job's log, metrics, config and loss curve, for agents that read state rather than call tools."""

from __future__ import annotations

import json
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError

from lmtuner_core.errors import LmtunerError
from lmtuner_core.run import RunDir
from lmtuner_core.secrets import redact
from tools.context import ToolContext

# The readers below import what they need when first read: the server starts without them (server/tool_cache.py).

LOG_TAIL_LINES = 200


def register_resources(server: MCPServer, ctx: ToolContext) -> None:
    def run_of(job_id: str) -> RunDir:
        try:
            return RunDir(Path(ctx.jobs.get(job_id).run_dir))  # validates the id; unknown ids are refused
        except LmtunerError as exc:
            raise ResourceError(str(exc)) from None

    @server.resource(
        "lmtuner://jobs/{job_id}/log",
        name="job_log",
        title="Job log (tail)",
        description=f"The last {LOG_TAIL_LINES} lines of the job's train.log.",
        mime_type="text/plain",
    )
    def job_log(job_id: str) -> str:
        from lmtuner_core.system.files import tail_lines

        return redact("\n".join(tail_lines(run_of(job_id).log, LOG_TAIL_LINES)))

    @server.resource(
        "lmtuner://jobs/{job_id}/metrics",
        name="job_metrics",
        title="Job metrics (JSON lines)",
        description="metrics.jsonl: one JSON object per logged step (loss, learning_rate, tokens_per_second, ...).",
        mime_type="application/jsonl",
    )
    def job_metrics(job_id: str) -> str:
        path = run_of(job_id).metrics
        return path.read_text(encoding="utf-8") if path.exists() else ""

    @server.resource(
        "lmtuner://jobs/{job_id}/config",
        name="job_config",
        title="Job config",
        description="The TrainConfig the job runs, with defaults filled in and paths absolute.",
        mime_type="application/json",
    )
    def job_config(job_id: str) -> str:
        return json.dumps(json.loads(run_of(job_id).config.read_text(encoding="utf-8")), indent=2)

    @server.resource(
        "lmtuner://jobs/{job_id}/report",
        name="job_report",
        title="Result report",
        description="A completed job's report.json: base vs tuned on held-out rows, the retention check, advice.",
        mime_type="application/json",
    )
    def job_report(job_id: str) -> str:
        from lmtuner_core.report.result import REPORT_FILE

        path = run_of(job_id).root / REPORT_FILE
        if not path.is_file():
            raise ResourceError(f"job {job_id} has no result report (yet): it is written when a job completes")
        return path.read_text(encoding="utf-8")

    @server.resource(
        "lmtuner://jobs/{job_id}/loss.png",
        name="job_loss_curve",
        title="Loss curve",
        description="Training (and eval) loss against step, as a PNG image.",
        mime_type="image/png",
    )
    def job_loss_curve(job_id: str) -> bytes:
        from lmtuner_core.jobs.plots import loss_curve_png

        return loss_curve_png(run_of(job_id), job_id)
