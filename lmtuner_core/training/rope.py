"""RoPE scaling: train (and later serve) a model beyond the context it was pre-trained on.

transformers implements the position formulas; this module only writes the model config that selects them
(`rope_parameters`, transformers 5.x). One function per type, found through ROPE_BUILDERS:
- linear  — position interpolation (Chen et al. 2023): positions divided by `factor`.
- dynamic — dynamic NTK: the base grows only once a sequence is longer than the trained context.
- yarn    — NTK-by-parts with attention temperature (Peng et al. 2023).
- llama3  — Llama 3.1's per-frequency-band scaling.
- ntk     — static NTK-aware scaling, which transformers has no type for: rope_theta × factor^(d/(d−2)), written
            here by hand (the formula from the "NTK-aware scaled RoPE" proposal, d = rotary dimension).
- xpos    — RoPE with an exponential decay (Sun et al. 2022), hand-written in `xpos` since no library has it;
            positions are not interpolated, the context limit grows by `factor`.
The trained artifact keeps the positions: a full model's config.json, an adapter's lmtuner_artifact.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtuner_core.config import RopeScaling
from lmtuner_core.errors import LmtunerError
from lmtuner_core.training.xpos import ATTENTION_NAME, CONFIG_KEY, enable_xpos, restore_xpos, xpos_parameters

RopeResult = tuple[dict[str, Any], int]  # (rope_parameters, max_position_embeddings)


def _linear(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    return {"rope_type": "linear", "rope_theta": theta, "factor": factor}, int(original * factor)


def _dynamic(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    # The dynamic rule compares sequence length with max_position_embeddings, so that stays the trained value.
    return {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}, original


def _yarn(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    parameters = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
    }
    return parameters, int(original * factor)


def _llama3(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    parameters = {
        "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": original,
    }  # fmt: skip
    return parameters, int(original * factor)


def _ntk(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    return {"rope_type": "default", "rope_theta": theta * factor ** (dim / (dim - 2))}, int(original * factor)


def _xpos(theta: float, factor: float, original: int, dim: int) -> RopeResult:
    # Plain RoPE frequencies; the decay lives in the attention (see xpos.py), selected by apply_rope_scaling.
    return {"rope_type": "default", "rope_theta": theta}, int(original * factor)


ROPE_BUILDERS: dict[str, Callable[[float, float, int, int], RopeResult]] = {
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "ntk": _ntk,
    "xpos": _xpos,
}


def scaled_rope(model_config: Any, rope: RopeScaling) -> RopeResult:
    """The rope_parameters and max_position_embeddings that extend `model_config` by rope.factor."""
    builder = ROPE_BUILDERS.get(rope.type)
    if builder is None:
        raise LmtunerError(
            f"rope_scaling.type: {rope.type!r} is not available yet; use one of {', '.join(ROPE_BUILDERS)}",
            field="rope_scaling.type",
        )
    current = dict(getattr(model_config, "rope_parameters", None) or {})
    already = "xpos" if xpos_parameters(model_config) else current.get("rope_type", "default")
    if already != "default":
        raise LmtunerError(
            f"rope_scaling: the model already uses {already!r} RoPE scaling; scaling it again is not "
            "supported — remove rope_scaling, or start from a model without scaling",
            field="rope_scaling",
        )
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    dim = int(head_dim * current.get("partial_rotary_factor", 1.0))
    theta = float(current.get("rope_theta", getattr(model_config, "rope_theta", 10000.0)))
    return builder(theta, rope.factor, int(model_config.max_position_embeddings), dim)


def apply_rope_scaling(model_config: Any, rope: RopeScaling | None) -> Any:
    """Writes the scaling into a transformers config (in place) and returns it."""
    if rope is None:
        return model_config
    parameters, max_positions = scaled_rope(model_config, rope)
    if rope.type == "xpos":
        enable_xpos(model_config)
    model_config.rope_parameters = parameters
    model_config.max_position_embeddings = max_positions
    return model_config


def attention_implementation(model_config: Any) -> str:
    """The attention a config loads with: xPos's when the config records it (registering it), else SDPA."""
    return ATTENTION_NAME if xpos_parameters(restore_xpos(model_config)) else "sdpa"


def recorded_positions(model_config: Any) -> dict[str, Any]:
    """What an adapter's lmtuner_artifact.json keeps of its base config so inference uses the same positions."""
    recorded = {
        "rope_parameters": model_config.rope_parameters,
        "max_position_embeddings": model_config.max_position_embeddings,
    }
    if xpos_parameters(model_config):
        recorded[CONFIG_KEY] = xpos_parameters(model_config)
    return recorded


def apply_recorded_rope(model_config: Any, adapter: str | Path) -> Any:
    """Gives a base config the positions an adapter was trained with, as recorded in its lmtuner_artifact.json
    (an adapter does not carry the base model's config)."""
    artifact = Path(adapter, "lmtuner_artifact.json")
    if artifact.is_file():
        recorded = json.loads(artifact.read_text(encoding="utf-8"))
        if recorded.get("rope_parameters"):
            model_config.rope_parameters = recorded["rope_parameters"]
            model_config.max_position_embeddings = recorded["max_position_embeddings"]
        if recorded.get(CONFIG_KEY):
            setattr(model_config, CONFIG_KEY, recorded[CONFIG_KEY])
    return restore_xpos(model_config)  # also for a full xPos model whose config.json records it
