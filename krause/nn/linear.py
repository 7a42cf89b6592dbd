"""Causal linear attention with elu+1 feature maps (Katharopoulos et al., 2020), the LARM
baseline of the pixel models (docs/method.md): same q/k/v/o projections as the Krause and
softmax modules (``CausalProjections``), no Krause settings; decodes with its recurrent
state (constant size whatever the position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ..dense import repeat_kv
from .causal import CausalProjections

LINEAR_EPS = 1e-6
LINEAR_CHUNK = 64


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def causal_linear_attention(q, k, v, state=None, chunk: int = LINEAR_CHUNK, eps: float = LINEAR_EPS):
    """Causal linear attention, chunked: exact prefix sums at chunk granularity plus a
    masked quadratic term inside each chunk, so memory is O(T (C + D) + (T/C) D^2)
    instead of the O(T D^2) of a plain cumulative sum.

    out_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps),  S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T,
    z_i = z_0 + sum_{j<=i} phi(k_j),  phi = elu + 1, all in fp32.

    q (B, H, T, D); k, v (B, Hkv, T, D); ``state`` = (S_0 (B, H, D, D), z_0 (B, H, D)) or
    None for an empty prefix. Returns (out (B, H, T, D) in q's dtype, (S_T, z_T)).
    """
    b, h, t, d = q.shape
    qf = elu_feature_map(q.float())
    kf = elu_feature_map(repeat_kv(k, h).float())
    vf = repeat_kv(v, h).float()
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero features on the padded keys: they add nothing to any sum
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
    qc, kc, vc = (x.reshape(b, h, n, c, -1) for x in (qf, kf, vf))
    kv = kc.transpose(-1, -2) @ vc  # (B, H, n, D, D) per-chunk sums of phi(k) v^T
    ks = kc.sum(-2)  # (B, H, n, D)
    s_before = kv.cumsum(2) - kv  # exclusive prefix over chunks
    z_before = ks.cumsum(2) - ks
    if state is not None:
        s0, z0 = state
        s_before = s_before + s0[:, :, None]
        z_before = z_before + z0[:, :, None]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, n, C, C)
    num = qc @ s_before + scores @ vc
    den = (qc * z_before[:, :, :, None, :]).sum(-1) + scores.sum(-1)
    out = num / (den[..., None] + eps)
    out = out.reshape(b, h, n * c, d)[:, :, :t].to(q.dtype)
    s_end = s_before[:, :, -1] + kv[:, :, -1]
    z_end = z_before[:, :, -1] + ks[:, :, -1]
    return out, (s_end, z_end)


class CausalLinearAttention(CausalProjections):
    """Causal linear attention with elu+1 features; the projections of the Krause and
    softmax modules, no Krause settings."""

    def __init__(self, dim, num_heads, num_kv_heads=None, *, bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if self.attn_drop:
            raise ValueError(f"attn_drop must be 0 for linear attention (weights are never formed), got {attn_drop}")

    def forward(self, x: torch.Tensor, cache: "LinearAttentionState | None" = None) -> torch.Tensor:
        q, k, v = self.project(x)
        if cache is None:
            out, _ = causal_linear_attention(q, k, v)
        else:
            out = cache.attend(q, k, v)
        return self.merge(out)

    def new_cache(self, batch_size: int, device=None, dtype=None, capacity: int | None = None) -> "LinearAttentionState":
        """The recurrent state (fp32, constant size: ``capacity`` does not matter)."""
        device, _ = self.cache_placement(device, dtype)
        from ..cache import LinearAttentionState  # transformers is imported on first use only

        return LinearAttentionState(batch_size, self.num_heads, self.head_dim, device)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, feature_map=elu+1"
