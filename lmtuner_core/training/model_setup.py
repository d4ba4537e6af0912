"""Builders keyed by training method: load the base model and make the right parameters trainable.

Adding a method means one builder here, named by its MethodSpec in `methods.METHODS`; nothing branches on
the method's name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmtuner_core.config import TrainConfig
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.methods import METHODS
from lmtuner_core.stages import STAGES
from lmtuner_core.training.cpu_dropout import use_cpu_dropout


def resolve_precision(requested: str) -> tuple[str, torch.dtype]:
    """('bf16' | 'fp16' | 'fp32', compute dtype) for this machine; refuses what the hardware cannot do."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
        return "fp32", torch.float32
    if requested == "fp16" and not cuda:
        raise LmtunerError("precision: 'fp16' needs a CUDA GPU and this machine has none; use 'auto' or 'fp32'")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise LmtunerError("precision: this GPU has no bf16 support (compute capability < 8.0); use 'fp16' or 'auto'")
    return requested, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def resolve_liger(requested: bool | str) -> tuple[bool, str]:
    """(use Liger kernels, why) for this machine; refuses `true` where they cannot run."""
    import importlib.util

    if requested is False:
        return False, "off (liger: false)"
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU (Triton has no CPU driver)")
    if importlib.util.find_spec("liger_kernel") is None:
        missing.append("liger-kernel is not installed (pip install 'lmtuner[cuda]')")
    if not missing:
        return True, "on"
    if requested == "auto":
        return False, f"off (liger: auto; {' and '.join(missing)})"
    raise LmtunerError(f"liger: true cannot run here: {' and '.join(missing)}; use 'auto' or false", field="liger")


def quantization_config(config: TrainConfig, compute_dtype: torch.dtype) -> Any | None:
    """bitsandbytes settings for the quantized-base methods (QLoRA: NF4 with double quantization, the
    paper's recipe); None for the others."""
    base_quant = METHODS[config.method].memory.base_quant
    if base_quant is None:
        return None
    try:
        import bitsandbytes  # noqa: F401  (fail here, with a clear message, rather than deep in loading)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise LmtunerError(f"method: {config.method!r} needs bitsandbytes (pip install bitsandbytes)") from None
    if base_quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(config: TrainConfig, precision: str, compute_dtype: torch.dtype) -> nn.Module:
    """The causal LM in the dtype its method trains in: fp16 mixed precision keeps fp32 master weights;
    qlora / lora-8bit load a bitsandbytes-quantized base. A stage with a scalar head (reward) gets the same model as a
    sequence classifier with one output (a new head on the last token's hidden state)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmtuner_core.training.rope import apply_rope_scaling, attention_implementation

    full_weights = METHODS[config.method].full_weights
    dtype = torch.float32 if precision == "fp16" and full_weights else compute_dtype
    quantization = quantization_config(config, compute_dtype)
    extra: dict[str, Any] = {}
    if quantization is not None:
        # bitsandbytes places the quantized weights itself: on the one GPU, or on the CPU without one.
        extra = {"quantization_config": quantization, "device_map": {"": 0 if torch.cuda.is_available() else "cpu"}}
    try:
        model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        apply_rope_scaling(model_config, config.rope_scaling)
        attention = attention_implementation(model_config)  # SDPA, or xPos when the config has it
        if attention != "sdpa" and precision == "fp16":
            # xPos key scales grow up to 3.5^(n/512): float16 overflows past ~4500 positions (see xpos.py)
            raise LmtunerError("precision: xPos needs bf16 or fp32, not fp16; set precision 'fp32'", field="precision")
        if STAGES[config.stage].scalar_head:
            model_config.num_labels = 1  # one output: the reward
        auto = AutoModelForSequenceClassification if STAGES[config.stage].scalar_head else AutoModelForCausalLM
        return auto.from_pretrained(
            config.model,
            config=model_config,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
    except OSError as exc:
        raise LmtunerError(
            f"model: cannot load {shown(config.model)} ({exc}); give a local folder written by save_pretrained, or a "
            "hub id this machine can download or has cached"
        ) from None


def full(model: nn.Module, config: TrainConfig) -> nn.Module:
    model.requires_grad_(True)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model (layers, h, blocks, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LmtunerError("method 'freeze': cannot find the model's layer stack; use 'lora' or 'full'")
    return max(lists, key=len)


def freeze(model: nn.Module, config: TrainConfig) -> nn.Module:
    layers = decoder_layers(model)
    n = min(config.freeze_trainable_layers, len(layers))
    model.requires_grad_(False)
    for layer in list(layers)[-n:]:
        layer.requires_grad_(True)
    return model


def lora(model: nn.Module, config: TrainConfig, *, use_dora: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=use_dora,
        # A reward model's new head trains in full beside the adapters (peft keeps `score` in modules_to_save).
        task_type="SEQ_CLS" if STAGES[config.stage].scalar_head else "CAUSAL_LM",
        bias="none",
    )
    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise LmtunerError(f"lora.target_modules: {exc}; 'all-linear' works for every model") from None
    if config.gradient_checkpointing:
        wrapped.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if not torch.cuda.is_available():
        use_cpu_dropout(wrapped)  # the same dropout, its masks drawn 3x faster on the CPU
    return wrapped


def dora(model: nn.Module, config: TrainConfig) -> nn.Module:
    return lora(model, config, use_dora=True)


def quantized_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """LoRA on a 4-bit or 8-bit base: peft first casts norms and the head for stable k-bit training."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return lora(model, config)


def lomo(model: nn.Module, config: TrainConfig) -> nn.Module:
    """LOMO / AdaLomo update every weight inside the backward pass (lomo-optim, chosen through the Trainer's
    `optim`), so no gradient or optimizer state is kept for the whole model."""
    try:
        import lomo_optim  # noqa: F401
    except ImportError:
        raise LmtunerError(f"method: {config.method!r} needs lomo-optim (pip install lomo-optim)") from None
    return full(model, config)


def apply_method(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The model made trainable by its method's builder (`methods.METHODS`; the functions above)."""
    spec = METHODS[config.method]
    if spec.needs_cuda and not torch.cuda.is_available():
        raise LmtunerError(f"method: {config.method!r} needs a CUDA GPU ({spec.needs_cuda})", field="method")
    return spec.builder(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
