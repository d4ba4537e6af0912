"""Builds the MCP server: registers each tool function with its title and annotations, and turns our
user-facing errors into tool errors the agent can read. Importing this module must not import torch."""

from __future__ import annotations

import base64
import contextlib
import difflib
import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.lowlevel
from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, create_model, model_validator

from lmtuner_core import __version__
from lmtuner_core.errors import LmtunerError, hide_outside_paths, shown
from lmtuner_core.paths import AllowedRoots, lmtuner_home
from lmtuner_core.reporting import ProgressFn
from lmtuner_core.secrets import redact
from server.dashboard import DASHBOARD_TOOLS, dashboard_apps, dashboard_meta, hide_apps_from_plain_clients
from server.icons import server_icons, tool_icons
from server.logs import report_unexpected, server_logger
from server.prompts import register_prompts
from server.resources import register_resources
from tools.context import ToolContext

# pydantic's validation messages (which the SDK shows for schema violations) without documentation URLs.
os.environ.setdefault("PYDANTIC_ERRORS_INCLUDE_URL", "0")

INSTRUCTIONS = """\
lmtuner fine-tunes language models on the user's machine. The usual flow:
1. inspect_gpus — what hardware there is.
2. Agree with the user on the base model, the data file and the goal; propose_config builds a TrainConfig that
   fits the hardware and says why — explain that to the user.
3. analyze_dataset (with the model) to see row lengths and problems; max_seq_len ≈ its p95. For stage grpo,
   try the graders on sample answers with test_grader first.
   start_training with dry_run: true — checks every path and every data row; show the user the resolved config.
4. After the user confirms (training spends their GPU time), start_training — it returns a job_id at once.
5. job_status with wait_seconds (e.g. 30) to follow loss and ETA without busy polling; list_jobs to see all.
   include_plot: true returns the loss curve as an image; resources lmtuner://jobs/{job_id}/log, /metrics,
   /config and /loss.png hold the same data.
6. cancel_job to stop; it saves a checkpoint first. resume_job continues a cancelled or failed job from it.
   tune_config searches the recipe around a config (learning rate, epochs, LoRA rank, modules…) within a budget
   of trials and minutes, as one job: job_status shows its trials[] and best_config, ready for start_training.
7. generate with the base model and with the adapter (the job's output_dir) on the same prompts, to show the
   user what changed.
8. serve_model serves a model and its adapters through vLLM's OpenAI-compatible API (base_url); while it runs,
   generate uses it. stop_serving when done (it holds memory); list_servers shows what runs.
9. quantize (bnb-nf4, bnb-int8, or gptq-w4a16 for vLLM) makes a smaller copy, merging an adapter first if given;
   export_model writes a GGUF file (and an Ollama Modelfile) for llama.cpp, Ollama and LM Studio.
Read state (list_jobs, job_status) before starting new work, so two jobs do not fight over one GPU.
Errors name the field to change and the values accepted."""


# start_training asks the user before a job estimated to run longer than this, or holding more devices (GPUs, Ray
# workers) than this; the owner changes them with --confirm-over-minutes / --confirm-over-devices.
CONFIRM_OVER_MINUTES = 30.0
CONFIRM_OVER_DEVICES = 1


@dataclass(frozen=True)
class ToolSpec:
    target: str  # "module:function" in tools/, imported when the tool is first called (the server starts fast)
    title: str
    read_only: bool
    destructive: bool = False
    idempotent: bool = False
    # Reads of local state that answer in about a millisecond: run on the event loop instead of a worker thread,
    # so that under many concurrent calls no thread hand-off (and GIL contention with the loop) adds latency.
    # A call that asks to wait (wait_seconds > 0) still goes to a worker thread.
    inline: bool = False
    # Asks the user (elicitation) before a job over the owner's limits spends their devices: start_training.
    confirms_spending: bool = False

    @property
    def name(self) -> str:
        return self.target.rsplit(":", 1)[1]

    @property
    def fn(self) -> Callable[..., Any]:
        module, name = self.target.rsplit(":", 1)
        return getattr(importlib.import_module(module), name)


