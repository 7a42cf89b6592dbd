"""Causal self-attention for decoders: causal-window Krause attention and its softmax twin.

Both take the same constructor arguments and hold the same parameters (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, named as in Hugging Face decoders so LoRA targets and
weight copies carry over); the Krause one adds only the per-head ``log_sigma``.

``forward(x, cache=None)``: without a cache, the whole (B, T, C) sequence at once; with a
cache from ``new_cache``, x holds the next tokens (a prompt, or one token) and the outputs
equal those of the full forward at the same positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..cache import DEFAULT_CAPACITY, KrauseWindowCache, StandardKVCache, end_aligned_mask, masked_sdpa
from ..ops import causal_krause_attention
from ._common import check_dropout, check_heads, log_sigma_parameter


class _CausalProjections(nn.Module):
    """q/k/v/o projections with grouped-query heads, shared by every causal attention here."""

    def __init__(self, dim, num_heads, num_kv_heads, bias, attn_drop, proj_drop):
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

    def _project(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _merge(self, out):
        b, _, t, _ = out.shape
        return self.proj_drop(self.o_proj(out.transpose(1, 2).reshape(b, t, -1)))

    def _cache_placement(self, device, dtype):
        w = self.q_proj.weight
        return (device if device is not None else w.device), (dtype if dtype is not None else w.dtype)


class CausalKrauseAttention(_CausalProjections):
    """Causal-window Krause attention (SPEC section 1): token i scores the keys
    i - window < j <= i by -||q_i - k_j||^2 / (2 sigma_h^2), keeps the ``top_k`` nearest
    and softmaxes over them. One sigma per head, stored as ``log_sigma`` (init log sigma).

    ``attn_drop`` must be 0: the linear-time op never forms the attention weights, so
    there is nothing to drop; regularise with ``proj_drop`` or in the block instead.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        window: int = 128,
        top_k: int = 96,
        sigma: float = 2.5,
        bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__(dim, num_heads, num_kv_heads, bias, attn_drop, proj_drop)
        if self.attn_drop:
            raise ValueError(f"attn_drop must be 0 for Krause attention (weights are never formed), got {attn_drop}")
        self.window = V.check_positive_int("window", window)
        self.top_k = V.check_positive_int("top_k", top_k)
        self.impl = impl
        self.log_sigma = log_sigma_parameter(sigma, num_heads)

    def forward(self, x: torch.Tensor, cache: KrauseWindowCache | None = None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self._project(x)
        if cache is None:
            out = causal_krause_attention(q, k, v, self.log_sigma, self.window, self.top_k,
                                          key_padding_mask=key_padding_mask, impl=self.impl)
        else:
            out = cache.attend(q, k, v, self.log_sigma, key_padding_mask=key_padding_mask)
        return self._merge(out)

    def new_cache(self, batch_size: int, device=None, dtype=None, capacity: int | None = None) -> KrauseWindowCache:
        """A ring of ``window`` slots: enough whatever the sequence length (``capacity``,
        the expected length, only matters to growing caches)."""
        device, dtype = self._cache_placement(device, dtype)
        return KrauseWindowCache(batch_size, self.num_kv_heads, self.head_dim, self.window, self.top_k, device, dtype,
                                 impl=self.impl)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, window={self.window}, top_k={self.top_k}"


class CausalSelfAttention(_CausalProjections):
    """Causal softmax attention over the whole prefix, the twin of ``CausalKrauseAttention``.

    Takes the same arguments; the Krause-only ones (window, top_k, sigma) are ignored.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        window: int = 128,
        top_k: int = 96,
        sigma: float = 2.5,
        bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, num_kv_heads, bias, attn_drop, proj_drop)

    def forward(self, x: torch.Tensor, cache: StandardKVCache | None = None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self._project(x)
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            out = cache.attend(q, k, v, dropout_p=drop, key_padding_mask=key_padding_mask)
        elif key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, enable_gqa=True)
        else:
            out = masked_sdpa(q, k, v, end_aligned_mask(q.shape[2], k.shape[2], None, key_padding_mask, q.device), None, drop)
        return self._merge(out)

    def new_cache(self, batch_size: int, device=None, dtype=None, capacity: int | None = None) -> StandardKVCache:
        """A growing cache, ``capacity`` (the expected sequence length) slots up front."""
        device, dtype = self._cache_placement(device, dtype)
        return StandardKVCache(batch_size, self.num_kv_heads, self.head_dim, device, dtype,
                               capacity=DEFAULT_CAPACITY if capacity is None else capacity)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}"
