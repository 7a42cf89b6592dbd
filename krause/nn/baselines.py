"""Sparse softmax baselines of the language-model family (docs/method.md).

- ``SlidingWindowAttention``: softmax(q . k / sqrt(d)) over the keys i - window < j <= i
  (Krause's candidate set, without the distance score and the top-k).
- ``TopKAttention``: softmax over the ``top_k`` highest q . k / sqrt(d) among all keys
  j <= i (Krause's top-k, without the window and the distance score).

Both share the projections of ``CausalSelfAttention`` / ``CausalKrauseAttention``
(``CausalProjections``) and take only their own knob (window, top_k; defaults those of
``KrauseConfig``), so the three baselines differ from the Krause model in attention alone.

The full forwards form (T, T) score or mask tensors: fine for the 1024-token contexts
of the family; decoding uses a ring buffer (sliding window) or a growing cache (top-k).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..masks import causal_window_mask, end_aligned_mask, masked_sdpa
from ..reference import repeat_kv
from .causal import CausalProjections
from .config import KrauseConfig


@functools.lru_cache(maxsize=16)
def _window_mask(num_tokens: int, window: int, device: torch.device) -> torch.Tensor:
    # Cached: training calls this with the same length every step.
    return causal_window_mask(num_tokens, window, device)


def topk_causal_attention(q, k, v, top_k: int, query_offset: int | None = None, scale: float | None = None,
                          dropout_p: float = 0.0, *, key_padding_mask=None) -> torch.Tensor:
    """Causal top-k softmax attention, dense: O(Tq Tk) memory.

    q (B, H, Tq, D) are the tokens at positions query_offset .. query_offset + Tq - 1 of
    the sequence whose keys/values k, v (B, Hkv, Tk, D) start at position 0 (None: the
    last Tq positions). Query i keeps the min(top_k, #causal keys that are not padding)
    highest scores q . k * scale (fp32), softmaxed; a query with no such key returns zeros.
    ``key_padding_mask``: optional (B, Tk) bool, True = real token.
    """
    V.check_positive_int("top_k", top_k)
    h, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    query_offset = tk - tq if query_offset is None else query_offset
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ repeat_kv(k, h).float().transpose(-1, -2)) * scale
    query_pos = torch.arange(query_offset, query_offset + tq, device=q.device)[:, None]
    causal = torch.arange(tk, device=q.device)[None, :] <= query_pos
    if key_padding_mask is not None:
        causal = causal & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~causal, float("-inf"))
    best = scores.topk(min(top_k, tk), dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True) & causal
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    return (probs @ repeat_kv(v, h).float()).to(q.dtype)


class SlidingWindowAttention(CausalProjections):
    """Causal softmax attention over the last ``window`` tokens (the token itself included)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, window: int = KrauseConfig.window,
                 *, bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window = V.check_positive_int("window", window)

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            out = cache.attend(q, k, v, dropout_p=drop, key_padding_mask=key_padding_mask)
        elif key_padding_mask is None:
            mask = _window_mask(q.shape[2], self.window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, enable_gqa=True)
        else:
            allowed = end_aligned_mask(q.shape[2], k.shape[2], self.window, key_padding_mask, q.device)
            out = masked_sdpa(q, k, v, allowed, None, drop)
        return self.merge(out)

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A ``krause.cache.SlidingWindowLayer`` of the last ``window`` tokens, whatever the
        expected sequence length ``capacity``."""
        from ..cache import SlidingWindowLayer

        return SlidingWindowLayer(self.window, dtype=dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, window={self.window}"


class TopKAttention(CausalProjections):
    """Causal softmax attention over the ``top_k`` highest-scoring earlier tokens."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, top_k: int = KrauseConfig.top_k,
                 *, bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.top_k = V.check_positive_int("top_k", top_k)

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            k, v, key_padding_mask = cache.append(k, v, key_padding_mask)
        out = topk_causal_attention(q, k, v, self.top_k, dropout_p=drop, key_padding_mask=key_padding_mask)
        return self.merge(out)

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A growing ``krause.cache.KVCacheLayer``, ``capacity`` (the expected sequence length)
        slots allocated by the first tokens."""
        from ..cache import KVCacheLayer

        return KVCacheLayer(capacity, dtype=dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, top_k={self.top_k}"
