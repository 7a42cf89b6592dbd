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

How it is made fast (on CPU, where these ops are memory-bound):

- Top-k first. Softmax runs on the k kept distances only; the dense (*Q, M) probabilities
  and distances that are saved for the backward are written once, by a scatter. On the
  dense 2-D path (small grids), everything after the score matmul works on the few
  candidate slots of each patch query (see DenseNeighbourhood), with a vectorised
  rank count instead of torch.topk (whose cost is per row, not per element).
- Chunks. Work proceeds a few heads, or one head and a range of queries, at a time (see
  neighbourhoods.CHUNK_SCORES), so the score tensors and the keys they read stay in cache
  and no large temporary is ever allocated (large allocations cost page faults on every
  call); results are written straight into the output tensors, products run on strided
  views of the keys (no gathered copies).
- Threads. The engine never changes thread settings: each op uses torch's intra-op
  threads (a benchmark that wants single-threaded timing calls torch.set_num_threads).
- In place. The band reads its keys where they are (no padded copies), and the backward
  accumulates dk and dv straight into their output tensors.
"""

from __future__ import annotations

import torch

from .dense import sigma_coefficient
from .neighbourhoods import DenseNeighbourhood, chunk_budget

_INF = float("inf")


def _run_chunks(nbr, device: torch.device, bh: int, num_queries: int, body) -> None:
    """Calls body(chunk) for every chunk of heads [0, bh), in order, on the calling thread
    (each op uses torch's own intra-op threads)."""
    with torch.no_grad():  # the engine computes its own gradients
        for ch in nbr.chunks(range(bh), num_queries, chunk_budget(device)):
            body(ch)


def sigma_coef(log_sigma: torch.Tensor, num_heads: int, extra_dims: int) -> torch.Tensor:
    """c = 1 / (2 sigma^2) as a (1, H or 1, 1, ...) tensor for broadcasting over (B, H, *Q, M)."""
    return sigma_coefficient(log_sigma).reshape(1, -1, *([1] * extra_dims))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 over the last dim, as the reference computes it (x.pow(2).sum(-1)), a few
    heads at a time so the squares never need a large temporary."""
    out = x.new_empty(x.shape[:-1])
    per = max(1, (1 << 20) // max(1, x[0].numel()))
    for h0 in range(0, x.shape[0], per):
        torch.sum(x[h0 : h0 + per].pow(2), -1, out=out[h0 : h0 + per])
    return out


def _chunk_coef(c: torch.Tensor, heads, ndim: int) -> torch.Tensor:
    """Coefficients of the chunk's heads, shaped to broadcast over its ndim-dimensional
    scores: per (B*H) head -> a scalar (one head) or (bhc, 1, ...); per query row
    (B*Hkv, G*C), the grouped band -> (1, G*C, 1) or (bhc, 1, G*C, 1)."""
    per_row = c.dim() == 2
    c = c[heads]
    if not per_row:
        return c if c.dim() == 0 else c.view(-1, *([1] * (ndim - 1)))
    lead = c.shape[:-1]
    return c.view(*lead, *([1] * (ndim - 2 - len(lead))), c.shape[-1], 1)


def _coef_per_chunk_head(nbr, coef: torch.Tensor, b: int, heads_in_layout: int) -> torch.Tensor:
    """The (1, H or 1, ...) coefficients as (B*H,) per head, or per query row (B*Hkv, G*C)
    when the neighbourhood folds a GQA group into its rows."""
    group = getattr(nbr, "group", 1)
    c = coef.reshape(-1).expand(b, heads_in_layout * group).reshape(-1)
    return c if group == 1 else nbr.row_heads(c)


def _add_dcoef(nbr, dcoef: torch.Tensor, ch, dl: torch.Tensor, dst: torch.Tensor) -> None:
    """dcoef[heads] += -sum dlogit * dist (per head; per row then per head when grouped)."""
    heads = ch.heads
    if dcoef.dim() == 1:
        if ch.one_head:
            dcoef[heads] -= (dl * dst).sum()
        else:
            dcoef[heads] += _dcoef(dl, dst)
        return
    rows = -(dl * dst).sum(-1)  # (nbc, G*C) or (bhc, nbc, G*C)
    rows = rows.sum(-2)
    dcoef[heads] += nbr.head_sums(rows)


def _query_count(q: torch.Tensor) -> int:
    n = 1
    for s in q.shape[2:-1]:
        n *= s
    return n


def _select(d, top_k: int, coef, p_out, d_out) -> None:
    """From distances d (..., M) (+inf on invalid slots) to the saved probabilities and
    distances: zero outside the kept top-k, distances clamped at 0."""
    if top_k >= d.shape[-1]:
        d.clamp_min_(0.0)
        invalid = d == _INF  # their logits set to -inf: inf * -coef is NaN once coef underflows to 0
        logits = (d * -coef).masked_fill_(invalid, -_INF)
        p_out.copy_(torch.softmax(logits, dim=-1).nan_to_num_(0.0))  # NaN rows: no valid candidate
        d_out.copy_(d.masked_fill_(invalid, 0.0))
        return
    vals, idx = d.topk(top_k, dim=-1, largest=False, sorted=False)
    vals.clamp_min_(0.0)
    # Fewer valid candidates than top_k: the extra (infinite) ones get weight 0; zeroing
    # their distance keeps 0 * inf out of the backward.
    extra = vals == _INF
    p = _softmax_(vals * -coef, -1, extra)
    vals.masked_fill_(extra, 0.0)
    p_out.zero_().scatter_(-1, idx, p)
    d_out.zero_().scatter_(-1, idx, vals)


def _softmax_(x: torch.Tensor, dim: int, drop: torch.Tensor | None = None) -> torch.Tensor:
    """In-place softmax along a short dimension, over the entries not in ``drop`` (set to
    -inf here, whatever x holds there: inf * -coef is NaN once coef underflows to 0); every
    row must keep an entry (each query is always one of its own candidates, or be all
    dropped, and then comes out all zero). torch.softmax vectorises along the softmax
    dimension, slow when it has a handful of entries. Shifted logits are clamped at -80
    before exp (exp of -inf or of numbers that underflow takes a slow path): a kept entry
    more than 80 below the row's maximum gets weight e^-80 / sum ~ 1e-35 instead of a
    smaller number or 0."""
    if drop is not None:
        x.masked_fill_(drop, -_INF)
    x.sub_(x.amax(dim, keepdim=True)).clamp_min_(-80.0).exp_()
    if drop is not None:
        x.masked_fill_(drop, 0.0)
    return x.div_(x.sum(dim, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny))


def _rank_keep(d: torch.Tensor, top_k: int) -> torch.Tensor:
    """d (B, M, R), slot-major: True for the top_k smallest of the M slots of each (B, r),
    ties to the lower slot. Slot m is kept when fewer than top_k slots beat it; O(M^2)
    comparisons of contiguous vectors, much faster than torch.topk's per-row selection
    when M is small."""
    m = d.shape[1]
    beaten = torch.zeros(d.shape, dtype=torch.int8, device=d.device)
    for j in range(m):
        dj = d[:, j : j + 1]
        beaten[:, j + 1 :] += dj <= d[:, j + 1 :]
        beaten[:, :j] += dj < d[:, :j]
    return beaten < top_k


def _dl_inplace(dp, p):
    """dlogit = p (dp - sum_m p dp), in dp's buffer."""
    return dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)


