"""Every training method through start_training on the tiny model: it completes, the loss falls, and the
artifact loads the way its users will load it."""

from __future__ import annotations

import time
import typing

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots
from tests.helpers import quick_config, read_losses
from tools import training
from tools.context import ToolContext

METHODS = {
    # method: (config overrides, how the artifact loads)
    "lora": ({"method": "lora"}, "adapter"),
    "dora": ({"method": "dora"}, "adapter"),
    "qlora": ({"method": "qlora"}, "adapter-4bit"),
    "lora-8bit": ({"method": "lora-8bit"}, "adapter-8bit"),
    "freeze": ({"method": "freeze", "freeze_trainable_layers": 1, "learning_rate": 1e-3}, "full"),
    "lomo": ({"method": "lomo", "learning_rate": 1e-2}, "full"),
    "full-adamw-8bit": ({"method": "full", "optimizer": "adamw-8bit", "learning_rate": 1e-3}, "full"),
}


def test_every_registered_method_has_a_builder_a_memory_profile_and_a_training_test():
    """Adding a method is one MethodSpec and its builder: the planner, the checks and the recipe read the
    registry, so a method missing any part fails here rather than at a user's first job."""
    from lmtuner_core.config import Method
    from lmtuner_core.methods import METHODS as REGISTRY
    from lmtuner_core.planning.memory import estimate_memory, shape_from_config
    from lmtuner_core.training import model_setup

    shape = shape_from_config({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 1000, "max_position_embeddings": 512})  # fmt: skip
    trained_here = {overrides["method"] for overrides, _ in METHODS.values()}
    assert set(typing.get_args(Method)) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        builder = spec.builder.resolve() if hasattr(spec.builder, "resolve") else spec.builder  # lazy: resolved
        assert callable(builder) and builder.__module__ == model_setup.__name__, f"{name}: no builder {builder!r}"
        estimate = estimate_memory(shape, method=name, precision="fp32", batch_size=1, seq_len=64, on_gpu=False)
        assert estimate.weights_gib > 0 and estimate.per_gpu_gib > estimate.weights_gib, name
        assert name in trained_here or spec.needs_cuda, f"{name} trains in no test (CUDA-only ones are refused below)"


def run(ctx: ToolContext, config: dict):
    started = training.start_training(ctx, parse_train_config(config))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = training.job_status(ctx, started.job_id, wait_seconds=10, log_lines=40)
        if status.status != "running":
            return status
    raise AssertionError("job did not finish")


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_its_artifact_loads(name, tiny_model, tmp_path, lmtuner_home):
    overrides, kind = METHODS[name]
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    final = run(ctx, quick_config(tiny_model, data, max_steps=8, **overrides))
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    losses = read_losses(final.run_dir)
    assert len(losses) == 8 and losses[-1] < losses[0], losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = logits(base, tokenizer)
    if kind == "full":
        tuned = AutoModelForCausalLM.from_pretrained(final.output_dir)
    else:
        from peft import PeftConfig, PeftModel
        from transformers import BitsAndBytesConfig

        peft_config = PeftConfig.from_pretrained(final.output_dir)
        assert peft_config.use_dora == (name == "dora")
        if kind == "adapter-4bit":
            quant = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, device_map="cpu")
            assert any("4bit" in type(m).__name__ for m in base.modules())
        elif kind == "adapter-8bit":
            base = AutoModelForCausalLM.from_pretrained(
                tiny_model, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
            )
        tuned = PeftModel.from_pretrained(base, final.output_dir)
    assert (logits(tuned, tokenizer) - before).abs().max() > 1e-3


def test_adalomo_on_a_machine_without_cuda_is_refused_with_the_alternative(tiny_model, tmp_path, lmtuner_home):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: adalomo is allowed")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    with pytest.raises(LmtunerError, match=r"adalomo.*needs a CUDA GPU.*use 'lomo'"):
        training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, method="adalomo")))
