"""Self-attention for vision transformers: 2-D local Krause attention (KViT) and its
standard twin.

Both hold the same parameters (fused ``qkv`` and ``proj`` Linears, as timm's
``Attention``); the Krause one adds its ``KrauseConfig`` and the parameter
``log_sigma``. ``LocalKrauseAttention2d`` is a drop-in for timm's ViT attention: it is
called as ``attn(x, attn_mask=None, is_causal=False)``, ``from_attention`` builds it
around the projections of an existing timm ``Attention``, and it reads the patch grid
from a ``PatchGrid`` that the model updates on every forward (so the neighbourhood
follows the input's actual grid). Attention maps come from ``attention_weights(x)``;
``forward`` always returns outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
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


class PatchGrid:
    """The (rows, cols) patch grid that a model's attention layers read at forward time.

    A fixed grid for a standalone module; a vision transformer shares one instance between
    all its Krause layers and sets ``value`` once per forward, after patch embedding.
    """

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __repr__(self) -> str:
        return f"PatchGrid({self.value!r})"


def _checked_grid(grid, num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    if grid is None:
        raise ValueError("grid: this layer has no patch grid yet (give grid=(rows, cols) or run it inside its model)")
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and any(isinstance(g, torch.SymInt) for g in grid):
        grid = tuple(int(g) for g in grid)  # torch.compile with dynamic shapes: specialise on the grid
    return V.check_grid(tuple(grid) if isinstance(grid, list) else grid, num_tokens, num_prefix_tokens)


def _check_no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask / is_causal: Krause attention defines its own 2-D candidate set and takes no mask")


def local_attention_2d(q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix_tokens: int,
                       impl: str, attn_mask=None, is_causal=False) -> torch.Tensor:
    """The Krause op with the checks that need concrete values (grid against the token
    count, no mask). An fx leaf (``torch.fx.wrap``): symbolic tracing records one call."""
    _check_no_mask(attn_mask, is_causal)
    grid = _checked_grid(grid, q.shape[2], num_prefix_tokens)
    return local_krause_attention_2d(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens, impl=impl)


def local_weights_2d(q, k, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix_tokens: int,
                     attn_mask=None, is_causal=False) -> torch.Tensor:
    """Dense (B, H, N, N) fp32 Krause weights on the grid (analysis, attention dropout). An fx leaf."""
    _check_no_mask(attn_mask, is_causal)
    grid = _checked_grid(grid, q.shape[2], num_prefix_tokens)
    mask = grid_candidate_mask(grid, radius, metric, num_prefix_tokens, q.device)
    return krause_attention_probs(q, k, log_sigma, mask, top_k)


torch.fx.wrap("local_attention_2d")
torch.fx.wrap("local_weights_2d")


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

    A patch attends to the patches within ``radius`` of it on the patch grid (``metric``
    "manhattan" or "chebyshev", itself included) plus the prefix tokens; a prefix (CLS)
    token attends to every token. Of these candidates the ``top_k`` nearest keys in
    ``||q - k||`` survive and are weighted by softmax(-||q - k||^2 / (2 sigma^2)).
    No 1/sqrt(d) scaling: sigma is the temperature.

    Args:
        dim: token width; num_heads must divide it.
        grid: (rows, cols) of the patch grid, or a ``PatchGrid`` that the model sets on
            every forward; tokens are ``num_prefix_tokens`` prefix tokens followed by the
            row-major patches.
        config: the Krause settings (radius, metric, top_k, sigma, per_head_sigma, impl);
            default ``LocalKrauseAttention2d.preset``; keyword overrides of its fields
            are accepted too, e.g. ``LocalKrauseAttention2d(384, 6, (8, 8), top_k=3)``.
        attn_drop: dropout on the attention weights. The linear-time op never forms the
            weights, so with attn_drop > 0 training takes the dense O(N^2) path.

    ``forward(x, attn_mask=None, is_causal=False)`` has the signature of timm's
    ``Attention``; a mask is refused (the candidate set is the neighbourhood).
    """

    preset = KrauseConfig(top_k=2, per_head_sigma=False)

    def __init__(self, dim: int, num_heads: int, grid, config: KrauseConfig | None = None, *,
                 num_prefix_tokens: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 **overrides):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        V.check_nonnegative_int("num_prefix_tokens", num_prefix_tokens)
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_grid = self._grid_source(grid, num_prefix_tokens)
        self.config = resolve_config(self.preset, config, overrides)
        self.log_sigma = log_sigma_parameter(self.config.sigma, num_heads if self.config.per_head_sigma else None)

    @staticmethod
    def _grid_source(grid, num_prefix_tokens: int) -> PatchGrid:
        if isinstance(grid, PatchGrid):
            return grid
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(type(g) is int for g in grid)):
            raise ValueError(f"grid must be a (rows, cols) pair of ints or a PatchGrid, got {grid!r}")
        return PatchGrid(V.check_grid(tuple(grid), grid[0] * grid[1] + num_prefix_tokens, num_prefix_tokens))

    @classmethod
    def from_attention(cls, attn: nn.Module, grid, config: KrauseConfig | None = None, *,
                       num_prefix_tokens: int = 1, **overrides) -> "LocalKrauseAttention2d":
        """The Krause twin of a timm-style ``Attention`` (fused ``qkv``, ``proj``): it takes
        over that module's projections and dropouts (the same Parameter objects) and adds
        ``log_sigma`` on their device. Consumes no random numbers."""
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)):
            raise ValueError(f"attn must have fused qkv and proj Linears (timm's Attention), got {type(attn).__name__}")
        extras = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, n, nn.Identity()), nn.Identity)]
        if extras or getattr(attn, "gate", None) is not None:
            raise ValueError(f"attn: {type(attn).__name__} with {extras or ['gate']} has no Krause counterpart")
        dim, heads = attn.qkv.in_features, attn.num_heads
        if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
            raise ValueError(f"attn: head width times heads must equal the width {dim} for Krause attention")
        with torch.device("meta"):  # shapes only: the real projections are the given module's
            mod = cls(dim, heads, grid, config, num_prefix_tokens=num_prefix_tokens,
                      qkv_bias=attn.qkv.bias is not None, **overrides)
        mod.qkv, mod.proj, mod.attn_drop, mod.proj_drop = attn.qkv, attn.proj, attn.attn_drop, attn.proj_drop
        mod.log_sigma = log_sigma_parameter(mod.config.sigma, heads if mod.config.per_head_sigma else None)
        mod.log_sigma.data = mod.log_sigma.data.to(attn.qkv.weight.device)
        return mod

    radius = property(lambda self: self.config.radius)
    metric = property(lambda self: self.config.metric)
    top_k = property(lambda self: self.config.top_k)
    impl = property(lambda self: self.config.impl)

    @property
    def grid(self):
        """The patch grid this layer attends over now: (rows, cols)."""
        return self.patch_grid.value

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.detach().exp()

    def _weights(self, q, k, attn_mask=None, is_causal=False) -> torch.Tensor:
        return local_weights_2d(q, k, self.log_sigma, self.patch_grid.value, self.radius, self.metric, self.top_k,
                                self.num_prefix_tokens, attn_mask, is_causal)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, H, N, N) fp32 weights of this layer for the input x (rows sum to 1)."""
        q, k, _ = self._split_qkv(x)
        return self._weights(q, k)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        q, k, v = self._split_qkv(x)
        if self.training and self.attn_drop.p > 0:
            out = self._weighted_values(self._weights(q, k, attn_mask, is_causal), v)
        else:
            out = local_attention_2d(q, k, v, self.log_sigma, self.patch_grid.value, self.radius, self.metric,
                                     self.top_k, self.num_prefix_tokens, self.impl, attn_mask, is_causal)
        return self._merge(out)

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, radius={self.radius}, metric={self.metric!r}, top_k={self.top_k}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, impl={self.impl!r}"
        )


class StandardAttention(_QKVAttention):
    """Global softmax self-attention, the twin of ``LocalKrauseAttention2d`` (same
    projections, no Krause settings). The vision models use timm's own ``Attention``;
    this one serves the core's ``build_attention("vision")`` pairs."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.scale = self.head_dim**-0.5

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, H, N, N) fp32 softmax weights for the input x."""
        q, k, _ = self._split_qkv(x)
        return softmax_weights(q, k, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_qkv(x)
        drop = self.attn_drop.p if self.training else 0.0
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=drop))


def softmax_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense (B, H, N, N) fp32 softmax(q k^T * scale): the weights a softmax attention layer applies."""
    return torch.softmax((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1)


def stock_attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Weights of timm's stock ViT ``Attention`` (fused qkv, optional q/k norms) for its input x."""
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return softmax_weights(attn.q_norm(q), attn.k_norm(k), attn.scale)