def _dcoef(dl, dst) -> torch.Tensor:
    """-sum dlogit * dist per leading index (torch.sum's pairwise summation: the terms cancel)."""
    return -(dl * dst).reshape(dl.shape[0], -1).sum(1)


# --------------------------------------------------------------------------- dense
def _dense_forward(nbr, q, k, v, coef, top_k):
    b, h, nq, d = q.shape
    bh, nk = b * h, k.shape[2]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    c = coef.expand(b, h, *coef.shape[2:]).reshape(bh)
    out = q.new_empty(bh, nq, d)
    probs = q.new_empty(bh, nq, nk)
    dist = q.new_empty(bh, nq, nk)
    f = nq if nbr.cand_idx is None else nbr.full_rows

    def body(ch):
        hs = ch[0]
        q_c, k_c, cc = qf[hs], kf[hs], c[hs].view(-1, 1, 1)
        q_sq, k_sq = q_c.pow(2).sum(-1, keepdim=True), k_c.pow(2).sum(-1)[:, None, :]
        dots = torch.bmm(q_c, k_c.transpose(1, 2))
        # distances (|q|^2 + |k|^2) - 2 q.k (the reference's rounding), dense for the
        # first f rows, for the candidate slots only in the compact rows
        p_out, d_out = probs[hs], dist[hs]
        if f:
            head = torch.add(q_sq[:, :f], k_sq).sub_(dots[:, :f], alpha=2.0)
            if nbr.full_invalid is not None:
                head.masked_fill_(nbr.full_invalid, _INF)
            _select(head, top_k, cc, p_out[:, :f], d_out[:, :f])
        if f < nq:  # compact rows, slot-major (bhc, Mc, Nq - F)
            n_h, mc = dots.shape[0], nbr.cand_valid.shape[0]
            pick = nbr.flat_idx
            k_sq_c = k_sq[:, 0].index_select(1, nbr.key_idx).view(n_h, mc, nq - f)
            dc = k_sq_c.add_(q_sq[:, f:, 0].unsqueeze(1))
            dc.sub_(dots.view(n_h, -1).index_select(1, pick).view(n_h, mc, nq - f), alpha=2.0)
            dc.masked_fill_(nbr.cand_invalid, _INF)
            drop = ~_rank_keep(dc, top_k) if top_k < mc else nbr.cand_invalid
            drop = drop | nbr.cand_invalid
            dc.clamp_min_(0.0)
            p = _softmax_(dc * -cc, 1, drop)
            p_out[:, f:].zero_()
            p_out.view(n_h, -1).index_copy_(1, nbr.flat_idx, p.view(n_h, -1))
            d_out[:, f:].zero_()
            d_out.view(n_h, -1).index_copy_(1, nbr.flat_idx, dc.masked_fill_(drop, 0.0).view(n_h, -1))
        torch.bmm(p_out, vf[hs], out=out[hs])

    _run_chunks(nbr, q.device, bh, nq, body)
    return out.view(b, h, nq, d), probs.view(b, h, nq, nk), dist.view(b, h, nq, nk)


