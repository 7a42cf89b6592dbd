"""The float64 Krause oracle the kernel tests compare every implementation with."""

from __future__ import annotations

import torch

from krause.reference import repeat_kv


def dense_rule(q, k, v, log_sigma, cand, top_k, ties="low"):
    """Krause attention over cand (B|1, Tq, Tk) in float64, ties to the lower key index
    (``ties="high"``: the opposite rule, to show a test can tell them apart)."""
    h = q.shape[1]
    qd, kd, vd = q.double(), repeat_kv(k, h).double(), repeat_kv(v, h).double()
    dist = (qd.pow(2).sum(-1)[..., :, None] + kd.pow(2).sum(-1)[..., None, :] - 2 * qd @ kd.transpose(-1, -2))
    dist = dist.clamp_min(0.0)
    cand = cand[:, None].expand_as(dist)
    with torch.no_grad():
        far = dist.masked_fill(~cand, float("inf"))
        if ties == "low":
            order = far.sort(dim=-1, stable=True).indices
        else:
            order = far.shape[-1] - 1 - far.flip(-1).sort(dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(dist.shape[-1]).expand_as(order).contiguous())
        keep = cand & (rank < top_k)
    sigma_sq = torch.exp(2.0 * log_sigma.double())
    if sigma_sq.dim() == 1:
        sigma_sq = sigma_sq[:, None, None]
    logits = (-dist / (2.0 * sigma_sq)).masked_fill(~keep, float("-inf"))
    probs = torch.where(keep.any(-1, keepdim=True), torch.softmax(logits, -1), 0.0).nan_to_num(0.0)
    return probs @ vd, keep
