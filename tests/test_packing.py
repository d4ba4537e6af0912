"""Padding-free batches (issue #4 part 5, issue #8): flattened rows never see each other, and train the same tokens.

Exactness is checked on the real model and attention (lmtuner's varlen SDPA, transformers' SDPA and eager on CPU,
transformers 5.2x): a row's logits alone equal its logits inside a flattened batch, and so do the gradients. Token
accounting is checked through the recipe's own dataloader and through real jobs started with start_training, whose
losses match padded batches step by step.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.datasets import FlatRowsCollator
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.run import RunDir
from tests.helpers import quick_config
from tests.test_training_formats import run_job
from tools.context import ToolContext

ALPACA = "llamafactory/alpaca_en_demo.json"


ATTENTIONS = ["lmtuner_varlen_sdpa", "sdpa", "eager"]


def _flat_batch(rows: list[list[int]]) -> dict:
    return FlatRowsCollator()([{"input_ids": ids} for ids in rows])


def _model(tiny_model: Path, attention: str):
    from transformers import AutoModelForCausalLM

    from lmtuner_core.training import varlen

    varlen.register()
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_flattened_rows_do_not_attend_to_each_other(tiny_model, attention):
    model = _model(tiny_model, attention)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 900, (n,), generator=generator).tolist() for n in (37, 11, 52, 1, 23)]
    batch = _flat_batch(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, rows)))
    assert batch["cu_seq_lens_q"].tolist() == [0, 37, 48, 100, 101, 124]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False as in training (the recipe sets it): with a KV cache transformers does not look for packing.
    with torch.no_grad():
        flat = model(**inputs, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    offset = 0
    for row, logits in zip(rows, alone, strict=True):
        inside = flat[offset : offset + len(row)]
        assert torch.allclose(inside, logits, atol=1e-5, rtol=0), (attention, (inside - logits).abs().max().item())
        offset += len(row)
    # Without the collator's row bounds, the restarting position ids alone keep the rows apart.
    with torch.no_grad():
        bare = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert torch.allclose(bare, flat, atol=1e-5, rtol=0)
    # The control: the same tokens as one causal sequence (no restart) do differ, so the check can fail.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"][:, :100], use_cache=False).logits[0, 37:48]
    assert not torch.allclose(leaky, alone[1], atol=1e-3)
    # Labels: the first token of each row is never learned, every other token is.
    labels = batch["labels"]
    assert (labels[batch["position_ids"] == 0] == -100).all()
    assert int((labels != -100).sum()) == sum(len(r) - 1 for r in rows)


def test_varlen_gradients_equal_padded_batch(tiny_model):
    """The training signal, not only the forward: the summed loss of a flattened batch under lmtuner's varlen SDPA
    and of the same rows padded under SDPA give the same loss and the same gradient on every weight."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(5, 900, (n,), generator=generator).tolist() for n in (40, 9, 64, 17)]
    results = {}
    for attention in ("lmtuner_varlen_sdpa", "sdpa"):
        model = _model(tiny_model, attention).train()
        if attention == "sdpa":
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = torch.where(mask.bool(), ids, -100)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            batch = _flat_batch(rows)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attention] = (loss.item(), grads)
    (flat_loss, flat_grads), (padded_loss, padded_grads) = results["lmtuner_varlen_sdpa"], results["sdpa"]
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)
    assert flat_grads.keys() == padded_grads.keys() and len(flat_grads) > 10
    for name, grad in flat_grads.items():
        assert torch.allclose(grad, padded_grads[name], atol=1e-5, rtol=1e-4), name


