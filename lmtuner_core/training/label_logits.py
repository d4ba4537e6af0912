"""The loss of a flattened batch on the CPU from the logits of its label positions only.

TRL's SFTTrainer computes the loss through a fused LM head (`trl.trainer.utils.add_fused_lm_head`): a chunked
log-prob function that never holds the whole (tokens × vocabulary) logits. On CUDA it runs a Triton kernel over the
label positions only. Off CUDA it scores every position, prompt tokens included, folds each vocabulary tile in a
dozen torch ops and projects every tile again in the backward. On SmolLM2 (49k vocabulary, 1,700 tokens a step, 55%
of them labels) that costs 5.9 s a step on 2 cores; asking the model itself for the logits of the label positions
(transformers' `logits_to_keep` with an index tensor) and taking ATen's log-softmax costs 1.3 s, for the same loss.

So on the CPU, for a flattened batch (one row, as `FlatRowsCollator` makes), the fused call is answered here and
returns what TRL's own head returns: per-token log-probabilities, entropy and top-1 flags, zero where the label is
-100, so TRL's loss, its loss types and its metrics stay TRL's. Anything else (CUDA, padded batches, an older TRL)
goes to TRL's head unchanged. Hand-written because neither TRL nor transformers offers it; memory is the label
positions' logits (labels × vocabulary floats, and their gradient), never more than the whole-sequence logits that
a model's own loss holds.
"""

from __future__ import annotations

import types
from typing import Any

ENTROPY_CHUNK = 256  # label positions per no-grad entropy pass: its two temporaries stay small beside the logits


def install(model: Any) -> bool:
    """Wraps the fused forward that SFTTrainer put on `model` (the PEFT base model when wrapped); returns whether it
    did (False when this TRL has no fused head)."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused_forward = target.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        flattened = input_ids is not None and input_ids.shape[0] == 1 and "position_ids" in kwargs
        if not (fused_lm_head and flattened and labels is not None and shift_labels is None and not input_ids.is_cuda):
            return fused_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )  # fmt: skip
        targets = labels[:, 1:]  # position i predicts token i + 1, as in TRL's head
        mask = targets != -100
        kwargs.update(logits_to_keep=mask[0].nonzero().squeeze(-1), use_cache=False)
        outputs = fused_forward(*args, fused_lm_head=False, **kwargs)
        log_probs, entropy, is_top1 = score(outputs.logits[0], targets[mask])
        per_token = [x.new_zeros(mask.shape, dtype=x.dtype).masked_scatter(mask, x) for x in (log_probs, entropy)]
        top1 = mask.clone().masked_scatter(mask, is_top1)
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token[0].sum() / divisor, log_probs=per_token[0], entropy=per_token[1], is_top1=top1,
            label_mask=mask,
        )  # fmt: skip

    target.forward = types.MethodType(forward, target)
    return True


def score(logits: Any, targets: Any) -> tuple[Any, Any, Any]:
    """Log-probability of each target (with gradient), the distribution's entropy and whether the target is the
    most likely token (both without), from logits (labels × vocabulary)."""
    import torch

    log_softmax = logits.float().log_softmax(-1)
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = torch.cat([-(chunk.exp() * chunk).sum(-1) for chunk in log_softmax.detach().split(ENTROPY_CHUNK)])
        is_top1 = log_softmax.detach().argmax(-1) == targets
    return log_probs, entropy, is_top1
