"""generate and merge_adapter: try a model or a fine-tuned adapter, and turn an adapter into a plain model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError, remote_code_explained
from lmtuner_core.models.export import MergeResult, folder_size
from lmtuner_core.models.export import merge_adapter as run_merge
from lmtuner_core.models.inference import GenerateResult, generate_with_server
from lmtuner_core.models.inference import generate as run_generation
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.report.model_card import export_card
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext, TrustRemoteCode


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"] = Field(description="Who speaks. Example: 'user'.")
    content: str = Field(max_length=200_000, description="What they say.")


def generate(
    ctx: ToolContext,
    model: Annotated[str, Field(description="Base model: local folder or hub id. Example: './models/tiny'.")],
    prompts: Annotated[
        list[Annotated[str, Field(max_length=200_000)]] | None,
        Field(max_length=256, description="Single-turn user prompts. Example: ['What is 3 plus 4?']."),
    ] = None,
    messages: Annotated[
        list[list[Message]] | None,
        Field(max_length=256, description="Conversations to continue, each a list of {role, content}."),
    ] = None,
    adapter: Annotated[
        str | None, Field(description="A trained adapter folder (a job's output_dir) to apply on the base.")
    ] = None,
    max_new_tokens: Annotated[int, Field(ge=1, le=8192, description="Most tokens to generate per answer.")] = 256,
    temperature: Annotated[float, Field(ge=0, le=2, description="0 = greedy (repeatable); 0.7 = varied.")] = 0.0,
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")] = 1.0,
    engine: Annotated[
        Literal["auto", "transformers", "vllm"],
        Field(
            description="'transformers' runs in this process; 'vllm' sends the requests to a running serve_model "
            "server of this model (and adapter); 'auto' uses such a server when one runs, else transformers."
        ),
    ] = "auto",
    trust_remote_code: TrustRemoteCode = False,
    progress: ProgressFn | None = None,
) -> GenerateResult:
    """Generate answers from a model, optionally with a fine-tuned adapter, using the model's chat template:
    the quickest way to show the user what training changed (ask the same prompts with and without the
    adapter). Give `prompts` (single questions) or `messages` (whole conversations), not both. In process the
    model stays loaded for the next call; for many prompts, serve_model first and generate goes through vLLM."""
    if (prompts is None) == (messages is None):
        raise LmtunerError("give exactly one of `prompts` (a list of strings) or `messages` (a list of conversations)")
    conversations = (
        [[{"role": "user", "content": p}] for p in prompts]
        if prompts is not None
        else [[m.model_dump() for m in conversation] for conversation in messages or []]
    )
    if not conversations or any(not c for c in conversations):
        raise LmtunerError("prompts/messages: give at least one non-empty prompt or conversation")
    adapter_path = ctx.adapter_folder(adapter, trust_remote_code) if adapter else None
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    adapter_ref = str(adapter_path) if adapter_path else None
    if engine != "transformers":
        found = ctx.servers.find(model_ref, adapter_ref)
        if found is None and engine == "vllm":
            raise LmtunerError(
                f"engine: 'vllm' needs a running server of {model_ref}"
                + (f" with adapter {adapter_ref}" if adapter_ref else "")
                + " (start one with serve_model, see list_servers), or use engine 'auto' or 'transformers'",
                field="engine",
            )
        if found is not None:
            record, served_name = found
            try:
                return generate_with_server(
                    record.base_url, served_name, conversations, model_ref=model_ref, adapter=adapter_ref,
                    server_id=record.server_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    progress=progress,
                )  # fmt: skip
            except ConnectionError as exc:
                if engine == "vllm":
                    raise LmtunerError(f"{exc}; check it with list_servers", field="engine") from None
                # auto: the server went away between the lookup and the request; answer in process instead
    with remote_code_explained(model_ref, "generate"):
        return run_generation(
            model_ref,
            conversations,
            adapter=adapter_ref,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )


def merge_adapter(
    ctx: ToolContext,
    model: Annotated[str, Field(description="The base model the adapter was trained on. Example: './models/tiny'.")],
    adapter: Annotated[str, Field(description="The adapter folder: a LoRA-family job's output_dir.")],
    output_dir: Annotated[str, Field(description="A new or empty folder for the merged model. Example: 'merged'.")],
    trust_remote_code: TrustRemoteCode = False,
) -> MergeResult:
    """Merge a trained adapter into its base model and save a standalone Hugging Face model (safetensors,
    config, tokenizer) that vLLM and other tools load without peft. Takes the base's full-precision size on
    disk; the merged model behaves as base + adapter."""
    adapter_path = ctx.adapter_folder(adapter, trust_remote_code)
    output = ctx.output_folder(output_dir)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    with remote_code_explained(model_ref, "merge_adapter"):
        result = run_merge(model_ref, adapter_path, output, trust_remote_code=trust_remote_code)
    what = "a full model: the base with its fine-tuned LoRA adapter merged in"
    result.model_card = str(export_card(output, model_ref, adapter_path, what=what, tags=["merged"]))
    result.size_bytes = folder_size(output)  # the card is one of the files written
    return result
