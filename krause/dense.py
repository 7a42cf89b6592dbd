"""The one dense Krause formula (docs/method.md).

    dist_ij = max(0, |q_i|^2 + |k_j|^2 - 2 q_i . k_j)     in fp32, whatever the input dtype
    S_i     = the min(top_k, |C_i|) candidates of query i with the smallest dist
    a_ij    = softmax over j in S_i of -c_h dist_ij,       c_h = 1 / (2 sigma_h^2)

Everything that needs Krause weights densely calls these functions: the reference ops,
the modules' attention maps, the decoding step, the Swin window logits and the flex
top-k threshold. A query with no candidate gets all-zero weights.

Non-finite inputs (``krause.nonfinite``): a query row whose q, or the key or value of one
of its candidates, holds a NaN or an infinity gets NaN weights and a NaN output row; the
other rows are computed from the finite entries only (non-finite ones read as 0).
"""

from __future__ import annotations

import torch

from .nonfinite import finite_or_zero, nonfinite_rows

_INF = float("inf")


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D); query head h reads key/value head h // (H // Hkv)."""
    b, hkv, n, d = x.shape
    if hkv == num_heads:
        return x
    return x[:, :, None].expand(b, hkv, num_heads // hkv, n, d).reshape(b, num_heads, n, d)


def sigma_coefficient(log_sigma: torch.Tensor) -> torch.Tensor:
    """c = 1 / (2 sigma^2) = exp(-2 log_sigma) / 2, in fp32, same shape as log_sigma."""
    return 0.5 * torch.exp(-2.0 * log_sigma.float())


def head_coefficient(log_sigma: torch.Tensor) -> torch.Tensor:
    """``sigma_coefficient`` shaped (H or 1, 1, 1) to broadcast over (B, H, Nq, Nk) scores."""
    return sigma_coefficient(log_sigma).reshape(-1, 1, 1)


def distances_from_parts(q_sq: torch.Tensor, k_sq: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """|q|^2 + |k|^2 - 2 q.k clamped at 0 (the expanded form can round slightly below 0),
    from fp32 parts that broadcast against each other (dense or gathered candidates)."""
    return (q_sq + k_sq - 2.0 * dots).clamp_min(0.0)


def squared_distances(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp32 |q_i - k_j|^2 (..., Nq, Nk). k must already have q's heads (see ``repeat_kv``)."""
    qf, kf = q.float(), k.float()
    return distances_from_parts(qf.pow(2).sum(-1)[..., :, None], kf.pow(2).sum(-1)[..., None, :],
                                qf @ kf.transpose(-1, -2))


def top_k_keep(dist: torch.Tensor, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean (..., Nq, Nk): the min(top_k, #candidates) nearest candidates of each row."""
    far = dist.masked_fill(~candidates, _INF)
    kk = min(top_k, far.shape[-1])
    nearest = far.topk(kk, dim=-1, largest=False).indices
    return torch.zeros_like(far, dtype=torch.bool).scatter_(-1, nearest, True) & candidates


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` over the ``keep`` entries of each row; rows keeping nothing
    are all zero. Dropped entries never enter the arithmetic (no inf * 0 in autograd)."""
    logits = logits.masked_fill(~keep, -_INF)
    row_max = logits.amax(-1, keepdim=True).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    e = torch.exp(logits - row_max.detach())
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def weights_from_distances(dist: torch.Tensor, candidates: torch.Tensor, coef: torch.Tensor, top_k: int) -> torch.Tensor:
    """Krause weights from fp32 squared distances: the min(top_k, #candidates) nearest
    candidates of each row, softmaxed by -coef * dist (coef broadcastable to dist)."""
    candidates = candidates.expand_as(dist)
    keep = top_k_keep(dist, candidates, top_k)
    return masked_softmax(dist.masked_fill(~keep, 0.0) * -coef, keep)


def krause_weights(q, k, log_sigma: torch.Tensor, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dense Krause attention weights (B, H, Nq, Nk) in fp32.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); log_sigma: a () or (H,) tensor; ``candidates``:
    bool broadcastable to (B, H, Nq, Nk). O(Nq Nk) memory: for references, analysis,
    decoding against a short window and small inputs.
    """
    h = q.shape[1]
    dist = squared_distances(finite_or_zero(q), repeat_kv(finite_or_zero(k), h))
    probs = weights_from_distances(dist, candidates, head_coefficient(log_sigma), top_k)
    return probs.masked_fill(poisoned_rows(candidates, q, k)[..., None], float("nan"))


def poisoned_rows(candidates: torch.Tensor, q: torch.Tensor, *keyed: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq) bool: rows with a candidate whose q row, or whose candidates' rows of any
    of ``keyed`` (k, v: (B, Hkv, Nk, D)), hold a NaN or an infinity (the NaN policy)."""
    h = q.shape[1]
    bad_keys = torch.zeros((), dtype=torch.bool, device=q.device)
    for x in keyed:
        bad_keys = bad_keys | repeat_kv(nonfinite_rows(x)[..., None], h)[..., 0]
    return (candidates & (nonfinite_rows(q)[..., :, None] | bad_keys[..., None, :])).any(-1)


def krause_attention_grouped(q, k, v, log_sigma: torch.Tensor, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """``krause_attention_dense`` for grouped-query attention without repeating k and v:
    the G = H / Hkv query heads of a key/value head are scored against it together.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D); ``candidates`` bool broadcastable to
    (B, 1, Nq, Nk) (the same for every head). Returns (B, H, Nq, D) in q's dtype.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = h // hkv
    bad = poisoned_rows(candidates, q, k, v)
    q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
    dist = squared_distances(q.reshape(b, hkv, group * nq, d), k).view(b, hkv, group, nq, nk)
    coef = sigma_coefficient(log_sigma)
    coef = coef.reshape(1, hkv, group, 1, 1) if coef.dim() == 1 else coef
    candidates = candidates.expand(b, 1, nq, nk)[:, :, None]  # (B, 1, 1, Nq, Nk): shared by every head
    probs = weights_from_distances(dist, candidates, coef, top_k)
    out = (probs @ v.float()[:, :, None]).reshape(b, h, nq, d)
    return out.masked_fill(bad[..., None], float("nan")).to(q.dtype)


def krause_attention_dense(q, k, v, log_sigma: torch.Tensor, candidates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Krause attention over an explicit candidate mask: ``krause_weights`` @ v, in q's dtype
    as every implementation of the ops (NaN rows by the NaN policy, see the module docstring)."""
    bad = poisoned_rows(candidates, q, k, v)
    probs = krause_weights(finite_or_zero(q), finite_or_zero(k), log_sigma, candidates, top_k)
    out = probs @ repeat_kv(finite_or_zero(v), q.shape[1]).float()
    return out.masked_fill(bad[..., None], float("nan")).to(q.dtype)


def causal_candidates(num_queries: int, num_keys: int, window: int, key_padding_mask=None, device=None):
    """Candidate mask of end-aligned causal-window attention: query i sits at position
    p = Nk - Nq + i and sees keys p - window < j <= p that are not padding.

    Returns (Nq, Nk) bool, or (B, 1, Nq, Nk) with a (B, Nk) ``key_padding_mask``.
    """
    pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    j = torch.arange(num_keys, device=device)[None, :]
    mask = (j <= pos) & (j > pos - window)
    if key_padding_mask is not None:
        mask = mask[None, None] & key_padding_mask[:, None, None, :].to(mask.device)
    return mask
