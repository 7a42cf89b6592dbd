"""The float64 Krause oracle the kernel tests compare every implementation with."""

from __future__ import annotations

import torch

from krause.reference import repeat_kv


def window_candidates(b, tq, tk, window, key_padding_mask=None):
    """(B, Tq, Tk) bool: end-aligned query i (position Tk - Tq + i) sees keys p - W < j <= p
    that ``key_padding_mask`` (B, Tk) does not mark as padding (built here, not by the library
    under test)."""
    pos = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None, :]
    cand = ((j <= pos) & (j > pos - window))[None].expand(b, tq, tk)
    return cand if key_padding_mask is None else cand & key_padding_mask.cpu()[:, None, :]


def sorted_candidate_distances(q, k, cand):
    """(B, H, Tq, Tk) float64 on the CPU: each query's candidate distances, ascending (inf past them)."""
    qd, kd = q.detach().cpu().double(), repeat_kv(k.detach().cpu(), q.shape[1]).double()
    dist = (qd.pow(2).sum(-1)[..., :, None] + kd.pow(2).sum(-1)[..., None, :] - 2 * qd @ kd.transpose(-1, -2))
    return dist.clamp_min(0.0).masked_fill(~cand[:, None].expand_as(dist), float("inf")).sort(-1).values


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
