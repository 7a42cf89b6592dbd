"""Self-attention for vision transformers: 2-D local Krause attention (KViT) and its
standard twin (ViT).

Both hold the same parameters (fused ``qkv`` and ``proj`` Linears, as timm's
``Attention``); the Krause one adds its ``KrauseConfig`` (and the grid it reads) and the
parameter ``log_sigma``. A ViT and a KViT built from them differ in attention alone.
Attention maps come from ``attention_weights(x)``; ``forward`` always returns outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..masks import grid_candidate_mask
from ..ops import local_krause_attention_2d
from ._common import check_dropout, check_heads, krause_attention_probs, log_sigma_parameter
from .config import KrauseConfig, resolve_config


def topk_schedule(k: int, num_layers: int) -> list[int]:
    """Per-layer top-k, growing linearly from k (first layer) to 2k (last): round(linspace(k, 2k, L)).

    Rounding is numpy's (exact halves go to the even integer).

    CIFAR KViT-S uses k=2 over 12 layers (2..4), ImageNet k=8 (8..16).
    """
    V.check_positive_int("k", k)
    V.check_positive_int("num_layers", num_layers)
    return [int(x) for x in np.rint(np.linspace(k, 2 * k, num_layers))]


class _QKVAttention(nn.Module):
    """Fused qkv projection, multi-head split and output projection shared by both twins."""

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.head_dim, _ = check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(check_dropout("attn_drop", attn_drop))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))

    def _split_qkv(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, H, N, D)

    def _merge(self, out):
        b, _, n, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))

    def _weighted_values(self, probs, v):
        # The analysis / attention-dropout path: weights are materialised, dropout applies to them.
        return (self.attn_drop(probs) @ v.float()).to(v.dtype)


class LocalKrauseAttention2d(_QKVAttention):
    """2-D local Krause attention (docs/method.md, KViT).

    A patch attends to the patches within ``radius`` of it on the ``grid`` (``metric``
    "manhattan" or "chebyshev", itself included) plus the prefix tokens; a prefix (CLS)
    token attends to every token. Of these candidates the ``top_k`` nearest keys in
    ``||q - k||`` survive and are weighted by softmax(-||q - k||^2 / (2 sigma^2)).
    No 1/sqrt(d) scaling: sigma is the temperature.

    Args:
        dim: token width; num_heads must divide it.
        grid: (rows, cols) of the patch grid; tokens are ``num_prefix_tokens`` prefix
            tokens followed by the row-major patches.
        config: the Krause settings (radius, metric, top_k, sigma, per_head_sigma, impl);
            default ``LocalKrauseAttention2d.preset``; keyword overrides of its fields
            are accepted too, e.g. ``LocalKrauseAttention2d(384, 6, (8, 8), top_k=3)``.
        attn_drop: dropout on the attention weights. The linear-time op never forms the
            weights, so with attn_drop > 0 training takes the dense O(N^2) path.
    """

    preset = KrauseConfig(top_k=2, per_head_sigma=False)

    def __init__(self, dim: int, num_heads: int, grid, config: KrauseConfig | None = None, *,
                 num_prefix_tokens: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 **overrides):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        V.check_nonnegative_int("num_prefix_tokens", num_prefix_tokens)
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(type(g) is int for g in grid)):
            raise ValueError(f"grid must be a (rows, cols) pair of ints, got {grid!r}")
        self.grid = V.check_grid(tuple(grid), grid[0] * grid[1] + num_prefix_tokens, num_prefix_tokens)
        self.num_prefix_tokens = num_prefix_tokens
        self.config = resolve_config(self.preset, config, overrides)
        self.log_sigma = log_sigma_parameter(self.config.sigma, num_heads if self.config.per_head_sigma else None)

    radius = property(lambda self: self.config.radius)
    metric = property(lambda self: self.config.metric)
    top_k = property(lambda self: self.config.top_k)
    impl = property(lambda self: self.config.impl)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.detach().exp()

    def _weights(self, q, k) -> torch.Tensor:
        mask = grid_candidate_mask(self.grid, self.radius, self.metric, self.num_prefix_tokens, q.device)
        return krause_attention_probs(q, k, self.log_sigma, mask, self.top_k)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, H, N, N) fp32 weights of this layer for the input x (rows sum to 1)."""
        q, k, _ = self._split_qkv(x)
        return self._weights(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_qkv(x)
        if self.training and self.attn_drop.p > 0:
            out = self._weighted_values(self._weights(q, k), v)
        else:
            out = local_krause_attention_2d(q, k, v, self.log_sigma, self.grid, self.radius, self.metric, self.top_k,
                                            self.num_prefix_tokens, impl=self.impl)
        return self._merge(out)

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, radius={self.radius}, metric={self.metric!r}, top_k={self.top_k}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, impl={self.impl!r}"
        )


class StandardAttention(_QKVAttention):
    """Global softmax self-attention, the twin of ``LocalKrauseAttention2d`` (same
    projections, no Krause settings)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.scale = self.head_dim**-0.5

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, H, N, N) fp32 softmax weights for the input x."""
        q, k, _ = self._split_qkv(x)
        return torch.softmax((q.float() * self.scale) @ k.float().transpose(-1, -2), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_qkv(x)
        drop = self.attn_drop.p if self.training else 0.0
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=drop))