TOOLS = (
    ToolSpec("tools.hardware:inspect_gpus", "Inspect GPUs and machine", read_only=True, idempotent=True),
    ToolSpec("tools.data:analyze_dataset", "Analyze a dataset", read_only=True, idempotent=True),
    ToolSpec("tools.graders:test_grader", "Score sample answers with graders", read_only=True, idempotent=True),
    ToolSpec("tools.planning:propose_config", "Propose a training config that fits", read_only=True, idempotent=True),
    ToolSpec("tools.training:start_training", "Start a fine-tuning job", read_only=False, confirms_spending=True),
    ToolSpec("tools.training:job_status", "Job status and progress", read_only=True, idempotent=True, inline=True),
    ToolSpec("tools.training:list_jobs", "List jobs", read_only=True, idempotent=True, inline=True),
    ToolSpec("tools.training:cancel_job", "Cancel a job", read_only=False, destructive=True, idempotent=True),
    ToolSpec("tools.training:resume_job", "Resume a failed or cancelled job", read_only=False),
    ToolSpec("tools.tuning:tune_config", "Sweep the training recipe (Ray Tune)", read_only=False),
    ToolSpec("tools.inference:generate", "Generate with a model or adapter", read_only=True),
    ToolSpec("tools.evaluation:evaluate", "Evaluate a model, adapter or predictions file", read_only=True),
    ToolSpec("tools.inference:merge_adapter", "Merge an adapter into its base model", read_only=False),
    ToolSpec("tools.quantize:quantize", "Quantize a model (bnb-nf4, bnb-int8, gptq-w4a16)", read_only=False),
    ToolSpec("tools.export:export_model", "Export a model or adapter as GGUF (llama.cpp, Ollama)", read_only=False),
    ToolSpec("tools.serving:serve_model", "Serve a model and adapters with vLLM", read_only=False),
    ToolSpec("tools.serving:stop_serving", "Stop a vLLM server", read_only=False, destructive=True, idempotent=True),
    ToolSpec("tools.serving:list_servers", "List vLLM servers", read_only=True, idempotent=True),
)


class ConfirmStart(BaseModel):
    """The form of start_training's question."""

    start: bool = Field(description="Start the job now, spending what is shown above.")


NOT_ASKED = "not asked"


def spending_resolver(ctx: ToolContext) -> Callable[..., Any]:
    """start_training's confirmation, asked through the SDK's resolver (`Resolve`/`Elicit`): on the 2026-07-28
    protocol it rides the call's input_required round, on older ones it is an elicitation request mid-call. Asked
    only of a client that declared elicitation, for a real start (not a dry run, not already confirmed) over the
    owner's limits; otherwise the tool runs as called and answers 'needs_confirmation' where the limits apply."""

    async def ask_before_spending(
        mcp_context: Context, config, dry_run, force, confirmed
    ) -> Elicit[ConfirmStart] | str:
        from tools import training

        if dry_run or confirmed or (ctx.confirm_over_minutes is None and ctx.confirm_over_devices is None):
            return NOT_ASKED
        capabilities = mcp_context.client_capabilities
        elicitation = capabilities.elicitation if capabilities is not None else None
        if elicitation is None or (elicitation.form is None and elicitation.url is not None):
            return NOT_ASKED  # the tool answers with a preview instead
        try:
            _, _, preview = await anyio.to_thread.run_sync(training.job_preview, ctx, config, force)
        except LmtunerError:
            return NOT_ASKED  # the tool body refuses the config itself, naming the field
        if preview is None:
            return NOT_ASKED
        return Elicit(training.confirmation_message(preview), ConfirmStart)

    return ask_before_spending


