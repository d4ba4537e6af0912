"""Preference accuracy: on held-out pairs, how often a model prefers the `chosen` answer to the `rejected` one.

A causal LM prefers the answer with the higher summed log-probability given the prompt (the quantity DPO moves:
its implicit reward is beta times the change of it against the reference); a reward model (a scalar head)
prefers the answer it scores higher. Written here: TRL computes these only inside its trainers, per batch, as
training metrics, not for a saved model on a held-out file. Needs torch (the training child, `evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PairScores:
    accuracy: float  # share of pairs whose chosen answer scores higher (ties count as half)
    margin: float  # mean score(chosen) - score(rejected)
    pairs: int


def answer_token_ids(tokenizer: Any, prompt: str | list[dict], answer: str | list[dict], tools: Any = None):
    """(prompt ids, answer ids) as TRL's preference trainers tokenize them: the chat template for turns (the answer
    begins where prompt and prompt+answer diverge), plain text with the eos appended otherwise."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text = answer if answer.endswith(tokenizer.eos_token or "") else answer + (tokenizer.eos_token or "")
        full = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = list(tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"])  # fmt: skip
        full = list(tokenizer.apply_chat_template(prompt + answer, tools=tools, tokenize=True,
                                                  return_dict=True)["input_ids"])  # fmt: skip
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    return full[:shared], full[shared:]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def sequence_scores(
    model: Any,
    tokenizer: Any,
    sequences: list[tuple[list[int], list[int]]],
    *,
    scalar_head: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[float]:
    """Per (prompt ids, answer ids): the summed log-probability of the answer tokens (causal LM), or the reward
    head's score of the whole sequence (scalar_head). Batches are right-padded; sequences cut to max_length."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for batch in _batches(sequences, batch_size):
            if stop is not None and stop():
                raise InterruptedError("stopped while scoring pairs")
            rows = [(p + a)[:max_length] if max_length else p + a for p, a in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
            ids, attention = ids.to(device), attention.to(device)
            if scalar_head:
                # Sequence classifiers read the last non-pad token (found through the config's pad_token_id).
                out = model(input_ids=ids, attention_mask=attention)
                scores += out.logits[:, 0].float().tolist()
                continue
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            for i, (prompt, _answer) in enumerate(batch):
                end = len(rows[i])
                start = min(len(prompt), end)  # token at position t is predicted by logits at t-1
                scores.append(logprobs[i, max(start - 1, 0) : end - 1].sum().item())
    finally:
        model.train(was_training)
    return scores


def preference_accuracy(
    model: Any,
    tokenizer: Any,
    pairs: list[dict],
    *,
    scalar_head: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> PairScores:
    """How often the model prefers `chosen` over `rejected` on pairs in TRL's normal form (prompt/chosen/rejected)."""
    sequences = []
    for pair in pairs:
        for key in ("chosen", "rejected"):
            sequences.append(answer_token_ids(tokenizer, pair["prompt"], pair[key], pair.get("tools")))
    scores = sequence_scores(model, tokenizer, sequences, scalar_head=scalar_head, batch_size=batch_size,
                             max_length=max_length, stop=stop)  # fmt: skip
    chosen, rejected = scores[0::2], scores[1::2]
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True))
    n = len(pairs)
    return PairScores(accuracy=wins / n if n else 0.0, margin=margin / n if n else 0.0, pairs=n)
