"""Which new tokens are real, read from whatever mask a transformers attention layer receives.

The Krause branch runs its own causal window, so it needs only one fact from the mask the
model built for the standard branch: the validity (True = real token, False = padding) of
the Tq tokens of this call. transformers hands a layer one of

- ``None``: no padding (sdpa/flash use their causal flag);
- a 4-D bool mask (B or 1, 1, Tq, Tkv), True = may attend (sdpa, and flex/flash fallbacks);
- a 4-D additive float mask, 0 = may attend, the dtype's minimum = masked (eager);
- a 2-D mask (B, Tkv) of 1/0 or bool (flash attention).

Column ``c`` of the key axis holds the key at absolute position ``kv_offset + c`` (the
cache layer's ``get_mask_sizes``). A key is real iff some query may attend to it: padding is
masked for every query, while every real key is visible to at least the query at its own
position (the causal diagonal survives any sliding window).
"""

from __future__ import annotations

import torch


def attendable_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B', Tkv) bool from a 2-D or 4-D mask: may any query attend to key column c."""
    if attention_mask.dim() == 2:
        return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be None, 2-D (batch, keys) or 4-D (batch, 1, queries, keys), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        attend = attention_mask
    elif attention_mask.is_floating_point():
        attend = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        attend = attention_mask != 0
    return attend.any(dim=2).any(dim=1)


def new_token_validity(
    attention_mask, batch_size: int, query_length: int, past: int, kv_offset: int = 0
) -> torch.Tensor | None:
    """(B, Tq) bool validity of the tokens at absolute positions past .. past+Tq-1, or None (no padding).

    Args:
        attention_mask: the mask the attention layer received (see the module docstring).
        past: tokens the layer saw before this call (its cache length).
        kv_offset: absolute position of the mask's first key column.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask of type {type(attention_mask).__name__} is not supported by the Krause branch "
            "(flex attention's BlockMask cannot be read back); use attn_implementation 'sdpa', 'eager' or "
            "'flash_attention_2'"
        )
    keys = attendable_keys(attention_mask)
    width = keys.shape[-1]
    start = past - kv_offset
    if start < 0 or start + query_length > width:
        start = width - query_length  # a mask covering exactly the keys of the visible window
    if start < 0:
        raise ValueError(
            f"attention_mask covers {width} keys, fewer than the {query_length} tokens of this call"
        )
    valid = keys[:, start : start + query_length]
    if valid.shape[0] != batch_size:
        if valid.shape[0] != 1:
            raise ValueError(f"attention_mask batch size {valid.shape[0]} does not match the input's {batch_size}")
        valid = valid.expand(batch_size, query_length)
    return valid
