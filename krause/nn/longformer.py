"""Longformer-style causal attention (Beltagy et al., 2020), a baseline of the language
models: causal softmax over the last ``window`` tokens plus the first ``global_tokens``
tokens of the sequence, which every later token sees.

In a decoder a global token can only look back, so the global keys are the first
``global_tokens`` real tokens of each row (a prefix of "sinks"); everything else is the
sliding window. The forward forms a (T, T) mask (fine for the 1024-token contexts of the
family); decoding keeps a growing cache and the same mask over its positions.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from ..masks import end_aligned_mask, masked_sdpa
from .causal import CausalProjections
from .config import KrauseConfig


def longformer_mask(num_queries: int, num_keys: int, window: int, global_tokens: int, key_padding_mask,
                    device) -> torch.Tensor:
    """(1 or B, 1, Tq, Tk) bool: the queries are the last Tq of Tk positions; query i sees
    the causal keys in (i - window, i] and the first ``global_tokens`` real keys.
    ``key_padding_mask`` (B, Tk) bool, True = real token, or None."""
    local = end_aligned_mask(num_queries, num_keys, window, key_padding_mask, device)
    causal = end_aligned_mask(num_queries, num_keys, None, key_padding_mask, device)
    if key_padding_mask is None:
        rank = torch.arange(num_keys, device=device)[None]
    else:  # the n-th real token of its row (left padding shifts it)
        rank = key_padding_mask.long().cumsum(-1) - 1
    is_global = (rank < global_tokens)[:, None, None, :]
    return local | (causal & is_global)


class LongformerAttention(CausalProjections):
    """Causal softmax attention over the last ``window`` tokens and the first
    ``global_tokens`` ones; the projections of every causal module here."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, window: int = KrauseConfig.window,
                 global_tokens: int = KrauseConfig.global_tokens, *, bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window = V.check_positive_int("window", window)
        self.global_tokens = V.check_nonnegative_int("global_tokens", global_tokens)

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        if cache is None and self.training and q.shape[2] < self.global_tokens:
            raise ValueError(f"global_tokens {self.global_tokens} is more than the {q.shape[2]} tokens of the block")
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            k, v, key_padding_mask = cache.append(k, v, key_padding_mask)
        else:
            key_padding_mask = V.check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q)
        allowed = longformer_mask(q.shape[2], k.shape[2], self.window, self.global_tokens, key_padding_mask, q.device)
        return self.merge(masked_sdpa(q, k, v, allowed, None, drop))

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A growing cache (the global keys sit at its start), ``capacity`` slots up front."""
        from ..cache import KVCacheLayer

        return KVCacheLayer(capacity, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, window={self.window}, "
                f"global_tokens={self.global_tokens}")
