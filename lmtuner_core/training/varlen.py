"""Variable-length attention for padding-free training: each row of a flattened batch attends only to itself.

Hand-written, because no library does this on the CPU: transformers reads rows packed into one sequence from
restarting position ids, but for SDPA it then builds one dense (tokens × tokens) block-diagonal mask and computes
every cross-row score only to mask it out; flash-attn's and torch's `varlen_attn` kernels are CUDA-only. Here the
flattened batch (transformers' `DataCollatorWithFlattening` with `cu_seq_lens_*`) is cut at the row boundaries and
each row goes through SDPA's causal kernel on its own, so attention costs Σ len² instead of (Σ len)², no mask is
built; on CUDA in half precision, with the collator's `cu_seq_lens`, torch's `varlen_attn` (flash) does the whole
batch in one call.

Everything else falls through to transformers' own SDPA function unchanged: padded batches (a 2D mask is given),
generation with a KV cache, ordinary unpacked rows.
"""

from __future__ import annotations

import itertools
from typing import Any

ATTENTION_NAME = "lmtuner_varlen_sdpa"  # registered with transformers' AttentionInterface


def row_bounds(kwargs: dict, query: Any) -> list[int] | None:
    """Cumulative row offsets [0, end_0, end_1, …] of a flattened batch of one sequence, or None when the batch is
    not flattened. Read from `cu_seq_lens_q` (the collator's) or else from position ids restarting at each row."""
    import torch

    if query.shape[0] != 1:
        return None
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        return [int(b) for b in bounds.tolist()]
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != query.shape[2]:
        return None
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(positions, prepend=positions[:1] - 1) != 1).reshape(-1).tolist()
    if starts[:1] != [0]:
        starts.insert(0, 0)
    return [*starts, positions.numel()]


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """The registered attention function. query (1, heads, tokens, dim); key/value may have fewer heads (GQA)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    flattened = attention_mask is None and query.shape[2] == key.shape[2] and getattr(module, "is_causal", True)
    gqa = query.shape[1] != key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    if (
        flattened and cu is not None and cu.numel() > 2 and query.shape[0] == 1
        and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout
    ):  # fmt: skip
        # The collator's bounds are used as they are: reading them back to the host would wait on the GPU per layer.
        from torch.nn.attention.varlen import varlen_attn

        cu = cu.to(device=query.device, dtype=torch.int32)
        longest = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out.unsqueeze(0), None

    bounds = row_bounds(kwargs, query) if flattened else None
    if bounds is None or len(bounds) <= 2:  # not a flattened batch, or a single row: transformers' SDPA as usual
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    # split, not a slice per row: the backward of each slice writes a zero tensor the size of the whole batch and
    # adds it up (rows × batch), while split's backward is one concatenation.
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    rows = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    pieces = [
        F.scaled_dot_product_attention(q, k, v, None, dropout, True, scale=scaling, enable_gqa=gqa).transpose(1, 2)
        for q, k, v in rows
        if q.shape[2]
    ]
    return torch.cat(pieces, dim=1), None  # (1, tokens, heads, dim), contiguous: one copy, not a cat and a transpose


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask builder for ATTENTION_NAME: none for a batch without padding whose queries and keys line up (a flattened
    batch is cut by `varlen_attention` itself, an ordinary one uses SDPA's causal kernel); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    cache_position = kwargs.get("cache_position")
    q_length = kwargs.get("q_length") or (len(cache_position) if cache_position is not None else None)
    if kwargs.get("attention_mask") is None and q_length is not None and q_length == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Makes ATTENTION_NAME known to transformers (attention and mask); safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, varlen_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)


def supports_varlen(model_config: Any) -> bool:
    """Whether a model's attention can be swapped for ATTENTION_NAME without changing what it computes: it runs
    transformers' SDPA (not eager, flash, xPos or remote code), with full causal attention in every layer (no
    sliding windows, which only a mask expresses) and no soft-capping."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layer_types = getattr(text, "layer_types", None)
    sliding = any(t != "full_attention" for t in layer_types) if layer_types else getattr(text, "sliding_window", None)
    return (
        getattr(model_config, "_attn_implementation", None) == "sdpa"
        and not sliding
        and getattr(text, "attn_logit_softcapping", None) is None
    )
