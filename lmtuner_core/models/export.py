"""merge_adapter: fold a LoRA-family adapter into its base and save a plain Hugging Face model, the form
vLLM, llama.cpp converters and every other tool can load without peft."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError


class MergeResult(BaseModel):
    output_dir: str = Field(description="The merged model folder (config.json, safetensors, tokenizer).")
    size_bytes: int = Field(description="Total size of the files written.")
    base_model: str = Field(description="The base the adapter was merged into.")
    model_card: str | None = Field(
        None, description="README.md in output_dir: the Hugging Face model card (training, evaluation, how to run it)."
    )


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def merge_adapter(model_ref: str, adapter: Path, output_dir: Path, *, trust_remote_code: bool = False) -> MergeResult:
    """Loads the base in full precision (merging into 4/8-bit weights would lose the update), applies the
    adapter, merges, and saves with the adapter's tokenizer and any recorded RoPE scaling."""
    import torch
    import transformers
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmtuner_core.training.rope import apply_recorded_rope

    transformers.utils.logging.disable_progress_bar()
    if output_dir.exists() and any(output_dir.iterdir()):
        raise LmtunerError(f"output_dir: {output_dir} already holds files; choose an empty or new folder")
    try:
        PeftConfig.from_pretrained(str(adapter))
    except ValueError as exc:
        raise LmtunerError(f"adapter: {adapter} is not a PEFT adapter ({exc})", field="adapter") from None
    trust = {"trust_remote_code": trust_remote_code}
    config = apply_recorded_rope(AutoConfig.from_pretrained(model_ref, **trust), adapter)
    base = AutoModelForCausalLM.from_pretrained(model_ref, config=config, dtype=torch.float32, **trust)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir))
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else model_ref
    AutoTokenizer.from_pretrained(str(tokenizer_source), **trust).save_pretrained(str(output_dir))
    return MergeResult(output_dir=str(output_dir), size_bytes=folder_size(output_dir), base_model=model_ref)
