"""CPUDropout is nn.Dropout's distribution (keep with probability 1 - p, kept values scaled by 1 / (1 - p)), and a
LoRA job on the CPU uses it."""

from __future__ import annotations

import pytest
import torch

from lmtuner_core.config import parse_train_config
from lmtuner_core.training.cpu_dropout import CPUDropout, bernoulli_keep_mask
from lmtuner_core.training.model_setup import apply_method


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_kept_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep = bernoulli_keep_mask(torch.Size([1000, 4000]), p).float()
    # 4M draws: one standard deviation of the keep rate is at most 2.5e-4; each of the four 16-bit slices of a
    # 64-bit draw (element i % 4) must be unbiased too, the sign bit included.
    assert keep.mean().item() == pytest.approx(1 - p, abs=2e-3)
    for lane in range(4):
        assert keep.view(-1)[lane::4].mean().item() == pytest.approx(1 - p, abs=3e-3), lane


def test_forward_and_backward_scale_the_kept_elements_and_zero_the_rest():
    torch.manual_seed(1)
    dropout = CPUDropout(0.2).train()
    x = torch.randn(64, 96, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * 1.25)
    assert 0.7 < kept.float().mean().item() < 0.9
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() * 1.25)
    assert torch.equal(dropout.eval()(x), x)  # eval mode: identity


def test_seeded_runs_draw_the_same_masks():
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(bernoulli_keep_mask(torch.Size([33, 17]), 0.1))
    assert torch.equal(*masks)


def test_a_lora_model_on_the_cpu_drops_out_with_it(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    config = parse_train_config({
        "model": str(tiny_model), "dataset": str(tmp_path / "d.jsonl"), "method": "lora", "lora": {"dropout": 0.1},
    })  # fmt: skip
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    dropouts = [m for m in model.modules() if isinstance(m, CPUDropout)]
    assert dropouts and all(d.p == 0.1 for d in dropouts)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
