"""Self-attention for vision transformers: 2-D local Krause attention (KViT) and its
standard twin (ViT).

Both modules take the same constructor arguments and hold the same parameters (fused
``qkv`` and ``proj`` Linears, as timm's ``Attention``); the Krause one adds only
``log_sigma``. A ViT and a KViT built from them therefore differ in attention alone.
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
    """2-D local Krause attention (SPEC section 1, KViT).

    A patch attends to the patches within ``radius`` of it on the ``grid`` (``metric``
    "manhattan" or "chebyshev", itself included) plus the prefix tokens; a prefix (CLS)
    token attends to every token. Of these candidates the ``top_k`` nearest keys in
    ``||q - k||`` survive and are weighted by softmax(-||q - k||^2 / (2 sigma^2)).
    No 1/sqrt(d) scaling: sigma is the temperature.

    Args:
        dim: token width; num_heads must divide it.
        grid: (rows, cols) of the patch grid; tokens are ``num_prefix_tokens`` prefix
            tokens followed by the row-major patches.
        sigma: initial sigma (> 0); stored as the parameter ``log_sigma``, a scalar or,
            with ``per_head_sigma``, one per head.
        attn_drop: dropout on the attention weights. The linear-time op never forms the
            weights, so with attn_drop > 0 training takes the dense O(N^2) path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid,
        radius: int = 1,
        metric: str = "manhattan",
        top_k: int = 2,
        sigma: float = 2.5,
        num_prefix_tokens: int = 1,
        per_head_sigma: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        V.check_nonnegative_int("num_prefix_tokens", num_prefix_tokens)
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(type(g) is int for g in grid)):
            raise ValueError(f"grid must be a (rows, cols) pair of ints, got {grid!r}")
        self.grid = V.check_grid(tuple(grid), grid[0] * grid[1] + num_prefix_tokens, num_prefix_tokens)
        self.radius = V.check_nonnegative_int("radius", radius)
        self.metric = V.check_metric(metric)
        self.top_k = V.check_positive_int("top_k", top_k)
        self.num_prefix_tokens = num_prefix_tokens
        self.log_sigma = log_sigma_parameter(sigma, num_heads if per_head_sigma else None)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.detach().exp()

    def attention_weights(self, q, k) -> torch.Tensor:
        """Dense (B, H, N, N) weights of this layer for given q, k (rows sum to 1)."""
        mask = grid_candidate_mask(self.grid, self.radius, self.metric, self.num_prefix_tokens, q.device)
        return krause_attention_probs(q, k, self.log_sigma, mask, self.top_k)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        q, k, v = self._split_qkv(x)
        if return_attention or (self.training and self.attn_drop.p > 0):
            probs = self.attention_weights(q, k)
            out = self._weighted_values(probs, v)
        else:
            probs = None
            out = local_krause_attention_2d(
                q, k, v, self.log_sigma, self.grid, self.radius, self.metric, self.top_k, self.num_prefix_tokens
            )
        out = self._merge(out)
        return (out, probs) if return_attention else out

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, radius={self.radius}, metric={self.metric!r}, top_k={self.top_k}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )


class StandardAttention(_QKVAttention):
    """Global softmax self-attention, the twin of ``LocalKrauseAttention2d``.

    Takes the same arguments so a model builder can swap the class; the Krause-only ones
    (grid, radius, metric, top_k, sigma, num_prefix_tokens, per_head_sigma) are ignored.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid=None,
        radius: int = 1,
        metric: str = "manhattan",
        top_k: int = 2,
        sigma: float = 2.5,
        num_prefix_tokens: int = 1,
        per_head_sigma: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.scale = self.head_dim**-0.5

    def attention_weights(self, q, k) -> torch.Tensor:
        """Dense (B, H, N, N) softmax weights, fp32."""
        return torch.softmax((q.float() * self.scale) @ k.float().transpose(-1, -2), dim=-1)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        q, k, v = self._split_qkv(x)
        if return_attention:
            probs = self.attention_weights(q, k)
            out = self._weighted_values(probs, v)
        else:
            probs = None
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = self._merge(out)
        return (out, probs) if return_attention else out