def test_label_logits_answer_the_fused_head_as_trl_does(tiny_model):
    """On the CPU a flattened batch's fused-head call is answered from the label positions' logits only
    (`label_logits`): the same per-token log-probabilities, entropy, top-1 flags, loss and gradients as TRL's head."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from lmtuner_core.training import label_logits

    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(5, 900, (n,), generator=generator).tolist() for n in (40, 9, 64, 17)]
    batch = FlatRowsCollator()([
        {"input_ids": ids, "assistant_masks": [int(i >= len(ids) // 2) for i in range(len(ids))]} for ids in rows
    ])  # fmt: skip
    results = []
    for installed in (False, True):
        torch.manual_seed(0)
        model = _model(tiny_model, "lmtuner_varlen_sdpa").train()
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        if installed:
            assert label_logits.install(model)
        outputs = model(**batch, fused_lm_head=True, use_cache=False)  # as SFTTrainer.compute_loss calls it
        outputs.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((outputs, grads))
    (trl, trl_grads), (ours, our_grads) = results
    assert int(ours.label_mask.sum()) == sum(len(r) - len(r) // 2 for r in rows)  # the assistant halves
    assert torch.equal(ours.label_mask, trl.label_mask)
    for field in ("log_probs", "entropy"):
        assert torch.allclose(getattr(ours, field), getattr(trl, field), atol=1e-5), field
    assert torch.equal(ours.is_top1, trl.is_top1)
    assert ours.loss.item() == pytest.approx(trl.loss.item(), rel=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) == 8  # A and B of q, v in 2 layers
    for name, grad in our_grads.items():
        assert torch.allclose(grad, trl_grads[name], atol=1e-6, rtol=1e-4), name


def test_varlen_attention_is_chosen_only_where_it_is_exact(tiny_model):
    from transformers import AutoConfig

    from lmtuner_core.training.varlen import supports_varlen

    config = AutoConfig.from_pretrained(tiny_model)
    config._attn_implementation = "sdpa"
    assert supports_varlen(config)
    config._attn_implementation = "eager"
    assert not supports_varlen(config)  # eager was asked for by name: keep it
    config._attn_implementation = "sdpa"
    config.sliding_window = 64
    assert not supports_varlen(config)  # a sliding window is expressed only by a mask
    config.sliding_window = None
    config.attn_logit_softcapping = 50.0
    assert not supports_varlen(config)


def _dataloader_counts(model: Path, dataset: dict, tmp_path: Path, **overrides) -> dict:
    """Builds the recipe's trainer (no training) and counts what one epoch of its dataloader feeds the model."""
    from lmtuner_core.jobs.run_folder import StateFile
    from lmtuner_core.training.recipe import SFTRecipe

    config = parse_train_config(quick_config(model, dataset, num_epochs=1, max_steps=None, **overrides))
    run = RunDir(tmp_path / f"run-{overrides.get('packing')}")
    run.root.mkdir()
    recipe = SFTRecipe(config, run, StateFile(run), threading.Event())
    recipe.setup()
    assert recipe.model.config.use_cache is False  # packed rows are told apart only without a KV cache
    assert recipe.model.config._attn_implementation == ("lmtuner_varlen_sdpa" if overrides["packing"] else "sdpa")
    pad = recipe.tokenizer.pad_token_id
    counts = {"batches": 0, "trained": 0, "real": 0, "positions": 0, "packed": recipe.packing, "widest": 0}
    for batch in recipe.trainer.get_train_dataloader():
        counts["batches"] += 1
        counts["widest"] = max(counts["widest"], batch["input_ids"].numel())
        labels = batch["labels"]
        # The model shifts labels by one: position 0 of a row is never a target.
        counts["trained"] += int((labels[:, 1:] != -100).sum())
        counts["real"] += int((batch["input_ids"] != pad).sum())
        counts["positions"] += batch["input_ids"].numel()
        if "attention_mask" in batch:
            assert int(batch["attention_mask"].sum()) == int((batch["input_ids"] != pad).sum())
    counts["expected_real"] = sum(len(ids) for ids in recipe.train_dataset["input_ids"])
    return counts


