"""Dense reference implementations of Krause attention.

Obviously correct and O(N^2) in time and memory: every query scores every key, the
candidate set and the top-k are applied as masks, and autograd does the backward.
Tests hold the fast implementations equal to these.
"""

from __future__ import annotations

import torch

from . import _validation as V
from .masks import causal_window_mask, grid_candidate_mask


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D); query head h reads key/value head h // (H // Hkv)."""
    b, hkv, n, d = x.shape
    if hkv == num_heads:
        return x
    return x[:, :, None].expand(b, hkv, num_heads // hkv, n, d).reshape(b, num_heads, n, d)


def krause_attention_dense(q, k, v, log_sigma, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Krause attention over an explicit (N, N) boolean candidate mask.

    s_ij = -||q_i - k_j||^2 / (2 sigma^2); the top_k nearest candidates survive; softmax over them.
    """
    num_heads = q.shape[1]
    k = repeat_kv(k, num_heads)
    v = repeat_kv(v, num_heads)
    qf, kf = q.float(), k.float()
    dist = qf.pow(2).sum(-1)[..., :, None] + kf.pow(2).sum(-1)[..., None, :] - 2.0 * qf @ kf.transpose(-1, -2)
    dist = dist.clamp_min(0.0)
    far = dist.masked_fill(~candidates, float("inf"))
    kk = min(top_k, candidates.shape[-1])
    nearest = far.topk(kk, dim=-1, largest=False).indices
    keep = torch.zeros_like(far, dtype=torch.bool).scatter_(-1, nearest, True) & candidates
    sigma_sq = torch.exp(2.0 * log_sigma.float())
    if sigma_sq.dim() == 1:
        sigma_sq = sigma_sq[:, None, None]
    logits = (-dist / (2.0 * sigma_sq)).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs @ v.float()).to(v.dtype)


def causal_krause_attention_reference(q, k, v, log_sigma, window: int, top_k: int) -> torch.Tensor:
    V.check_positive_int("window", window)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    return krause_attention_dense(q, k, v, log_sigma, causal_window_mask(n, window, q.device), top_k)


def local_krause_attention_2d_reference(
    q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    V.check_nonnegative_int("radius", radius)
    V.check_metric(metric)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    grid = V.check_grid(grid, n, num_prefix_tokens)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    mask = grid_candidate_mask(grid, radius, metric, num_prefix_tokens, q.device)
    return krause_attention_dense(q, k, v, log_sigma, mask, top_k)