def bind_tool(
    fn: Callable[..., Any], ctx: ToolContext, inline: bool = False, confirms_spending: bool = False
) -> Callable[..., Any]:
    """The tool function as the SDK registers it: `ctx` filled in, a thread-safe `progress` for tools that take
    one, LmtunerError turned into ToolError, and any other exception into a ToolError that names the tool, the
    exception and the server log holding its traceback. The signature (minus ctx and progress) is kept, with
    annotations evaluated, so the SDK derives the same JSON schema. `inline`: see ToolSpec."""
    signature = inspect.signature(fn, eval_str=True)
    params = [p for name, p in signature.parameters.items() if name not in ("ctx", "progress")]
    reports_progress = "progress" in signature.parameters
    # The SDK fills a Context-typed parameter (the request's id, its progress token) and leaves it out of the schema.
    params.append(inspect.Parameter("mcp_context", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    if confirms_spending:  # filled by the resolver, not by the caller: left out of the schema by the SDK
        answer = Annotated[ElicitationResult[ConfirmStart], Resolve(spending_resolver(ctx))]
        params.append(inspect.Parameter("confirmation", inspect.Parameter.KEYWORD_ONLY, annotation=answer))
    name = fn.__name__

    def call(mcp_context: Context, confirmation: ElicitationResult[ConfirmStart] | None = None, **kwargs: Any) -> Any:
        try:
            if confirmation is not None and not (
                isinstance(confirmation, AcceptedElicitation) and confirmation.data == NOT_ASKED
            ):
                agreed = isinstance(confirmation, AcceptedElicitation) and confirmation.data.start
                if not agreed:  # declined, cancelled, or accepted with start: false
                    from tools import training

                    server_logger(ctx.home).info("tool %s: the user declined the start", name)
                    return training.declined(ctx, kwargs["config"], kwargs.get("force", False))
                kwargs["confirmed"] = True
            result = fn(ctx, **kwargs)
        except LmtunerError as exc:
            message = redact(str(exc))
            shown = hide_outside_paths(message, ctx.visible_folders())
            if shown != message:
                server_logger(ctx.home).warning("tool %s refused: %s", name, message)
            raise ToolError(shown) from None
        except Exception as exc:
            message = report_unexpected(ctx.home, name, mcp_context.request_id, exc)
            raise ToolError(hide_outside_paths(message, ctx.visible_folders())) from None
        png = getattr(result, "_plot_png", None)
        if png:  # structured result plus the picture, for hosts that show images
            return CallToolResult(
                content=[
                    TextContent(type="text", text=result.model_dump_json(indent=2)),
                    ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"),
                ],
                structured_content=result.model_dump(mode="json"),
            )
        return result

    @functools.wraps(fn)
    async def tool(**kwargs: Any) -> Any:
        if reports_progress:
            kwargs["progress"] = progress_reporter(kwargs["mcp_context"])
        if inline and not kwargs.get("wait_seconds"):
            return call(**kwargs)
        return await anyio.to_thread.run_sync(functools.partial(call, **kwargs))

    tool.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    tool.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
    del tool.__wrapped__  # type: ignore[attr-defined]
    return tool


def progress_reporter(mcp_context: Context) -> ProgressFn | None:
    """A progress function that any thread may call, or None when the client sent no progress token (then the
    tool skips the work of reporting). Must be made on the event loop: tools run in a worker thread, and some
    fan out into threads of their own (generate's concurrent requests to vLLM), which are not AnyIO's and can
    only reach the loop through the token taken here."""
    if not asked_for_progress(mcp_context):
        return None
    loop = anyio.lowlevel.current_token()

    def progress(done: float, total: float, message: str) -> None:
        try:
            anyio.from_thread.run(mcp_context.report_progress, done, total, message, token=loop)
        except anyio.RunFinishedError:
            raise  # the server's event loop is gone: nobody can receive the result either, so stop the work
        except Exception:  # progress is advisory: a client that went away must not fail the work itself
            logging.getLogger(__name__).debug("progress notification not sent", exc_info=True)

    return progress


def asked_for_progress(mcp_context: Context) -> bool:
    """Whether the caller wants progress notifications. Over stdio and HTTP the request's _meta carries a
    progress token; the SDK's in-process client hands its callback to its dispatcher instead, which the
    context shows only through a private attribute (read defensively: when unsure, report, and the SDK
    drops notifications nobody asked for)."""
    request = mcp_context.request_context
    if (request.meta or {}).get("progress_token") is not None:
        return True
    outbound = getattr(request.session, "_request_outbound", None)
    return getattr(getattr(outbound, "transport", None), "kind", "direct") == "direct"


def build_server(
    *,
    roots: list[str | Path] | None = None,
    home: Path | None = None,
    read_only: bool = False,
    ray_addresses: list[str] | None = None,
    server_options: dict[str, Any] | None = None,
    confirm_over_minutes: float | None = CONFIRM_OVER_MINUTES,
    confirm_over_devices: int | None = CONFIRM_OVER_DEVICES,
) -> MCPServer:
    """The lmtuner MCP server. roots=None confines file arguments to the working directory and $LMTUNER_HOME.
    ray_addresses: the Ray clusters callers may name (`--ray-address`), with those of LMTUNER_RAY_ADDRESSES; with
    neither, only 'auto'. server_options: more MCPServer arguments (the auth of `--auth oauth|oidc`, see
    server/auth/setup.py)."""
    home = home or lmtuner_home()
    with contextlib.suppress(OSError):  # its logs, jobs and caches go here from the first call
        home.mkdir(parents=True, exist_ok=True)
    # The server's own run folders are always readable: an agent passes a job's output_dir to generate/merge;
    # so are the folders it converted .gguf models into, which propose_config puts in its config.
    allowed = AllowedRoots([*roots, home / "runs", home / "models"] if roots is not None else [Path.cwd(), home])
    clusters: Any = ClustersOnFirstUse(ray_addresses, os.environ)
    if ray_addresses or os.environ.get("LMTUNER_RAY_ADDRESSES"):
        from lmtuner_core.jobs.ray_launcher import RayAddresses

        clusters = RayAddresses.from_settings(ray_addresses, os.environ)  # a bad entry is refused now
    ctx = ToolContext(
        home=home, roots=allowed, read_only=read_only, ray_addresses=clusters,
        confirm_over_minutes=confirm_over_minutes, confirm_over_devices=confirm_over_devices,
    )  # fmt: skip
    tools = listed_tools([spec for spec in TOOLS if spec.read_only or not read_only], ctx)
    options = dict(server_options or {})
    # The job dashboard (MCP Apps): shown by hosts that declared Apps; hidden from the others' lists.
    middleware = [hide_apps_from_plain_clients, *options.pop("middleware", ())]
    server = MCPServer(
        "lmtuner",
        title="lmtuner — fine-tune LLMs from your agent",
        version=__version__,
        instructions=INSTRUCTIONS,
        icons=server_icons(),
        tools=tools,
        extensions=[dashboard_apps()],
        middleware=middleware,
        **options,
    )
    register_resources(server, ctx)
    register_prompts(server)
    return server


def listed_tools(specs: list[ToolSpec], ctx: ToolContext) -> list[Tool]:
    """The tools, from the listing the last start kept when the sources are unchanged (each then built on its
    first call), else built now and their listing kept (server/tool_cache.py)."""
    from server import tool_cache

    cached = tool_cache.load(ctx.home)
    if all(spec.name in cached for spec in specs):
        return [
            tool_cache.DeferredTool.listed(
                spec.name,
                spec.title,
                annotations(spec),
                cached[spec.name],
                functools.partial(make_tool, spec, ctx),
                icons=tool_icons(spec.name),
                meta=dashboard_meta() if spec.name in DASHBOARD_TOOLS else None,
            )
            for spec in specs
        ]
    tools = [make_tool(spec, ctx) for spec in specs]
    tool_cache.save(ctx.home, tools)
    return tools


def annotations(spec: ToolSpec) -> ToolAnnotations:
    return ToolAnnotations(
        title=spec.title,
        readOnlyHint=spec.read_only,
        destructiveHint=spec.destructive,
        idempotentHint=spec.idempotent,
        openWorldHint=False,
    )


class ClustersOnFirstUse:
    """The owner's Ray clusters (RayAddresses) when none are configured: only 'auto', with nothing to check at
    start, so the Ray module is imported when a tool first asks (the server starts fast)."""

    def __init__(self, given: list[str] | None, environ: Any) -> None:
        self._settings, self._made = (given, dict(environ)), None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._made is None:
            from lmtuner_core.jobs.ray_launcher import RayAddresses

            self._made = RayAddresses.from_settings(*self._settings)
        return getattr(self._made, name)


def make_tool(spec: ToolSpec, ctx: ToolContext) -> Tool:
    tool = Tool.from_function(
        bind_tool(spec.fn, ctx, inline=spec.inline, confirms_spending=spec.confirms_spending),
        name=spec.name,
        title=spec.title,
        description=inspect.getdoc(spec.fn),
        annotations=annotations(spec),
        icons=tool_icons(spec.name),
        meta=dashboard_meta() if spec.name in DASHBOARD_TOOLS else None,
    )
    tool.fn_metadata.arg_model = strict_arguments(tool.fn_metadata.arg_model)
    tool.parameters = tool.fn_metadata.arg_model.model_json_schema(by_alias=True)  # now additionalProperties: false
    return tool


def strict_arguments(arg_model: type[BaseModel]) -> type[BaseModel]:
    """The SDK's argument model for a tool, refusing an unknown argument by name with the closest accepted one. The
    SDK drops unknown arguments, so `"dryrun": true` (for dry_run) would start a real job and `"max_new_token": 5`
    would generate with the default; a JSON schema with additionalProperties: false tells clients before they send.
    Schema violations are reported with pydantic's text: the caller's input is kept out of it (it can be long, and
    may hold values the user would not want echoed into logs)."""
    accepted = [field.alias or name for name, field in arg_model.model_fields.items()]

    def refuse_unknown(cls: type[BaseModel], data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in accepted:
                    close = difflib.get_close_matches(str(key), accepted, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown argument {shown(key)}{hint}; accepted: {', '.join(accepted) or 'none'}")
        return data

    strict = create_model(
        arg_model.__name__,
        __base__=arg_model,
        __validators__={"refuse_unknown": model_validator(mode="before")(refuse_unknown)},
    )
    strict.model_config.update(
        extra="forbid",
        hide_input_in_errors=True,
        allow_inf_nan=False,  # NaN/Infinity: "a finite number", not "should be ≤ N"
    )
    strict.model_rebuild(force=True)
    return strict