@pytest.mark.parametrize("source", ["alpaca", "text"])
def test_packing_keeps_every_trained_token(source, tiny_model, shared_data, lmtuner_home, tmp_path):
    # Lengths at which most rows fit several to a pack and a few are cut.
    if source == "alpaca":
        dataset, max_len = {"path": str(shared_data / ALPACA), "max_rows": 48}, 512
    else:
        dataset, max_len = {"path": str(shared_data / "llamafactory/c4_demo.jsonl"), "max_rows": 24}, 2048
    packed = _dataloader_counts(tiny_model, dataset, tmp_path, packing=True, max_seq_len=max_len)
    unpacked = _dataloader_counts(tiny_model, dataset, tmp_path, packing=False, max_seq_len=max_len)
    assert packed["packed"] and not unpacked["packed"]
    assert packed["trained"] == unpacked["trained"] > 0  # assistant-only masks survive packing
    assert packed["real"] == unpacked["real"] == unpacked["expected_real"]
    assert packed["positions"] == packed["expected_real"] < unpacked["positions"]  # no padding computed at all
    assert packed["batches"] == unpacked["batches"]  # batch_size still counts rows
    assert packed["widest"] <= unpacked["widest"]  # a step never holds more positions than the padded one


def test_job_with_packing_trains_like_padded_batches(tiny_model, shared_data, lmtuner_home, tmp_path):
    """Two real jobs through start_training on the same rows and seed, padding-free and padded: the same tokens,
    the same steps and the same loss at every step (LoRA dropout off, so no random mask depends on the layout)."""
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([shared_data, tiny_model, tmp_path]))
    dataset = {"path": str(shared_data / ALPACA), "max_rows": 40}
    runs = {}
    for packing in (True, False):
        config = quick_config(
            tiny_model, dataset, num_epochs=1, max_steps=None, max_seq_len=512, packing=packing,
            group_by_length=False, lora={"dropout": 0.0},
        )  # fmt: skip
        status = run_job(ctx, config)
        assert status.status == "completed", status
        records = [json.loads(line) for line in Path(status.run_dir, "metrics.jsonl").read_text().splitlines()]
        runs[packing] = [r for r in records if "loss" in r]
    packed, padded = runs[True], runs[False]
    assert [r["step"] for r in packed] == [r["step"] for r in padded] and len(packed) >= 5
    assert packed[-1]["tokens_seen"] == padded[-1]["tokens_seen"] > 0  # real tokens: padding is never counted
    for a, b in zip(packed, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-3), (a, b)


def test_tokenization_is_cached_by_rows_tokenizer_and_template(tiny_model, shared_data, tmp_path):
    from transformers import AutoTokenizer

    from lmtuner_core.config import DatasetSpec
    from lmtuner_core.data.datasets import load_examples, tokenize_cached

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = load_examples(DatasetSpec(path=str(shared_data / ALPACA), max_rows=20), AllowedRoots(None)).examples
    cache = tmp_path / "cache"
    first, hit_first = tokenize_cached(rows, tokenizer, cache)
    again, hit_again = tokenize_cached(rows, tokenizer, cache)
    assert (hit_first, hit_again) == (False, True)
    assert again["input_ids"] == first["input_ids"] and again["assistant_masks"] == first["assistant_masks"]
    # Anything the tokens depend on misses: other rows, the loss masking, the chat template.
    assert not tokenize_cached(rows[:-1], tokenizer, cache)[1]
    assert not tokenize_cached(rows, tokenizer, cache, assistant_only=False)[1]
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed, hit = tokenize_cached(rows, tokenizer, cache)
    assert not hit and changed["input_ids"] != first["input_ids"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn (flash) runs only on CUDA")
def test_varlen_flash_path_on_cuda_equals_rows_alone():
    """On CUDA in bf16 the whole flattened batch goes to torch's varlen_attn in one call; it must give each row what
    causal SDPA gives the row alone (GQA heads included)."""
    from lmtuner_core.training.varlen import varlen_attention

    class Module:
        is_causal = True

    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 1, 300, 64]
    total = sum(lengths)
    query = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    bounds = torch.tensor([0, 37, 38, 338, 402], device="cuda", dtype=torch.int32)
    out, _ = varlen_attention(Module(), query, key, value, None, scaling=0.125, cu_seq_lens_q=bounds)
    assert out.shape == (1, total, 8, 64)
    start = 0
    for length in lengths:
        q, k, v = (t[:, :, start : start + length] for t in (query, key, value))
        alone = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
        assert torch.allclose(out[:, start : start + length], alone.transpose(1, 2), atol=2e-2, rtol=0)
        start += length
