"""Krause attention on FlexAttention (``torch.nn.attention.flex_attention``): the fused CUDA path.

``krause.causal_krause_attention(..., impl="flex")`` and
``krause.local_krause_attention_2d(..., impl="flex")`` land here after argument checks.

How Krause attention is mapped onto FlexAttention
-------------------------------------------------
Scores. Softmax and top-k are both invariant to a per-query constant, so with
s_h = 1 / sigma_h^2

    -||q_i - k_j||^2 s_h / 2  =  s_h (q_i . k_j - |k_j|^2 / 2)  -  s_h |q_i|^2 / 2

and the kernel only needs u0_ij = q_i . k_j - |k_j|^2 / 2 (then the logit s_h u0_ij).
u0 is one plain dot product of augmented vectors (``scale=1``):

    q'_i = [q_i, 1, .., 1, 0...]      k'_j = [k_j, -p1_j, .., -pn_j, 0...]

where p1 + .. + pn = |k_j|^2 / 2 (fp32) split into n pieces of the kernel dtype (n = 1 for
fp32, 2 for fp16, 3 for bf16), so a 16-bit kernel sees |k|^2 to fp32 accuracy; q and k
enter unrounded, and the kernel's products accumulate in fp32. Autograd carries the
kernel's dk' back to k (including the |k|^2 term) with ordinary ops. The scale s_h is
applied by the score_mod from a gradient-free (H,) buffer; its gradient is recovered
outside the kernel from dL/ds_h = sum_i q'_i . dL/dq'_i / s_h (logits depend on s and q'
only through s q'; see ``_AttachScaleGrad``). No score_mod buffer requires grad: FlexAttention
(2.14) supports that, but its Triton backward scatters such gradients with one atomic add
per score element (onto H addresses for a per-head scale: slow and non-deterministic).
The price of the augmented vectors is a head dim of D + n, which the Triton kernel rounds
up to a power of two for the q.k products (D = 64 -> 128): roughly 1.5x the FLOPs of a
plain D-dim flex_attention call.

Candidates. The causal window ``i - W < j <= i`` is a ``BlockMask`` built directly from
the band's block structure (block-level tables only, no T x T mask is ever created) plus a
``mask_mod`` for the partial blocks, so whole blocks outside the band are skipped. The 2-D
neighbourhood is a ``mask_mod`` on grid coordinates (prefix queries see every key, every
query sees the prefix keys), turned into a ``BlockMask`` by ``create_block_mask``.

Top-k. Under ``no_grad`` the linear-time neighbourhoods of ``krause.neighbourhoods``
compute each query's candidate distances in fp32 (clamped at 0), and a per-query distance
threshold tau_i is placed halfway between the k-th and (k+1)-th smallest of them
(+inf where the query has at most top_k candidates). The score_mod drops (-> -inf) every
key with u0_ij < (|q_i|^2 - tau_i) / 2, i.e. with distance above tau_i. It is a score_mod,
not a mask_mod, because FlexAttention skips the mask_mod on "full" blocks. The halfway
threshold makes the selection robust to the rounding difference between the two ways of
computing a distance. Limitations of this path (the "fast" path has none of them):

- exact ties: candidates at exactly the k-th smallest distance are all kept, so a query
  can keep more than top_k keys (the reference keeps exactly top_k);
- near ties: if the k-th and (k+1)-th distances differ by less than fp32 rounding of the
  two distance computations, the kernel may keep the (k+1)-th candidate instead;
- fp32 inputs on CUDA: with TF32 matmuls enabled (``torch.backends.cuda.matmul.fp32_precision
  = "tf32"`` or ``set_float32_matmul_precision("high")``) the kernel's q.k is TF32 and
  near ties widen accordingly; the default ("highest"/"ieee") is exact fp32;
- the clamp of distances at 0 is not applied inside the kernel (it only matters for keys
  numerically identical to the query: their score and gradient are the unclamped ones);
- fp16: |k|^2 / 2 must stay below 65504 (|k| < ~362);
- a tiny sigma: the logits s u0 are absolute (not differences of distances), so once
  s |u0| nears ~1e9 (log sigma ~ -10 for unit-scale q, k) their fp32 rounding exceeds exp's
  range when the backward recomputes the probabilities: the gradients are inf/NaN (the
  forward is right).

Execution. On CUDA, ``flex_attention`` is compiled once per process
(``torch.compile(flex_attention, dynamic=False)``, created lazily) and runs the fused
Triton kernels with ``BACKEND="TRITON"`` (AUTO would pick the split-KV flex-decoding
kernel below 128 queries, e.g. for the 65-token CIFAR ViT, which is built for a few
queries against a long cache). ``dynamic=False`` compiles once per shape / window / grid;
past dynamo's recompile limit calls fall back to eager. Head dims are zero-padded to a
multiple of 16 (v to at least 16, Triton's minimum). Elsewhere it runs eagerly:
FlexAttention's unfused math implementation, which materialises the (N, N) scores and is
meant for tests. The public ``flex_attention`` refuses to differentiate on CPU
("FlexAttention does not support backward on CPU", raised by its ``_validate_device`` for
any input that requires grad, compiled or not), although the higher-order op underneath
has a generic dense backward (``sdpa_dense_backward``). When a gradient is needed off CUDA
we therefore call that op the way ``flex_attention`` itself does in eager mode
(``setup_compilation_env`` + ``torch.compile`` with the eager backend), skipping only the
device check. This uses private torch APIs (checked against torch 2.14) and exists so CPU
tests can hold the flex path's gradients to the reference.

Non-finite inputs (docs/api.md): the kernel runs on q, k, v with their NaN/Inf entries read
as 0, and the rows the NaN policy names (``krause.nonfinite``) are set to NaN afterwards (no
gradient passes through them).

NOTE: the CUDA path has not been run on a GPU by its author. The CPU tests run the same
augmented vectors, score_mod and mask_mods through the eager implementation (outputs and
gradients), check the causal BlockMask against ``create_block_mask``, and (slow test) run
the compiled inductor CPU kernel, which does skip blocks, with this BlockMask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .masks import grid_candidate_mask
from .neighbourhoods import BandNeighbourhood, DenseNeighbourhood, GridNeighbourhood
from .dense import distances_from_parts, repeat_kv, sigma_coefficient
from .nonfinite import causal_poisoned_rows, fill_nan_rows, grid_poisoned_rows, split_finite

# Up to this many tokens the 2-D threshold uses one dense masked (N, N) distance matrix
# instead of per-offset products (same cut-over as ops.DENSE_2D_MAX_TOKENS).
DENSE_2D_MAX_TOKENS = 128

# Sparse block size of the 2-D BlockMask (FlexAttention's default).
BLOCK_2D = 128

_compiled_flex = None


# --------------------------------------------------------------------------- kernels
def _get_compiled_flex():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _call_flex_hop(query, key, value, score_mod, block_mask_tuple, scale, kernel_options):
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop

    return flex_attention_hop(query, key, value, score_mod, block_mask_tuple, scale, kernel_options)


def _flex_eager_with_grad(q, k, v, score_mod, block_mask):
    """flex_attention's own eager path minus its CPU backward ban (see the module docstring)."""
    from torch._higher_order_ops.utils import setup_compilation_env
    from torch.nn.attention.flex_attention import _apply_kernel_options

    kernel_options = _apply_kernel_options(q, k, v, False, None)
    with setup_compilation_env() as backend:
        fn = torch.compile(_call_flex_hop, backend=backend, fullgraph=True)
        out, _lse, _max = fn(q, k, v, score_mod, block_mask.as_tuple(), 1.0, kernel_options)
    return out


