"""generate with the embedded engine: transformers + the model's chat template, an optional PEFT adapter,
batched, greedy or sampled, stopping at the model's end tokens.

One model stays loaded between calls (the agent usually asks several questions of the same model); asking
for another one replaces it. `generate_with_server` sends the same conversations to a vLLM server of ours
(lmtuner_core.models.serving) through its OpenAI-compatible /v1/chat/completions, concurrently, and returns the same
result shape.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.reporting import ProgressFn

if TYPE_CHECKING:  # imported where used: the server starts without it
    import httpx

_LOADED: dict[str, Any] = {}  # {"key": (model, adapter), "model": ..., "tokenizer": ...}
_LOCK = threading.Lock()  # one generation at a time: the loaded model is shared


class GeneratedText(BaseModel):
    text: str = Field(description="The generated continuation (special tokens removed).")
    tokens: int = Field(description="How many tokens were generated.")
    finish_reason: str = Field(description="'stop' (an end token) or 'length' (max_new_tokens reached).")


class GenerateResult(BaseModel):
    outputs: list[GeneratedText] = Field(description="One output per prompt or conversation, in order.")
    engine: str = Field(description="Which engine generated: 'transformers' (in process) or 'vllm' (a server).")
    tokens_per_second: float = Field(description="Generated tokens per second over the whole call.")
    model: str = Field(description="The base model used.")
    adapter: str | None = Field(None, description="The adapter applied, if any.")
    server_id: str | None = Field(None, description="The vLLM server that answered (engine 'vllm').")


def _load(model_ref: str, adapter: str | None, trust_remote_code: bool = False):
    """(model, tokenizer), reusing the loaded pair when it is the same model and adapter."""
    key = (model_ref, adapter, trust_remote_code)  # a model loaded with its own code is not reused without leave
    if _LOADED.get("key") == key:
        return _LOADED["model"], _LOADED["tokenizer"]
    _LOADED.clear()  # free the previous model before loading the next
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmtuner_core.data.chat_template import ensure_chat_template
    from lmtuner_core.training.rope import apply_recorded_rope, restore_xpos

    transformers.utils.logging.disable_progress_bar()  # a server's stderr is a log, not a terminal

    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    config = AutoConfig.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
    if adapter:
        apply_recorded_rope(config, adapter)
    else:
        restore_xpos(config)  # a full xPos model's config.json records it; plain transformers would drop it
    model = AutoModelForCausalLM.from_pretrained(
        model_ref, config=config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    # a trained adapter saves its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(adapter or model_ref, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to("cuda" if cuda else "cpu").eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left so every row ends at the prompt
    ensure_chat_template(tokenizer)
    _LOADED.update(key=key, model=model, tokenizer=tokenizer)
    return model, tokenizer


@contextlib.contextmanager
def loaded_model(model_ref: str, adapter: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) as `generate` loads them (the loaded pair is reused), held for the caller's block."""
    with _LOCK:
        try:
            model, tokenizer = _load(model_ref, adapter, trust_remote_code)
        except OSError as exc:
            raise LmtunerError(f"model: cannot load {shown(model_ref)} ({exc})", field="model") from None
        yield model, tokenizer


