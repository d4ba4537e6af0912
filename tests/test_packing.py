"""Packing (issue #4 part 5, issue #8): packed rows never see each other, and packing trains the same tokens.

Exactness is checked on the real model and attention (SDPA and eager on CPU, transformers 5.2x): a row's logits
alone equal its logits inside a pack. Token accounting is checked through the recipe's own dataloader and through a
real job started with start_training.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from lmtuner_core.config import parse_train_config
from lmtuner_core.data import PackedRowsCollator
from lmtuner_core.paths import AllowedRoots, RunDir
from tests.helpers import quick_config
from tests.test_training_formats import run_job
from tools.context import ToolContext

ALPACA = "llamafactory/alpaca_en_demo.json"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(tiny_model, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 900, (n,), generator=generator).tolist() for n in (37, 11, 52, 5, 23)]
    # Two packs of different lengths, so the shorter is padded in the batch as it is in training.
    packs = [rows[0] + rows[1] + rows[2], rows[3] + rows[4]]
    seq_lengths = [[37, 11, 52], [5, 23]]
    batch = PackedRowsCollator(pad_token_id=0)(
        [{"input_ids": ids, "seq_lengths": lengths} for ids, lengths in zip(packs, seq_lengths, strict=True)]
    )
    assert "attention_mask" not in batch  # with a mask, transformers would not read the packing from position ids
    # use_cache=False as in training (the recipe sets it): with a KV cache transformers does not look for packing.
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    where = [(0, 0), (0, 37), (0, 48), (1, 0), (1, 5)]  # (pack, offset) of each row
    for row, logits, (pack, offset) in zip(rows, alone, where, strict=True):
        inside = packed[pack, offset : offset + len(row)]
        assert torch.allclose(inside, logits, atol=1e-5, rtol=0), (attention, (inside - logits).abs().max().item())
    # The control: the same pack with one causal mask over it (no restart) does differ, so the check can fail.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"][:1, :100], use_cache=False).logits[0, 37:48]
    assert not torch.allclose(leaky, alone[1], atol=1e-3)
    # Labels: the first token of each packed row and the padding are never learned.
    labels = batch["labels"]
    assert (labels[batch["position_ids"] == 0] == -100).all()
    assert int((labels != -100).sum()) == sum(len(r) - 1 for r in rows)


def _dataloader_counts(model: Path, dataset: dict, tmp_path: Path, **overrides) -> dict:
    """Builds the recipe's trainer (no training) and counts what one epoch of its dataloader feeds the model."""
    from lmtuner_core.recipe import SFTRecipe
    from lmtuner_core.train import StateFile

    config = parse_train_config(quick_config(model, dataset, num_epochs=1, max_steps=None, **overrides))
    run = RunDir(tmp_path / f"run-{overrides.get('packing')}")
    run.root.mkdir()
    recipe = SFTRecipe(config, run, StateFile(run), threading.Event())
    recipe.setup()
    assert recipe.model.config.use_cache is False  # packed rows are told apart only without a KV cache
    pad = recipe.tokenizer.pad_token_id
    counts = {"batches": 0, "trained": 0, "real": 0, "positions": 0, "packed": recipe.packing}
    for batch in recipe.trainer.get_train_dataloader():
        counts["batches"] += 1
        labels = batch["labels"]
        # The model shifts labels by one: position 0 of a row is never a target.
        counts["trained"] += int((labels[:, 1:] != -100).sum())
        counts["real"] += int((batch["input_ids"] != pad).sum())
        counts["positions"] += batch["input_ids"].numel()
        if "attention_mask" in batch:
            assert int(batch["attention_mask"].sum()) == int((batch["input_ids"] != pad).sum())
    counts["expected_real"] = sum(len(ids) for ids in recipe.train_dataset["input_ids"]) if not recipe.packing else None
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
    assert packed["batches"] < unpacked["batches"]
    assert packed["positions"] < unpacked["positions"]  # less padding computed


def test_job_with_packing_trains_same_tokens_in_fewer_steps(tiny_model, shared_data, lmtuner_home, tmp_path):
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([shared_data, tiny_model, tmp_path]))
    dataset = {"path": str(shared_data / ALPACA), "max_rows": 40}
    runs = {}
    for packing in (True, False):
        config = quick_config(tiny_model, dataset, num_epochs=1, max_steps=None, max_seq_len=512, packing=packing)
        status = run_job(ctx, config)
        assert status.status == "completed", status
        records = [json.loads(line) for line in Path(status.run_dir, "metrics.jsonl").read_text().splitlines()]
        losses = [r for r in records if "loss" in r]
        runs[packing] = {"steps": losses[-1]["step"], "tokens": losses[-1]["tokens_seen"]}
    assert runs[True]["tokens"] == runs[False]["tokens"] > 0  # real tokens: padding is never counted
    assert runs[True]["steps"] < runs[False]["steps"]


def test_tokenization_is_cached_by_rows_tokenizer_and_template(tiny_model, shared_data, tmp_path):
    from transformers import AutoTokenizer

    from lmtuner_core.config import DatasetSpec
    from lmtuner_core.data import load_examples, tokenize_cached

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
