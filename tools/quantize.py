"""quantize: a smaller copy of a model (or of base + adapter) for serving: bitsandbytes NF4/int8 or GPTQ W4A16."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lmtuner_core.config import DatasetSpec, dataset_spec
from lmtuner_core.errors import LmtunerError, remote_code_explained, shown
from lmtuner_core.models.export import folder_size
from lmtuner_core.models.quantize import (
    BUILTIN_CALIBRATION_TEXTS,
    GROUP_SIZES,
    METHODS,
    Method,
    QuantizeResult,
)
from lmtuner_core.models.quantize import quantize as run_quantize
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.report.model_card import export_card
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext, TrustRemoteCode


def _calibration_texts(ctx: ToolContext, dataset: str | DatasetSpec, model: str, limit: int) -> tuple[list[str], str]:
    """Up to `limit` rows of the user's dataset as plain text, conversations rendered with the model's chat template
    (the text the quantized model will see when served)."""
    from transformers import AutoTokenizer

    from lmtuner_core.data.datasets import load_examples
    from lmtuner_core.data.template_bounds import bound_chat_templates

    bound_chat_templates()
    spec = dataset_spec(dataset)
    loaded = load_examples(spec.model_copy(update={"max_rows": limit}), ctx.roots)
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = []
    for example in loaded.examples[:limit]:
        if "text" in example:
            texts.append(example["text"])
        elif getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=False))
        else:
            texts.append("\n".join(m["content"] for m in example["messages"]))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmtunerError(f"dataset: {spec.path} has no non-empty rows to calibrate on", field="dataset")
    return texts, f"{len(texts)} rows of {spec.path}"


def quantize(
    ctx: ToolContext,
    model: Annotated[
        str,
        Field(
            description="The model to quantize: local folder or hub id (the base when `adapter` is given). "
            "Example: './models/tiny'."
        ),
    ],
    method: Annotated[
        Method,
        Field(
            description="'bnb-nf4' (4-bit NormalFloat, double quant; reload with transformers + bitsandbytes), "
            "'bnb-int8' (LLM.int8), or 'gptq-w4a16' (GPTQ 4-bit weights in compressed-tensors format, which "
            "`vllm serve` / serve_model loads). Example: 'gptq-w4a16'."
        ),
    ],
    output_dir: Annotated[
        str, Field(description="A new or empty folder for the quantized model. Example: 'models/tiny-nf4'.")
    ],
    adapter: Annotated[
        str | None,
        Field(
            description="A trained adapter (a LoRA-family job's output_dir) to merge into `model` before quantizing."
        ),
    ] = None,
    dataset: Annotated[
        str | DatasetSpec | None,
        Field(
            description="gptq-w4a16 only: calibration rows, ideally the data the model was tuned on (a path or "
            "DatasetSpec, like start_training's). Default: a small built-in English sample. "
            "Example: 'data/train.jsonl'."
        ),
    ] = None,
    calibration_samples: Annotated[
        int, Field(ge=1, le=2048, description="gptq-w4a16: most rows of `dataset` to calibrate on. Example: 128.")
    ] = 128,
    group_size: Annotated[
        int | None,
        Field(
            description=f"gptq-w4a16: input features per quantization group, one of {', '.join(map(str, GROUP_SIZES))}"
            ". Default: the largest that divides every layer (128 for most models)."
        ),
    ] = None,
    max_seq_len: Annotated[
        int, Field(ge=8, le=32768, description="gptq-w4a16: calibration rows are cut to this many tokens.")
    ] = 512,
    trust_remote_code: TrustRemoteCode = False,
    progress: ProgressFn | None = None,
) -> QuantizeResult:
    """Quantize a model for smaller, faster serving, merging a fine-tuned adapter first when one is given. Writes a
    new folder with the tokenizer and reports its size against the full-precision source. bnb-nf4 / bnb-int8 are
    quick and reload with transformers; gptq-w4a16 calibrates on sample rows (minutes on a GPU for a 7B model) and
    gives a folder vLLM serves. Takes disk space for the output and, with an adapter, a temporary merged copy."""
    if method not in METHODS:  # the schema already limits it; direct (CLI, script) callers get the same message
        raise LmtunerError(f"method: {shown(method)} is not supported; use one of {', '.join(METHODS)}", field="method")
    adapter_path = ctx.adapter_folder(adapter, trust_remote_code) if adapter else None
    output = ctx.output_folder(output_dir)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    texts = source = None
    if dataset is not None:
        if method != "gptq-w4a16":
            raise LmtunerError(
                f"dataset: only gptq-w4a16 calibrates on data; leave it out for {method}", field="dataset"
            )
        has_tokenizer = adapter_path is not None and (adapter_path / "tokenizer_config.json").is_file()
        texts, source = _calibration_texts(ctx, dataset, str(adapter_path if has_tokenizer else model_ref),
                                           calibration_samples)  # fmt: skip
    elif method == "gptq-w4a16":
        texts = list(BUILTIN_CALIBRATION_TEXTS[:calibration_samples])
        source = f"{len(texts)} built-in sample texts"
    with remote_code_explained(model_ref, "quantize"):
        result = run_quantize(
            model_ref, method, output, adapter=adapter_path, calibration_texts=texts, calibration_source=source,
            group_size=group_size, max_seq_len=max_seq_len, trust_remote_code=trust_remote_code, progress=progress,
        )  # fmt: skip
    what = f"a {method} quantized model ({result.format}; loads with {result.loads_with})" + (
        ", with its fine-tuned adapter merged in before quantizing" if adapter_path else ""
    )
    result.model_card = str(export_card(output, model_ref, adapter_path, what=what, tags=[method, "quantized"]))
    result.size_bytes = folder_size(output)  # the card is one of the files written
    if result.source_size_bytes:
        result.ratio = round(result.size_bytes / result.source_size_bytes, 4)
    return result
