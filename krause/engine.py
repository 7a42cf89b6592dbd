"""Forward and backward of Krause attention over any neighbourhood (see neighbourhoods.py).

The backward is written out by hand rather than left to autograd so the fast ops can
be registered as opaque custom ops with their own FLOP formulas (autograd cannot run
inside a custom-op kernel). With

    dist_im = |q_i|^2 + |k_n|^2 - 2 q_i.k_n       (n = nbr(i, m)), clamped at 0
    logit_im = -c_h dist_im on the kept top-k, -inf elsewhere,   c_h = 1 / (2 sigma_h^2)
    p_i = softmax(logit_i),   out_i = sum_m p_im v_n

the gradients are

    dp_im     = g_i . v_n
    dv_n     += p_im g_i
    dlogit_im = p_im (dp_im - sum_m' p_im' dp_im')
    ddist_im  = -c_h dlogit_im   (0 where the clamp was active)
    dq_i      = 2 q_i sum_m ddist_im - 2 sum_m ddist_im k_n
    dk_n     += 2 k_n ddist_im - 2 ddist_im q_i
    dc_h      = -sum dlogit_im dist_im

Everything is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch


def sigma_coef(log_sigma: torch.Tensor, num_heads: int, extra_dims: int) -> torch.Tensor:
    """c = 1 / (2 sigma^2) as a (1, H or 1, 1, ...) tensor for broadcasting over (B, H, *Q, M)."""
    c = 0.5 * torch.exp(-2.0 * log_sigma.float())
    c = c.reshape(1, -1, *([1] * extra_dims))
    return c


def forward(nbr, q, k, v, coef, top_k: int):
    """q in the neighbourhood's query layout (B, H, *Q, D) fp32; k, v (B, H, Nk, D) fp32.

    Returns (out (B, H, *Q, D), probs, dist) with probs/dist (B, H, *Q, M) saved for backward.
    """
    dots = nbr.dots(q, k)
    q_sq = q.pow(2).sum(-1, keepdim=True)
    k_sq = nbr.gather_scalar(k.pow(2).sum(-1))
    dist = (q_sq + k_sq - 2.0 * dots).clamp_min_(0.0)
    valid = nbr.valid
    if valid is not None:
        dist = dist.masked_fill(~valid, float("inf"))
    if top_k < nbr.num_candidates:
        nearest = dist.topk(top_k, dim=-1, largest=False, sorted=False).indices
        keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, nearest, True)
        if valid is not None:
            keep &= valid
    else:
        keep = valid if valid is not None else torch.ones_like(dist, dtype=torch.bool)
    # Clearing dropped slots to 0 keeps 0 * inf out of the backward.
    dist = dist.masked_fill(~keep, 0.0)
    logits = (dist * -coef).masked_fill_(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = nbr.gather(probs, v)
    return out, probs, dist


def backward(nbr, grad_out, q, k, v, coef, probs, dist):
    """Returns dq (query layout), dk, dv (B, H, Nk, D) and dcoef (H or 1,) — all fp32."""
    dp = nbr.dots(grad_out, v)
    dv = nbr.scatter(probs, grad_out)
    dlogit = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    reduce_dims = [d for d in range(dlogit.dim()) if d != 1]
    dcoef = -(dlogit * dist).sum(dim=reduce_dims)
    ddist = dlogit * -coef
    ddist = ddist.masked_fill_(dist <= 0.0, 0.0)
    dq = 2.0 * q * ddist.sum(-1, keepdim=True) - 2.0 * nbr.gather(ddist, k)
    dk = 2.0 * k * nbr.scatter_scalar(ddist)[..., None] - 2.0 * nbr.scatter(ddist, q)
    return dq, dk, dv, dcoef