def _dense_backward(nbr, grad_out, q, k, v, coef, probs, dist):
    b, h, nq, d = q.shape
    bh = b * h
    qf, kf, vf, g = _flat(q), _flat(k), _flat(v), _flat(grad_out)
    probs, dist = _flat(probs), _flat(dist)
    c = coef.expand(b, h, *coef.shape[2:]).reshape(bh)
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    dcoef = q.new_zeros(bh)
    f = nq if nbr.cand_idx is None else nbr.full_rows

    def body(ch):
        hs = ch[0]
        q_c, k_c, g_c, cc = qf[hs], kf[hs], g[hs], c[hs].view(-1, 1, 1)
        p, dst = probs[hs], dist[hs]
        torch.bmm(p.transpose(1, 2), g_c, out=dv[hs])
        dd = torch.bmm(g_c, vf[hs].transpose(1, 2))  # dp, turned into ddist in place
        rowsum = dd.new_empty(dd.shape[0], nq, 1)
        if f:
            dl = _dl_inplace(dd[:, :f], p[:, :f])
            dcoef[hs] += _dcoef(dl, dst[:, :f])
            dl.mul_(-cc).masked_fill_(dst[:, :f] <= 0.0, 0.0)
            torch.sum(dl, -1, keepdim=True, out=rowsum[:, :f])
        if f < nq:  # compact rows, slot-major (bhc, Mc, Nq - F)
            n_h, mc = dd.shape[0], nbr.cand_valid.shape[0]

            def compact(x):
                return x.reshape(n_h, -1).index_select(1, nbr.flat_idx).view(n_h, mc, nq - f)

            dst_c, p_c, dl = compact(dst), compact(p), compact(dd)
            dl.sub_((dl * p_c).sum(1, keepdim=True)).mul_(p_c)
            dcoef[hs] += _dcoef(dl, dst_c)
            dl.mul_(-cc).masked_fill_(dst_c <= 0.0, 0.0)
            torch.sum(dl, 1, out=rowsum[:, f:, 0])
            dd[:, f:].zero_()
            dd.view(n_h, -1).index_copy_(1, nbr.flat_idx, dl.view(n_h, -1))
        # dq = 2 q sum_m dd - 2 dd k;  dk = 2 k sum_i dd - 2 dd^T q
        torch.bmm(dd, k_c, out=dq[hs]).mul_(-2.0).addcmul_(q_c, rowsum, value=2.0)
        colsum = dd.sum(-2)[..., None]
        torch.bmm(dd.transpose(1, 2), q_c, out=dk[hs]).mul_(-2.0).addcmul_(k_c, colsum, value=2.0)

    _run_chunks(nbr, q.device, bh, nq, body)
    dcoef = dcoef.view(b, h).sum(0)
    return dq.view(*q.shape), dk.view(*k.shape), dv.view(*v.shape), dcoef


