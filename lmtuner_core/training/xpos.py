"""xPos: rotary position embedding with an exponential decay, for Llama-family attention (hand-written).

No library provides xPos for transformers models, so this module writes it by hand, following Sun et al. 2022,
"A Length-Extrapolatable Transformer" (arXiv 2212.10554) and its reference code (torchscale's XPOS).

Formula. RoPE rotates each query/key dimension pair i (i = 0 … d/2−1, frequency θ_i = base^(−2i/d)) by the
angle n·θ_i at position n. xPos also scales that pair, by ζ_i^(n/B) on the query and ζ_i^(−m/B) on the key:

    ζ_i = (i / (d/2) + γ) / (1 + γ),   γ = 0.4,   B = scale_base = 512

so the attention score of a query at n and a key at m is the RoPE score with each pair's term multiplied by
ζ_i^((n−m)/B). It depends only on the distance n−m (like RoPE) and, since ζ_i < 1, it decays as the distance
grows, fastest for the high-frequency pairs (small i), whose rotations alias at long range. That decay is what
lets attention behave on sequences longer than the training context (the paper's length extrapolation).

Hook. transformers (5.x) lets a model use any attention function registered under a name
(`AttentionInterface`). Llama-family attention applies RoPE, updates the KV cache and then calls that function
with the rotated queries and keys, so xPos scales them there and hands over to SDPA. A pair's scale commutes
with its rotation (a rotation times a scalar), so scaling after RoPE equals the paper's order. Positions are
slot indices in the key sequence: a query is at slot kv_len − q_len + j. That is the true position in training
and in cached generation (the cache keeps unscaled keys, and every step rescales them), and in a left-padded
batch the pad offset is the same for query and key, so n − m — all the score depends on — is still right.
A StaticCache (slots beyond the filled length) and sliding-window caches are not supported.

Numerics: the scales are computed in float32. ζ_0^(n/512) falls to 1e-9 at n = 8192 and the key scale is its
inverse, which float32 and bfloat16 hold but float16 (max 65504) does not past about 4500 positions: train an
xPos model in bf16 or fp32.

Where it is recorded: the model config gets `lmtuner_xpos = {"gamma": 0.4, "scale_base": 512}`, which
save_pretrained writes into config.json; an adapter records it in lmtuner_artifact.json. lmtuner's loaders
(`model_setup.load_base_model`, `rope.apply_recorded_rope`) switch the attention back to xPos from that key.
Plain transformers loaders and vLLM do not know the key and would run the model with plain RoPE, so serving an
xPos model must be refused (`is_xpos_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtuner_core.errors import LmtunerError

CONFIG_KEY = "lmtuner_xpos"  # config attribute (and lmtuner_artifact.json key) holding the parameters
ATTENTION_NAME = "lmtuner_xpos"  # the name registered with transformers' AttentionInterface
GAMMA = 0.4
SCALE_BASE = 512
# Models whose attention applies full-width RoPE in the rotate_half layout and then calls the registered function.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def xpos_zeta(head_dim: int, gamma: float = GAMMA) -> Any:
    """ζ_i = (i/(d/2) + γ)/(1 + γ) for each of the head_dim/2 dimension pairs (float32 tensor)."""
    import torch

    i = torch.arange(head_dim // 2, dtype=torch.float32)
    return (i / (head_dim / 2) + gamma) / (1 + gamma)


def xpos_scales(positions: Any, head_dim: int, gamma: float = GAMMA, scale_base: float = SCALE_BASE) -> Any:
    """ζ^(n/B) per position n and dimension, shape (len(positions), head_dim), in Llama's rotate_half layout
    (dimension j and j + d/2 form pair j, so the d/2 pair scales repeat once)."""
    import torch

    zeta = xpos_zeta(head_dim, gamma).to(positions.device)
    scale = zeta[None, :] ** (positions.to(torch.float32)[:, None] / scale_base)
    return torch.cat((scale, scale), dim=-1)


def scale_query_key(query: Any, key: Any, gamma: float = GAMMA, scale_base: float = SCALE_BASE) -> tuple[Any, Any]:
    """Rotated (batch, heads, len, head_dim) queries and keys with the xPos scales applied: the keys sit at
    slots 0 … kv_len−1 and the queries at the last q_len of them."""
    import torch

    q_len, kv_len, head_dim = query.shape[-2], key.shape[-2], query.shape[-1]
    scales = xpos_scales(torch.arange(kv_len, device=query.device), head_dim, gamma, scale_base)
    scaled_query = (query.float() * scales[kv_len - q_len :]).to(query.dtype)
    scaled_key = (key.float() / scales).to(key.dtype)
    return scaled_query, scaled_key


def xpos_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """The registered attention function: xPos scales on the rotated queries and keys, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = getattr(module.config, CONFIG_KEY, None) or {}
    query, key = scale_query_key(query, key, params.get("gamma", GAMMA), params.get("scale_base", SCALE_BASE))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Makes ATTENTION_NAME known to transformers (attention and mask); safe to call again. Other models in the
    process are unaffected: only a config naming ATTENTION_NAME uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, xpos_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # xPos uses SDPA's causal/padding mask


def enable_xpos(model_config: Any, gamma: float = GAMMA, scale_base: float = SCALE_BASE) -> Any:
    """Records xPos in a transformers config (in place) and selects its attention; returns the config."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmtunerError(
            f"rope_scaling.type: 'xpos' is written for Llama-family attention ({', '.join(SUPPORTED_MODEL_TYPES)}) "
            f"and this model is {model_type!r}; use linear, dynamic, yarn, llama3 or ntk",
            field="rope_scaling.type",
        )
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if (model_config.rope_parameters or {}).get("partial_rotary_factor", 1.0) != 1.0 or head_dim % 2:
        raise LmtunerError(
            "rope_scaling.type: 'xpos' needs RoPE over the whole head dimension; this model rotates only part of it",
            field="rope_scaling.type",
        )
    setattr(model_config, CONFIG_KEY, {"gamma": gamma, "scale_base": scale_base})
    return restore_xpos(model_config)


def xpos_parameters(model_config: Any) -> dict | None:
    """The recorded xPos parameters of a config, or None when it has none."""
    return getattr(model_config, CONFIG_KEY, None) or None


def restore_xpos(model_config: Any) -> Any:
    """Selects the xPos attention for a config that records it (loading a saved xPos model); returns the config."""
    if xpos_parameters(model_config):
        register()
        model_config._attn_implementation = ATTENTION_NAME
    return model_config


def is_xpos_model(path: str | Path) -> bool:
    """Whether a model or adapter folder was trained with xPos (config.json or lmtuner_artifact.json says so).
    Engines that do not run lmtuner's attention (vLLM, plain transformers) must refuse such a model."""
    for name in ("config.json", "lmtuner_artifact.json"):
        file = Path(path, name)
        try:
            if file.is_file() and json.loads(file.read_text(encoding="utf-8")).get(CONFIG_KEY):
                return True
        except (OSError, ValueError):
            continue
    return False
