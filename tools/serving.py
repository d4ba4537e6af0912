"""serve_model, stop_serving, list_servers: a vLLM OpenAI-compatible server for a base model and its adapters."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lmtuner_core.models.servers_store import ServerStatus
from lmtuner_core.models.serving import ServerInfo, ServerList, VllmDtype
from tools.context import ToolContext, TrustRemoteCode

ServerId = Annotated[
    str, Field(description="The id serve_model returned. Example: 'srv-20261129-004512-b7c1'.", max_length=64)
]


def serve_model(
    ctx: ToolContext,
    model: Annotated[str, Field(description="Base model: local folder or hub id. Example: './models/tiny'.")],
    adapters: Annotated[
        dict[str, str] | None,
        Field(
            max_length=16,
            description="LoRA adapters to serve beside the base, {name: adapter folder}; a request names one as "
            "its `model`. Example: {'medical': 'runs/20261128-215012-a3f9/final'}.",
        ),
    ] = None,
    port: Annotated[
        int | None, Field(ge=1024, le=65535, description="TCP port; default: a free one. Example: 8000.")
    ] = None,
    served_model_name: Annotated[
        str | None,
        Field(max_length=128, description="The base model's name in API requests; default: its folder name."),
    ] = None,
    max_model_len: Annotated[
        int | None,
        Field(ge=16, le=1_048_576, description="Longest prompt + answer in tokens; default: min(2048, the model's)."),
    ] = None,
    dtype: Annotated[
        VllmDtype,
        Field(description="Weights' dtype; 'auto' = float32 on CPU (same tokens as transformers), the model's on GPU."),
    ] = "auto",
    kv_cache_mib: Annotated[
        int | None,
        Field(ge=16, le=1_048_576, description="KV cache size in MiB; default on CPU 1024, on GPU vLLM's own."),
    ] = None,
    startup_timeout: Annotated[
        float, Field(ge=10, le=1800, description="Seconds to wait for the server to answer /health.")
    ] = 300,
    trust_remote_code: TrustRemoteCode = False,
) -> ServerInfo:
    """Serve a model (plus fine-tuned LoRA adapters) with vLLM's OpenAI-compatible API on 127.0.0.1, for fast
    batched generation or for the user's own apps. Returns once the server is healthy (≈20 s for a small model on
    CPU, longer for big ones) with `base_url` (POST {base_url}/chat/completions, `model` = served_model_name or
    an adapter's name) and `server_id`. While it runs, generate with engine 'auto' or 'vllm' uses it. It keeps
    running until stop_serving; it holds memory (GPU memory on a GPU machine), so stop it when done."""
    return ctx.servers.start(
        model, adapters=adapters, port=port, served_model_name=served_model_name, max_model_len=max_model_len,
        dtype=dtype, kv_cache_mib=kv_cache_mib, startup_timeout=startup_timeout, trust_remote_code=trust_remote_code,
    )  # fmt: skip


def stop_serving(
    ctx: ToolContext,
    server_id: ServerId,
    grace_seconds: Annotated[
        float, Field(ge=0, le=120, description="How long the server may take to exit before it is killed.")
    ] = 10,
) -> ServerInfo:
    """Stop a server started by serve_model: every process of it ends (checked), freeing its memory and port.
    Stopping a server that already stopped changes nothing."""
    return ctx.servers.stop(server_id, grace=grace_seconds)


def list_servers(
    ctx: ToolContext,
    status: Annotated[
        ServerStatus | None,
        Field(description="Only servers with this status. Example: 'running'."),
    ] = None,
) -> ServerList:
    """List vLLM servers started by serve_model, newest first, with base_url, served model and adapter names and
    status; a server whose process died shows as 'failed' with its log tail. Use it to find a running server
    before starting another (each holds memory)."""
    return ctx.servers.list(status)
