"""What a `model` argument names: a local Hugging Face folder, a .gguf file (converted once), or a hub id (which
must be in the cache when downloads are off). Every tool that takes a model resolves it here."""

from __future__ import annotations

import re
from pathlib import Path

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.models.gguf_import import converted_folder, find_gguf
from lmtuner_core.models.model_code import check_model_code
from lmtuner_core.paths import AllowedRoots

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(value: str, roots: AllowedRoots, field: str = "model", *, trust_remote_code: bool | None) -> str:
    """A local model folder (absolute path returned), a hub id (returned as is), or a `.gguf` file (or a folder
    holding exactly one), returned as the Hugging Face folder it is converted into once (see gguf_import).
    Every tool that loads the model passes its trust_remote_code: a folder whose loading would run code of its own
    is refused here unless it is true (check_model_code). None only for callers that read config.json and load the
    tokenizer with trust_remote_code=False, where transformers refuses code by itself (propose_config,
    analyze_dataset)."""
    local = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
    if not local:
        if HUB_ID.match(value) and ".." not in value:
            check_hub_cache(value, field)
            return value
        raise LmtunerError(
            f"{field}: {shown(value)} is neither an existing folder, a .gguf file nor a hub id like "
            "'Qwen/Qwen2.5-0.5B-Instruct'",
            field=field,
        )
    path = roots.resolve(value, field)
    gguf_file = find_gguf(path, field)
    if gguf_file is not None:
        return str(converted_folder(gguf_file, field))  # written by us from tensors and metadata: no code
    if not path.is_dir():
        raise LmtunerError(f"{field}: folder {shown(value)} not found (resolved to {shown(str(path))})", field=field)
    if not (path / "config.json").is_file():
        raise LmtunerError(
            f"{field}: folder {path} has no config.json, so it is not a Hugging Face model folder; point to the "
            "folder that save_pretrained wrote (config.json + weights) or a .gguf file, e.g. a folder made by "
            "`lmtuner make-tiny-model DIR`",
            field=field,
        )
    if trust_remote_code is not None:
        check_model_code(path, roots, trust_remote_code, field)
    return str(path)


def check_hub_cache(repo_id: str, field: str = "model") -> None:
    """With downloads off (HF_HUB_OFFLINE), a hub id must already be in the Hugging Face cache, where
    transformers finds it by itself; refused here, before any process is spent on it, when it is not."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    raise LmtunerError(
        f"{field}: {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and downloads are off "
        f"(HF_HUB_OFFLINE); download it where the hub is reachable (`hf download {repo_id}`) into that cache, or "
        "give a local model folder (config.json + weights) or a .gguf file instead",
        field=field,
    )
