"""Secrets (tracker keys, hub tokens, our bearer token) stay out of tool output, logs and configs."""

from __future__ import annotations

import os
import re

# Environment variables whose values must never be echoed. The training process needs the tracker and hub
# credentials (so they stay in its environment); it never needs the server's bearer token.
SECRET_ENV_VARS = (
    "LMTUNER_TOKEN", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN",
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY",
)  # fmt: skip
SERVER_ONLY = ("LMTUNER_TOKEN",)
# Well-known token shapes, caught even when they come from somewhere other than our environment.
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|[0-9a-f]{40})\b")


def redact(text: str) -> str:
    """The text with every known secret value replaced by '***'."""
    if not text:
        return text
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return _TOKEN_SHAPES.sub("***", text)


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """The training process's environment: ours, without the server-only secrets, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ONLY}
    env.update(extra)
    return env
