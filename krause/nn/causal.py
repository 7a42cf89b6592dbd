"""Causal self-attention for decoders: causal-window Krause attention and its softmax twin.

Both share the projections of ``CausalProjections`` (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, named as in Hugging Face decoders so LoRA targets and weight copies carry
over); the Krause one adds its ``KrauseConfig`` and the parameter ``log_sigma``.

``forward(x, cache=None, key_padding_mask=None)``: without a cache, the whole (B, T, C)
sequence at once; with a cache from ``new_cache``, x holds the next tokens (a prompt, or
one token) and the outputs equal those of the full forward at the same positions.
``key_padding_mask`` (B, T) bool, True = real token, marks padding that is never attended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dense import causal_candidates
from ..masks import end_aligned_mask, masked_sdpa
from ..ops import causal_krause_attention
from ._common import check_dropout, check_heads, krause_attention_probs, log_sigma_parameter
from .config import KrauseConfig, resolve_config


class CausalProjections(nn.Module):
    """q/k/v/o projections with grouped-query heads, the base of every causal attention
    here (and of the families' own, e.g. linear attention): subclass it and write
    ``forward`` as ``merge(attention(*project(x)))``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.head_dim, self.num_kv_heads = check_heads(dim, num_heads, num_kv_heads)
        self.num_heads = num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.attn_drop = check_dropout("attn_drop", attn_drop)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))

    def project(self, x: torch.Tensor):
        """(B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) attention outputs -> (B, T, C) through ``o_proj`` and dropout."""
        b, _, t, _ = out.shape
        return self.proj_drop(self.o_proj(out.transpose(1, 2).reshape(b, t, -1)))

    def cache_placement(self, device=None, dtype=None):
        """(device, dtype) of a new cache: the given ones, else those of the weights."""
        w = self.q_proj.weight
        return (device if device is not None else w.device), (dtype if dtype is not None else w.dtype)


class CausalKrauseAttention(CausalProjections):
    """Causal-window Krause attention (docs/method.md): token i scores the keys
    i - window < j <= i by -||q_i - k_j||^2 / (2 sigma_h^2), keeps the ``top_k`` nearest
    and softmaxes over them; sigma is stored as ``log_sigma`` (per head by default).

    Krause settings come from ``config`` (default ``CausalKrauseAttention.preset``) with
    keyword overrides, e.g. ``CausalKrauseAttention(256, 8, window=64, top_k=32)``.

    ``attn_drop`` must be 0: the linear-time op never forms the attention weights, so
    there is nothing to drop; regularise with ``proj_drop`` or in the block instead.
    """

    preset = KrauseConfig()

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, config: KrauseConfig | None = None,
                 *, bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, **overrides):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if self.attn_drop:
            raise ValueError(f"attn_drop must be 0 for Krause attention (weights are never formed), got {attn_drop}")
        self.config = resolve_config(self.preset, config, overrides)
        self.log_sigma = log_sigma_parameter(self.config.sigma, num_heads if self.config.per_head_sigma else None)

    window = property(lambda self: self.config.window)
    top_k = property(lambda self: self.config.top_k)
    impl = property(lambda self: self.config.impl)

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        if cache is None:
            out = causal_krause_attention(q, k, v, self.log_sigma, self.window, self.top_k,
                                          key_padding_mask=key_padding_mask, impl=self.impl)
        else:
            out = cache.attend(q, k, v, self.log_sigma, key_padding_mask=key_padding_mask)
        return self.merge(out)

    def attention_weights(self, x: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """Dense (B, H, T, T) fp32 weights of this layer for the input x (analysis only: O(T^2))."""
        q, k, _ = self.project(x)
        candidates = causal_candidates(q.shape[2], k.shape[2], self.window, key_padding_mask, q.device)
        return krause_attention_probs(q, k, self.log_sigma, candidates, self.top_k)

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A ``krause.cache.KrauseWindowLayer`` of the last ``window`` tokens: enough whatever
        the sequence length (``capacity``, the expected length, only matters to growing caches;
        batch size and device come with the first tokens)."""
        from ..cache import KrauseWindowLayer

        return KrauseWindowLayer(self.window, self.top_k, self.impl, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, window={self.window}, top_k={self.top_k}, "
                f"impl={self.impl!r}")


class CausalSelfAttention(CausalProjections):
    """Causal softmax attention over the whole prefix, the twin of ``CausalKrauseAttention``
    (same projections, no Krause settings)."""

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            out = cache.attend(q, k, v, dropout_p=drop, key_padding_mask=key_padding_mask)
        elif key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, enable_gqa=True)
        else:
            allowed = end_aligned_mask(q.shape[2], k.shape[2], None, key_padding_mask, q.device)
            out = masked_sdpa(q, k, v, allowed, None, drop)
        return self.merge(out)

    def attention_weights(self, x: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """Dense (B, H, T, T) fp32 causal softmax weights for the input x (rows seeing no key are 0)."""
        q, k, _ = self.project(x)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        allowed = end_aligned_mask(q.shape[2], k.shape[2], None, key_padding_mask, q.device)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A growing ``krause.cache.KVCacheLayer``, ``capacity`` (the expected sequence length)
        slots allocated by the first tokens."""
        from ..cache import KVCacheLayer

        return KVCacheLayer(capacity, dtype=dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}"
