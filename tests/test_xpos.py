"""xPos (hand-written, lmtuner_core/training/xpos.py): the scales follow the paper's formula, attention scores depend
on the distance and decay with it, cached generation and left padding see the same positions, a saved model
gets xPos back through lmtuner's loaders, and a model without xPos is untouched."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lmtuner_core.config import RopeScaling, parse_train_config
from lmtuner_core.errors import LmtunerError
from lmtuner_core.training import xpos
from lmtuner_core.training.model_setup import load_base_model
from lmtuner_core.training.rope import apply_recorded_rope, apply_rope_scaling, attention_implementation

HEAD_DIM = 32  # the tiny model's


def xpos_model(model_dir, factor=4.0):
    config = apply_rope_scaling(AutoConfig.from_pretrained(model_dir), RopeScaling(type="xpos", factor=factor))
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config).eval()


def test_scales_follow_the_formula():
    positions = torch.tensor([0, 1, 7, 512, 3000])
    scales = xpos.xpos_scales(positions, HEAD_DIM)
    assert scales.shape == (5, HEAD_DIM)
    for row, n in enumerate(positions.tolist()):
        for i in range(HEAD_DIM // 2):
            zeta = (i / (HEAD_DIM / 2) + 0.4) / (1 + 0.4)
            expected = zeta ** (n / 512)
            # rotate_half layout: dimensions i and i + d/2 are one rotating pair and share its scale
            assert scales[row, i].item() == pytest.approx(expected, rel=1e-5)
            assert scales[row, i + HEAD_DIM // 2].item() == pytest.approx(expected, rel=1e-5)
    assert scales[0].eq(1).all()  # position 0 is unscaled
    zeta = xpos.xpos_zeta(HEAD_DIM)
    assert zeta[0].item() == pytest.approx(0.4 / 1.4) and (zeta < 1).all() and (zeta.diff() > 0).all()


def rotated(vector, length):
    """`vector` placed at positions 0..length-1 and rotated by the tiny model's RoPE: (1, 1, length, d)."""
    config = AutoConfig.for_model("llama", hidden_size=128, num_attention_heads=4, max_position_embeddings=64)
    cos, sin = LlamaRotaryEmbedding(config)(vector, torch.arange(length)[None])
    states = vector.expand(1, 1, length, HEAD_DIM)
    return apply_rotary_pos_emb(states, states, cos, sin)[0]


def test_scores_depend_only_on_distance_and_decay_as_the_paper_says():
    torch.manual_seed(0)
    length = 1500
    q, k = rotated(torch.randn(HEAD_DIM), length), rotated(torch.randn(HEAD_DIM), length)
    q, k = xpos.scale_query_key(q.double(), k.double())
    scores = (q @ k.transpose(-1, -2))[0, 0]
    for n, m, shift in [(10, 3, 100), (700, 200, 600), (1000, 0, 499)]:
        # equal up to float32 rotary angles (transformers computes them in float32)
        assert scores[n + shift, m + shift].item() == pytest.approx(scores[n, m].item(), rel=1e-4)

    # One rotating pair: the score is RoPE's cos(δθ) times ζ^(δ/512), so its amplitude (with the key turned 90°
    # for the sine part) is exactly ζ^(δ/512), falling with the distance δ.
    pair = 0
    unit = torch.zeros(HEAD_DIM, dtype=torch.float64)
    unit[pair] = 1.0
    turned = torch.zeros(HEAD_DIM, dtype=torch.float64)
    turned[pair + HEAD_DIM // 2] = 1.0
    query, key_cos = xpos.scale_query_key(rotated(unit, length), rotated(unit, length))
    _, key_sin = xpos.scale_query_key(rotated(unit, length), rotated(turned, length))
    n = length - 1
    amplitude = torch.hypot(query[0, 0, n] @ key_cos[0, 0].T, query[0, 0, n] @ key_sin[0, 0].T).flip(0)
    distances = torch.arange(length, dtype=torch.float64)
    expected = xpos.xpos_zeta(HEAD_DIM).double()[pair] ** (distances / 512)
    torch.testing.assert_close(amplitude, expected, rtol=1e-5, atol=0)
    assert (amplitude.diff() < 0).all()


def test_cached_generation_and_left_padding_see_the_same_positions(tiny_model):
    model = xpos_model(tiny_model)
    ids = torch.randint(5, 900, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        cached = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[0, -1]
        padded = torch.cat([torch.zeros(1, 30, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 30, dtype=torch.long), torch.ones_like(ids)], dim=1)
        left_padded = model(padded, attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(left_padded, full, rtol=1e-4, atol=1e-4)


def test_xpos_changes_long_range_attention_and_nothing_else_changes(tiny_model):
    ids = torch.randint(5, 900, (1, 200), generator=torch.Generator().manual_seed(2))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    with torch.no_grad():
        before = plain(ids).logits
        with_xpos = xpos_model(tiny_model)(ids).logits
    assert (with_xpos - before).abs().max() > 1e-4  # the decay is really applied

    # xPos registered in this process: a model without it loads with SDPA and computes exactly what it did.
    config = parse_train_config({"model": str(tiny_model), "dataset": "unused.jsonl"})
    ours = load_base_model(config, "fp32", torch.float32).eval()
    assert ours.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, before, rtol=0, atol=0)


def test_a_saved_xpos_model_gets_xpos_back_from_our_loaders(tiny_model, tmp_path):
    ids = torch.randint(5, 900, (1, 120), generator=torch.Generator().manual_seed(3))
    model = xpos_model(tiny_model)
    model.save_pretrained(tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["lmtuner_xpos"] == {"gamma": 0.4, "scale_base": 512} and saved["max_position_embeddings"] == 8192
    assert xpos.is_xpos_model(tmp_path / "full") and not xpos.is_xpos_model(tiny_model)
    assert attention_implementation(AutoConfig.from_pretrained(tiny_model)) == "sdpa"

    config = parse_train_config({"model": str(tmp_path / "full"), "dataset": "unused.jsonl"})
    reloaded = load_base_model(config, "fp32", torch.float32).eval()  # what a job training on it loads
    assert reloaded.config._attn_implementation == xpos.ATTENTION_NAME
    restored = apply_recorded_rope(AutoConfig.from_pretrained(tmp_path / "full"), tmp_path / "full")
    assert restored._attn_implementation == xpos.ATTENTION_NAME
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)

    with pytest.raises(LmtunerError, match="already uses 'xpos'"):
        apply_rope_scaling(AutoConfig.from_pretrained(tmp_path / "full"), RopeScaling(type="linear", factor=2))


def test_engines_keep_or_refuse_xpos_for_a_full_model(tiny_model, tmp_path):
    from lmtuner_core.models.inference import _load
    from lmtuner_core.models.serving import ServerService
    from lmtuner_core.paths import AllowedRoots

    xpos_model(tiny_model).save_pretrained(tmp_path / "full")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "full")
    model, _ = _load(str(tmp_path / "full"), None)  # what generate/evaluate load
    assert model.config._attn_implementation == xpos.ATTENTION_NAME
    (tmp_path / "home").mkdir()
    service = ServerService(tmp_path / "home", AllowedRoots([tmp_path]))
    with pytest.raises(LmtunerError, match="xPos"):  # vLLM would silently use plain RoPE
        service.start(str(tmp_path / "full"))


def test_xpos_is_refused_for_attention_it_was_not_written_for():
    with pytest.raises(LmtunerError, match=r"rope_scaling.type: 'xpos' is written for Llama-family .* 'gpt2'"):
        apply_rope_scaling(GPT2Config(), RopeScaling(type="xpos", factor=2))