def _run_flex(q, k, v, score_mod, block_mask):
    """q (B, H, N, E), k (B, Hkv, N, E), v (B, Hkv, N, Dv), all one dtype; scale 1."""
    if q.device.type == "cuda":
        return _get_compiled_flex()(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=1.0,
            enable_gqa=True,
            kernel_options={"BACKEND": "TRITON"},
        )
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        return _flex_eager_with_grad(q, k, v, score_mod, block_mask)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, enable_gqa=True)


def _kernel_dtype(q: torch.Tensor) -> torch.dtype:
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return q.dtype
    if q.dtype == torch.float64 and q.device.type != "cuda":
        return q.dtype
    return torch.float32


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# Columns used to carry |k|^2 / 2 in each kernel dtype: enough pieces of that dtype to hold
# an fp32 value (8 + 8 + 8 mantissa bits for bf16, 11 + 11 for fp16).
_HALF_SQ_PIECES = {torch.float32: 1, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _augment(q, k, v, dtype):
    """q' = [q, 1...], k' = [k, -|k|^2/2 split into pieces], v, in ``dtype``; differentiable.

    q' . k' = q . k - |k|^2 / 2 = u0. Head dims are zero-padded to a multiple of 16 (and v to
    at least 16 on CUDA, Triton's minimum).
    """
    pieces = _HALF_SQ_PIECES[dtype]
    e = _round_up(q.shape[-1] + pieces, 16)
    q_aug = torch.cat([q.to(dtype), q.new_ones(*q.shape[:3], pieces, dtype=dtype)], dim=-1)

    work = torch.float64 if dtype == torch.float64 else torch.float32
    half_sq = 0.5 * k.to(work).pow(2).sum(-1, keepdim=True)
    first = half_sq.to(dtype)
    cols = [k.to(dtype), -first]
    with torch.no_grad():
        rest = half_sq - first.to(work)
        for _ in range(pieces - 1):
            piece = rest.to(dtype)
            cols.append(-piece)
            rest = rest - piece.to(work)
    # Only the first piece carries the gradient of |k|^2/2: all pieces meet the same q' value
    # (1), so each receives the full d/d(|k|^2/2), and passing it once is exact.
    k_aug = torch.cat(cols, dim=-1)

    q_aug = F.pad(q_aug, (0, e - q_aug.shape[-1]))
    k_aug = F.pad(k_aug, (0, e - k_aug.shape[-1]))
    v_aug = v.to(dtype)
    if v_aug.stride(-1) != 1:
        v_aug = v_aug.contiguous()
    dv = max(16, v.shape[-1]) if q.device.type == "cuda" else v.shape[-1]
    if dv != v.shape[-1]:
        v_aug = F.pad(v_aug, (0, dv - v.shape[-1]))
    return q_aug, k_aug, v_aug


class _AttachScaleGrad(torch.autograd.Function):
    """Identity on q' that routes the gradient of the softmax scale s (= 1/sigma^2) to s.

    The kernel computes logits s_h * (q'_i . k'_j) with s taken from a gradient-free
    score_mod buffer. Those logits depend on s and q' only through s * q', so
    dL/ds_h = sum over head h of (q' . dL/dq') / s_h: one cheap reduction outside the
    kernel instead of a captured buffer that requires grad (which FlexAttention's Triton
    backward would fill with one atomic add per score element, all onto H addresses).
    """

    @staticmethod
    def forward(ctx, q_aug, s):
        ctx.save_for_backward(q_aug, s)
        return q_aug.view_as(q_aug)

    @staticmethod
    def backward(ctx, grad):
        q_aug, s = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            per_head = (q_aug.float() * grad.float()).sum(-1).sum((0, 2))  # (H,)
            if s.dim() == 0:
                per_head = per_head.sum()
            # s = 0 (sigma so large that 1/sigma^2 underflows): dq' is 0, so 0 / 0; the gradient that
            # reaches log sigma, dL/ds * ds/dlog_sigma = dL/ds * (-2 s), is 0 there
            grad_s = (per_head / s).masked_fill(s == 0, 0.0).to(s.dtype)
        return grad, grad_s


# --------------------------------------------------------------------------- top-k thresholds
def _halfway_threshold(dist: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per query (last dim = candidates, +inf = not a candidate): the distance halfway between
    the top_k-th and (top_k+1)-th smallest candidate distances; +inf where there are at
    most top_k candidates."""
    m = dist.shape[-1]
    if top_k >= m:
        return dist.new_full(dist.shape[:-1], float("inf"))
    vals = dist.topk(top_k + 1, dim=-1, largest=False, sorted=True).values
    kth, nxt = vals[..., top_k - 1], vals[..., top_k]
    return torch.where(torch.isinf(nxt), torch.full_like(nxt, float("inf")), 0.5 * (kth + nxt))


def _candidate_distances(nbr, q, k, key_valid=None):
    """fp32 candidate distances (B, H, *Q, M), clamped at 0, +inf at invalid slots and
    at padded keys (key_valid (B, Nk) False)."""
    dots = nbr.dots(q, k)
    q_sq = q.pow(2).sum(-1, keepdim=True)
    k_sq = k.pow(2).sum(-1)
    if key_valid is not None:
        k_sq = k_sq.masked_fill(~key_valid[:, None, :], float("inf"))
    dist = distances_from_parts(q_sq, nbr.gather_scalar(k_sq), dots)
    if nbr.valid is not None:
        dist = dist.masked_fill(~nbr.valid, float("inf"))
    return dist


def _score_threshold(q32, tau):
    """Distance threshold tau (B, H, N) -> threshold on u0 = q.k - |k|^2/2: dist <= tau iff u0 >= (|q|^2 - tau) / 2."""
    return (0.5 * (q32.pow(2).sum(-1) - tau)).contiguous()


@torch.no_grad()
def _causal_threshold(q, k, window: int, top_k: int, key_valid=None):
    b, h, t, _ = q.shape
    if top_k >= window:
        return q.new_full((b, h, t), float("-inf"), dtype=torch.float32)
    q32 = q.detach().float()
    k32 = repeat_kv(k.detach(), h).float()
    nbr = BandNeighbourhood(t, window, q.device)
    dist = _candidate_distances(nbr, nbr.to_query_layout(q32), k32, key_valid)
    tau = nbr.from_query_layout(_halfway_threshold(dist, top_k))
    return _score_threshold(q32, tau)


@torch.no_grad()
def _local_threshold(q, k, grid, radius: int, metric: str, top_k: int, num_prefix: int):
    b, h, n, _ = q.shape
    rows, cols = grid
    q32 = q.detach().float()
    k32 = repeat_kv(k.detach(), h).float()
    if n <= DENSE_2D_MAX_TOKENS:
        mask = grid_candidate_mask((rows, cols), radius, metric, num_prefix, q.device)
        parts = [(DenseNeighbourhood(n, mask), slice(0, n))]
    else:
        parts = []
        if num_prefix:
            parts.append((DenseNeighbourhood(n, None), slice(0, num_prefix)))
        parts.append((GridNeighbourhood((rows, cols), radius, metric, num_prefix, q.device), slice(num_prefix, n)))
    taus = []
    for nbr, rows_of_q in parts:
        dist = _candidate_distances(nbr, q32[:, :, rows_of_q], k32)
        taus.append(_halfway_threshold(dist, top_k))
    tau = torch.cat(taus, dim=2)
    return _score_threshold(q32, tau)


def _krause_score_mod(threshold: torch.Tensor, scale: torch.Tensor, key_valid: torch.Tensor | None = None):
    """score = u0 = q.k - |k|^2/2. Keys with u0 below their query's threshold (farther than
    tau_i), or padded (key_valid False), -> -inf; the others get the logit s_h * u0. All
    buffers are gradient-free."""

    if key_valid is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(score >= threshold[b, h, q_idx], score * scale[h], -float("inf"))
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            keep = (score >= threshold[b, h, q_idx]) & key_valid[b, kv_idx]
            return torch.where(keep, score * scale[h], -float("inf"))

    return score_mod


# --------------------------------------------------------------------------- block masks
def causal_block_size(window: int) -> int:
    """Sparse block size of the causal BlockMask.

    A block of Bq queries touches about (Bq + W) / Bk key blocks; smaller blocks waste less
    of the band but give the Triton kernel smaller tiles. Not tuned on a GPU yet.
    """
    if window >= 256:
        return 128
    if window >= 64:
        return 64
    return 32


def _band_mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


def _ordered(blocks: torch.Tensor, present: torch.Tensor, width: int):
    """(rows, slots) candidate block ids + presence -> BlockMask's (num, indices): present ids
    first, ascending, rows padded to ``width`` (= number of key blocks, which BlockMask's
    helpers such as ``to_dense`` take the index width to be)."""
    big = torch.iinfo(torch.int32).max
    idx = torch.where(present, blocks, torch.full_like(blocks, big)).sort(dim=-1).values
    idx = torch.where(idx == big, torch.zeros_like(idx), idx)
    idx = F.pad(idx, (0, width - idx.shape[-1]))
    return present.sum(-1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None].contiguous()


@functools.lru_cache(maxsize=64)
def causal_block_mask(num_tokens: int, window: int, block: int, device_str: str) -> BlockMask:
    """BlockMask of the causal window i - W < j <= i, built from the band's block structure.

    Per query block only the O((block + W) / block) key blocks that meet the band are
    examined; blocks entirely inside the band (and inside the sequence) are "full" (no
    mask_mod), the others partial. Only block-level tables ((T / block)^2 int32 at most, as
    in any BlockMask) are created, never a T x T element mask as ``create_block_mask`` does.
    """
    t, w, bs = num_tokens, window, block
    nqb = -(-t // bs)
    nkb = nqb
    slots = min(nkb, -(-(bs + w - 1) // bs) + 1)
    qb = torch.arange(nqb)
    q_start = qb * bs
    q_end = torch.clamp(q_start + bs, max=t) - 1
    kb_first = torch.clamp(q_start - (w - 1), min=0) // bs
    kb_last = q_end // bs
    kb = kb_first[:, None] + torch.arange(slots)[None, :]
    present = kb <= kb_last[:, None]
    k_start = kb * bs
    k_end = torch.clamp(k_start + bs, max=t) - 1
    whole = ((qb[:, None] + 1) * bs <= t) & ((kb + 1) * bs <= t)
    full = present & whole & (k_end <= q_start[:, None]) & (k_start > q_end[:, None] - w)
    partial = present & ~full
    kv_num, kv_idx = _ordered(kb, partial, nkb)
    full_num, full_idx = _ordered(kb, full, nkb)
    return BlockMask.from_kv_blocks(
        kv_num.to(device_str),
        kv_idx.to(device_str),
        full_num.to(device_str),
        full_idx.to(device_str),
        BLOCK_SIZE=bs,
        mask_mod=_band_mask_mod(w),
        seq_lengths=(t, t),
    )


def _grid_mask_mod(cols: int, radius: int, metric: str, num_prefix: int):
    p = num_prefix

    def mask_mod(b, h, q_idx, kv_idx):
        qp = torch.clamp(q_idx - p, min=0)
        kp = torch.clamp(kv_idx - p, min=0)
        dr = torch.abs(qp // cols - kp // cols)
        dc = torch.abs(qp % cols - kp % cols)
        close = (dr + dc <= radius) if metric == "manhattan" else (torch.maximum(dr, dc) <= radius)
        return (q_idx < p) | (kv_idx < p) | close

    return mask_mod


@functools.lru_cache(maxsize=64)
def grid_block_mask(rows: int, cols: int, radius: int, metric: str, num_prefix: int, device_str: str) -> BlockMask:
    n = num_prefix + rows * cols
    return create_block_mask(
        _grid_mask_mod(cols, radius, metric, num_prefix), None, None, n, n, device=device_str, BLOCK_SIZE=BLOCK_2D
    )


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


# --------------------------------------------------------------------------- public
def _prepare(q, k, v, log_sigma):
    dtype = _kernel_dtype(q)
    q_aug, k_aug, v_aug = _augment(q, k, v, dtype)
    s = 2.0 * sigma_coefficient(log_sigma)  # 1 / sigma^2: () or (H,)
    q_aug = _AttachScaleGrad.apply(q_aug, s)
    scale = s.detach().expand(q.shape[1]).contiguous()  # (H,) for the score_mod
    return q_aug, k_aug, v_aug, scale


def causal_krause_attention_flex(q, k, v, log_sigma, window: int, top_k: int, key_padding_mask=None) -> torch.Tensor:
    """Causal sliding-window Krause attention on FlexAttention (arguments as
    ``krause.causal_krause_attention`` with Tq == Tk; log_sigma already a () or (H,) tensor).
    Queries with no valid key (all padding) return zeros."""
    t = q.shape[2]
    (q, bad_q), (k, bad_k), (v, bad_v) = split_finite(q), split_finite(k), split_finite(v)
    poisoned = causal_poisoned_rows(bad_q, bad_k | bad_v, window, key_padding_mask)  # the NaN policy (krause.nonfinite)
    q_aug, k_aug, v_aug, scale = _prepare(q, k, v, log_sigma)
    threshold = _causal_threshold(q, k, window, top_k, key_padding_mask)
    block_mask = causal_block_mask(t, window, causal_block_size(window), _device_key(q.device))
    out = _run_flex(q_aug, k_aug, v_aug, _krause_score_mod(threshold, scale, key_padding_mask), block_mask)
    out = out[..., : v.shape[-1]].to(q.dtype)
    if key_padding_mask is not None:  # rows with no candidate: zeros whatever the kernel did
        nk = key_padding_mask.cumsum(-1, dtype=torch.int32)
        starts = torch.arange(t, device=q.device) - window
        first = torch.where(starts >= 0, nk.gather(-1, starts.clamp_min(0).expand_as(nk)), torch.zeros_like(nk))
        out = out * ((nk - first) > 0)[:, None, :, None].to(out.dtype)
    return fill_nan_rows(out, poisoned)


def local_krause_attention_2d_flex(
    q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """2-D local Krause attention on FlexAttention (arguments as
    ``krause.local_krause_attention_2d``; log_sigma already a () or (H,) tensor)."""
    rows, cols = grid
    (q, bad_q), (k, bad_k), (v, bad_v) = split_finite(q), split_finite(k), split_finite(v)
    poisoned = grid_poisoned_rows(bad_q, bad_k | bad_v, (rows, cols), radius, metric, num_prefix_tokens)  # NaN policy
    q_aug, k_aug, v_aug, scale = _prepare(q, k, v, log_sigma)
    threshold = _local_threshold(q, k, (rows, cols), radius, metric, top_k, num_prefix_tokens)
    block_mask = grid_block_mask(rows, cols, radius, metric, num_prefix_tokens, _device_key(q.device))
    out = _run_flex(q_aug, k_aug, v_aug, _krause_score_mod(threshold, scale), block_mask)
    return fill_nan_rows(out[..., : v.shape[-1]].to(q.dtype), poisoned)