# --------------------------------------------------------------------------- band / grid
def forward(nbr, q, k, v, coef, top_k: int, key_valid: torch.Tensor | None = None):
    """q in the neighbourhood's query layout (B, H, *Q, D) fp32; k, v (B, H, Nk, D) fp32;
    key_valid: optional (B, Nk) bool, False = padding (never a candidate).

    Returns (out (B, H, *Q, D), probs, dist) with probs/dist (B, H, *Q, M) saved for
    backward: zero outside the kept top-k; dist clamped at 0.
    """
    if isinstance(nbr, DenseNeighbourhood):
        if key_valid is not None:
            raise ValueError("key_valid: the dense neighbourhood takes its padding in its candidate mask")
        return _dense_forward(nbr, q, k, v, coef, top_k)
    b, h = q.shape[:2]  # h: the key/value heads when the layout folds a GQA group into rows
    bh, m = b * h, nbr.num_slots
    qf, kf = _flat(q), _flat(k)
    ksq = _sq_norms(kf)
    if key_valid is not None:  # a padded key's distance is +inf: an invalid slot, like one outside the band
        ksq.view(b, h, -1).masked_fill_(~key_valid[:, None, :], _INF)
    kbuf, ksq, vbuf = nbr.keys(kf), nbr.key_scalars(ksq), nbr.keys(_flat(v))
    c = _coef_per_chunk_head(nbr, coef, b, h)
    out = q.new_empty(bh, *q.shape[2:])
    probs = q.new_empty(bh, *q.shape[2:-1], m)
    dist = q.new_empty(bh, *q.shape[2:-1], m)
    k_eff = top_k if top_k < nbr.num_candidates else m  # all valid candidates kept

    def body(ch):
        q_c = qf[ch]
        d = nbr.distances(ch, q_c, q_c.pow(2).sum(-1, keepdim=True), kbuf, ksq)  # +inf on invalid slots
        _select(d, k_eff, _chunk_coef(c, ch[0], d.dim()), probs[ch], dist[ch])
        nbr.gather(ch, probs[ch], vbuf, out[ch])

    _run_chunks(nbr, q.device, bh, _query_count(q), body)
    shape = (b, h, *q.shape[2:-1])
    return out.view(*shape, q.shape[-1]), probs.view(*shape, m), dist.view(*shape, m)


def backward(nbr, grad_out, q, k, v, coef, probs, dist):
    """Returns dq (query layout), dk, dv (B, H, Nk, D) and dcoef (H,) — all fp32.

    Rows that kept nothing (no candidate, or NaN rows: see krause.nonfinite) pass no
    gradient: their upstream gradient, possibly NaN, is read as 0."""
    grad_out = grad_out.masked_fill(probs.amax(-1, keepdim=True) == 0, 0.0)
    if isinstance(nbr, DenseNeighbourhood):
        return _dense_backward(nbr, grad_out, q, k, v, coef, probs, dist)
    b, h = q.shape[:2]
    bh, d = b * h, q.shape[-1]
    qf, kf, g = _flat(q), _flat(k), _flat(grad_out)
    kbuf, vbuf = nbr.keys(kf), nbr.keys(_flat(v))
    probs, dist = _flat(probs), _flat(dist)
    c = _coef_per_chunk_head(nbr, coef, b, h)
    dq = q.new_empty(bh, *q.shape[2:])
    dk_acc = nbr.new_acc(bh, (d,), q)  # sum_i dd q_i per key
    colsum = nbr.new_acc(bh, (), q)  # sum_i dd per key
    dv_acc = nbr.new_acc(bh, (d,), q)
    group = getattr(nbr, "group", 1)
    dcoef = q.new_zeros(bh) if group == 1 else q.new_zeros(bh, group)

    def body(ch):
        heads = ch[0]
        p, dst, g_c, q_c = probs[ch], dist[ch], g[ch], qf[ch]
        nbr.scatter_add_(ch, p, g_c, dv_acc)
        dl = _dl_inplace(nbr.dots_chunk(ch, g_c, vbuf), p)
        _add_dcoef(nbr, dcoef, ch, dl, dst)
        dd = dl.mul_(-_chunk_coef(c, heads, dl.dim())).masked_fill_(dst <= 0.0, 0.0)  # no gradient through the clamp
        # dq = 2 q sum_m dd - 2 sum_m dd k
        dq_c = dq[ch]
        nbr.gather(ch, dd, kbuf, dq_c)
        dq_c.mul_(-2.0).addcmul_(q_c, dd.sum(-1, keepdim=True), value=2.0)
        # dk = 2 k sum_i dd - 2 sum_i dd q
        nbr.scatter_add_(ch, dd, q_c, dk_acc)
        nbr.scatter_colsum_(ch, dd, colsum)

    _run_chunks(nbr, q.device, bh, _query_count(q), body)
    dk = nbr.read_acc(dk_acc).mul_(-2.0).addcmul_(kf, nbr.read_acc(colsum)[..., None], value=2.0)
    dv = nbr.read_acc(dv_acc)
    dcoef = dcoef.view(b, h * group).sum(0)
    return dq.view(*q.shape), dk.view(b, h, *dk.shape[1:]), dv.view(b, h, *dv.shape[1:]), dcoef
