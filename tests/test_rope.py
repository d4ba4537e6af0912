"""RoPE scaling: each type changes the positions the way its formula says, trains on rows longer than the model's
context, and the trained artifact keeps it (xPos's own tests: test_xpos.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmtuner_core.config import RopeScaling, parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.training.rope import apply_rope_scaling
from tests.helpers import quick_config
from tools import training
from tools.context import ToolContext


def rotary(model_dir: Path, rope: RopeScaling | None):
    config = apply_rope_scaling(AutoConfig.from_pretrained(model_dir), rope)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config)
    return config, model


def test_linear_divides_every_frequency_by_the_factor(tiny_model):
    _, base = rotary(tiny_model, None)
    config, scaled = rotary(tiny_model, RopeScaling(type="linear", factor=4))
    assert config.max_position_embeddings == 4 * 2048
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 4)


def test_ntk_scales_theta_by_factor_to_the_d_over_d_minus_2(tiny_model):
    config, scaled = rotary(tiny_model, RopeScaling(type="ntk", factor=4))
    dim = config.head_dim  # 32 for the tiny model
    assert config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4 ** (dim / (dim - 2)))
    assert config.rope_parameters["rope_type"] == "default"
    expected = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, expected)


@pytest.mark.parametrize("kind", ["yarn", "llama3"])
def test_yarn_and_llama3_keep_high_frequencies_and_stretch_low_ones(tiny_model, kind):
    _, base = rotary(tiny_model, None)
    config, scaled = rotary(tiny_model, RopeScaling(type=kind, factor=4))
    assert config.rope_parameters["original_max_position_embeddings"] == 2048
    before, after = base.model.rotary_emb.inv_freq, scaled.model.rotary_emb.inv_freq
    assert after[0].item() == pytest.approx(before[0].item())  # the fastest rotation is untouched
    assert after[-1].item() == pytest.approx(before[-1].item() / 4, rel=1e-3)  # the slowest is interpolated


def test_dynamic_changes_nothing_inside_the_trained_context(tiny_model):
    _, base = rotary(tiny_model, None)
    config, scaled = rotary(tiny_model, RopeScaling(type="dynamic", factor=4))
    ids = torch.randint(0, 900, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, base(ids).logits)
    assert config.max_position_embeddings == 2048


def test_an_already_scaled_model_is_refused(tiny_model):
    config = apply_rope_scaling(AutoConfig.from_pretrained(tiny_model), RopeScaling(type="yarn", factor=2))
    with pytest.raises(LmtunerError, match="already uses 'yarn'"):
        apply_rope_scaling(config, RopeScaling(type="linear", factor=2))


def run(ctx, config):
    started = training.start_training(ctx, parse_train_config(config))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = training.job_status(ctx, started.job_id, wait_seconds=10)
        if status.status != "running":
            return status
    raise AssertionError("job did not finish")


def test_trained_artifacts_carry_the_scaling(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    rope = {"type": "yarn", "factor": 2.0}
    full = run(ctx, quick_config(tiny_model, data, max_steps=2, method="full", rope_scaling=rope))
    assert full.status == "completed", full.error
    saved = json.loads(Path(full.output_dir, "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn" and saved["max_position_embeddings"] == 4096


SHORT_CONTEXT = 64  # the model's trained context in the long-sequence tests
WORDS = ("the", "model", "reads", "a", "long", "story", "about", "rivers", "and", "mountains", "where", "each")


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory) -> Path:
    from lmtuner_core.training.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("short") / "tiny64", max_position_embeddings=SHORT_CONTEXT)


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory, short_context_model) -> Path:
    """Plain-text rows each longer than twice the model's context."""
    from transformers import AutoTokenizer

    rows = [" ".join(f"{WORDS[(i + r) % len(WORDS)]} {i}" for i in range(60)) for r in range(8)]
    tokenizer = AutoTokenizer.from_pretrained(short_context_model)
    assert min(len(tokenizer(row)["input_ids"]) for row in rows) > 2 * SHORT_CONTEXT + 20
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3", "ntk", "xpos"])
def test_each_type_trains_beyond_the_trained_context_and_generate_uses_its_positions(
    kind, short_context_model, long_rows, tmp_path, lmtuner_home
):
    from lmtuner_core.models import inference

    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, long_rows.parent, short_context_model]))
    config = quick_config(
        short_context_model, long_rows, max_steps=2, batch_size=2, max_seq_len=4 * SHORT_CONTEXT,
        rope_scaling={"type": kind, "factor": 4.0},
    )  # fmt: skip
    status = run(ctx, config)
    assert status.status == "completed", status.error
    records = [json.loads(line) for line in Path(status.run_dir, "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 2 and all(r["loss"] == r["loss"] for r in trained)  # finite, not NaN
    # 2 steps × 2 rows: every row was far longer than the model's trained context
    assert trained[-1]["tokens_seen"] > 4 * 2 * SHORT_CONTEXT
    log = Path(status.run_dir, "train.log").read_text()
    assert "liger kernels: off (liger: auto; no CUDA GPU" in log

    artifact = json.loads(Path(status.output_dir, "lmtuner_artifact.json").read_text())
    expected = apply_rope_scaling(AutoConfig.from_pretrained(short_context_model), RopeScaling(type=kind, factor=4))
    assert artifact["rope_parameters"] == expected.rope_parameters
    assert artifact["max_position_embeddings"] == expected.max_position_embeddings
    model, _ = inference._load(str(short_context_model), status.output_dir)  # what generate loads
    try:
        base = model.get_base_model()
        assert base.config.rope_parameters == expected.rope_parameters
        reference = AutoModelForCausalLM.from_pretrained(short_context_model, config=expected)
        torch.testing.assert_close(base.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
        assert (base.config._attn_implementation == "lmtuner_xpos") == (kind == "xpos")
        assert ("lmtuner_xpos" in artifact) == (kind == "xpos")
    finally:
        inference._LOADED.clear()


def test_liger_is_off_on_the_cpu_unless_asked_for_and_then_refused():
    from lmtuner_core.training.model_setup import resolve_liger

    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    assert resolve_liger(False) == (False, "off (liger: false)")
    on, why = resolve_liger("auto")
    assert not on and why.startswith("off (liger: auto; no CUDA GPU (Triton has no CPU driver)")
    with pytest.raises(LmtunerError, match=r"liger: true cannot run here: no CUDA GPU .*; use 'auto' or false"):
        resolve_liger(True)
    with pytest.raises(LmtunerError, match="liger"):
        parse_train_config({"model": "m", "dataset": "d.jsonl", "liger": "sometimes"})


def test_liger_true_on_the_cpu_is_refused_before_a_job_starts(tiny_model, tmp_path, lmtuner_home):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    with pytest.raises(LmtunerError, match=r"liger: true cannot run for a CPU job .*use 'auto'"):
        training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, liger=True)))
    assert not any((lmtuner_home / "runs").iterdir())  # no run folder, no process