def answer(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[GeneratedText]:
    """The assistant's next turn for each conversation, from a loaded model (the `generate` tool's, or the model a
    training job has just trained), in batches padded on the left, stopping at the model's end tokens."""
    import torch

    eos = model.generation_config.eos_token_id
    end_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    torch.manual_seed(seed)
    outputs: list[GeneratedText] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row ends where its answer begins
    try:
        for first in range(0, len(conversations), batch_size):
            batch = conversations[first : first + batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
            if temperature > 0:
                options.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                options.update(do_sample=False, temperature=None, top_p=None)  # greedy: no sampling knobs
            with torch.no_grad():
                out = model.generate(**inputs, **options)
            for row in out[:, inputs["input_ids"].shape[1] :].tolist():
                stop = next((i for i, t in enumerate(row) if t in end_ids), None)
                new = row[:stop] if stop is not None else [t for t in row if t != tokenizer.pad_token_id]
                outputs.append(
                    GeneratedText(
                        text=tokenizer.decode(new, skip_special_tokens=True),
                        tokens=len(new),
                        finish_reason="stop" if stop is not None else "length",
                    )
                )
            if progress:
                progress(len(outputs), len(conversations), f"generated {len(outputs)} of {len(conversations)}")
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def generate(
    model_ref: str,
    conversations: list[list[dict]],
    *,
    adapter: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> GenerateResult:
    """Answers each conversation (a list of {role, content}) with the assistant's next turn."""
    with _LOCK:
        try:
            model, tokenizer = _load(model_ref, adapter, trust_remote_code)
        except OSError as exc:
            raise LmtunerError(f"model: cannot load {shown(model_ref)} ({exc})", field="model") from None
        started = time.perf_counter()
        outputs = answer(model, tokenizer, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, batch_size=batch_size, seed=seed, progress=progress)  # fmt: skip
        generated = sum(o.tokens for o in outputs)
        elapsed = time.perf_counter() - started
    return GenerateResult(
        outputs=outputs,
        engine="transformers",
        tokens_per_second=round(generated / elapsed, 1) if elapsed > 0 else 0.0,
        model=model_ref,
        adapter=adapter,
    )


def _chat_completion(client: httpx.Client, url: str, body: dict) -> dict:
    import httpx

    try:
        response = client.post(url, json=body)
    except httpx.TransportError as exc:
        raise ConnectionError(f"engine 'vllm': no answer from {url} ({exc})") from exc
    if response.is_error:
        detail = response.text[:500]
        with contextlib.suppress(ValueError, AttributeError):
            detail = response.json().get("error", {}).get("message", detail)
        raise LmtunerError(f"engine 'vllm': the server refused the request (HTTP {response.status_code}: {detail})")
    return response.json()


def generate_with_server(
    base_url: str,
    served_name: str,
    conversations: list[list[dict]],
    *,
    model_ref: str,
    adapter: str | None = None,
    server_id: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    concurrency: int = 32,
    timeout: float = 600.0,
    progress: ProgressFn | None = None,
) -> GenerateResult:
    """Answers each conversation through a vLLM server's /v1/chat/completions, up to `concurrency` requests at
    once (vLLM batches them). Raises ConnectionError when the server does not answer at all."""
    url = base_url.rstrip("/") + "/chat/completions"
    done = 0
    done_lock = threading.Lock()

    def one(conversation: list[dict]) -> GeneratedText:
        nonlocal done
        body = {"model": served_name, "messages": conversation, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0, "seed": seed}  # fmt: skip
        reply = _chat_completion(client, url, body)
        choice = reply["choices"][0]
        tokens = int(reply.get("usage", {}).get("completion_tokens") or 0)
        if choice.get("finish_reason") == "stop" and not isinstance(choice.get("stop_reason"), str) and tokens:
            tokens -= 1  # vLLM counts the end token; the transformers engine (and GeneratedText.tokens) does not
        if progress:
            with done_lock:
                done += 1
                progress(done, len(conversations), f"generated {done} of {len(conversations)}")
        return GeneratedText(
            text=choice["message"].get("content") or "",
            tokens=tokens,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        )

    started = time.perf_counter()
    import httpx

    workers = max(1, min(concurrency, len(conversations)))
    # One pooled client for every request thread (httpx.Client is thread-safe); vLLM batches what arrives together.
    with (
        httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=workers)) as client,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        outputs = list(pool.map(one, conversations))
    elapsed = time.perf_counter() - started
    generated = sum(o.tokens for o in outputs)
    return GenerateResult(
        outputs=outputs,
        engine="vllm",
        tokens_per_second=round(generated / elapsed, 1) if elapsed > 0 else 0.0,
        model=model_ref,
        adapter=adapter,
        server_id=server_id,
    )
