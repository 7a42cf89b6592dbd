"""The two public Krause ops, registered as custom ops with hand-written backward passes
and FLOP formulas.

Registering them with ``torch.library`` makes them opaque to autograd, to
``torch.compile`` (which calls them as black boxes through their fake
implementations) and to ``torch.utils.flop_counter.FlopCounterMode``, which then counts
them by the real sparse cost of Krause attention (see ``krause.flops``) instead of by
whatever dense or banded kernels happen to implement them.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _validation as V
from . import engine
from . import flops as F
from .masks import grid_candidate_mask, grid_offsets
from .neighbourhoods import BandNeighbourhood, DenseNeighbourhood, GridNeighbourhood, band_block_size
from .reference import (
    causal_krause_attention_reference,
    local_krause_attention_2d_reference,
    repeat_kv,
)

IMPLS = ("auto", "fast", "reference", "flex")

# Up to this many tokens the 2-D op runs one dense score matmul (then works on each
# patch query's few candidate slots) instead of per-offset sparse products: fewer,
# larger kernels win while N^2 is small. Measured with benchmarks/attention_scaling.py
# --tune (ViT-S heads, Chebyshev r=2, top_k 8, ~4k tokens per call, CPU time fwd+bwd):
# sparse/dense = 1.38 at 14x14 (197 tokens), 1.36 at 16x16, 1.17 at 17x17 (290), 1.00 at
# 18x18 (325), 0.90 at 19x19, 0.82 at 20x20, 0.40 at 28x28; 1.66 at 8x8 Manhattan r=1.
# The dense path also saves (N, N) probabilities per head (the sparse one N x 26), so at
# the crossover the sparse path is preferred.
DENSE_2D_MAX_TOKENS = 300


def _sum_kv_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    b, h, n, d = x.shape
    if h == num_kv_heads:
        return x
    return x.view(b, num_kv_heads, h // num_kv_heads, n, d).sum(2)


def _dlog_sigma(dcoef: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    # coef = exp(-2 log_sigma) / 2, so dcoef/dlog_sigma = -2 coef.
    coef = 0.5 * torch.exp(-2.0 * log_sigma.float())
    grad = dcoef * (-2.0 * coef)
    if log_sigma.dim() == 0:
        grad = grad.sum()
    return grad.to(log_sigma.dtype)


# --------------------------------------------------------------------------- causal
def _causal_shapes(q, window):
    b, h, t, _ = q.shape
    c = band_block_size(window)
    nb = -(-t // c)
    return (b, h, nb, c, c + window - 1)


@torch.library.custom_op("krause::causal_fwd", mutates_args=())
def _causal_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sigma: torch.Tensor, window: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, t = q.shape[1], q.shape[2]
    nbr = BandNeighbourhood(t, window, q.device)
    coef = engine.sigma_coef(log_sigma, h, 3)
    kf = repeat_kv(k, h).float()
    vf = repeat_kv(v, h).float()
    out, probs, dist = engine.forward(nbr, nbr.to_query_layout(q.float()), kf, vf, coef, top_k)
    return nbr.from_query_layout(out).to(q.dtype).contiguous(), probs, dist


# Fake (meta) implementations for torch.compile. The real kernels return contiguous
# tensors whatever the input layout, so these must too (new_empty, not empty_like).
@_causal_fwd.register_fake
def _(q, k, v, log_sigma, window, top_k):
    shape = _causal_shapes(q, window)
    return q.new_empty(q.shape), q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("krause::causal_bwd", mutates_args=())
def _causal_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sigma: torch.Tensor,
    probs: torch.Tensor,
    dist: torch.Tensor,
    window: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, t, hkv = q.shape[1], q.shape[2], k.shape[1]
    nbr = BandNeighbourhood(t, window, q.device)
    coef = engine.sigma_coef(log_sigma, h, 3)
    dq, dk, dv, dcoef = engine.backward(
        nbr,
        nbr.to_query_layout(grad_out.float()),
        nbr.to_query_layout(q.float()),
        repeat_kv(k, h).float(),
        repeat_kv(v, h).float(),
        coef,
        probs,
        dist,
    )
    dq = nbr.from_query_layout(dq).to(q.dtype).contiguous()
    dk = _sum_kv_groups(dk, hkv).to(k.dtype)
    dv = _sum_kv_groups(dv, hkv).to(v.dtype)
    return dq, dk, dv, _dlog_sigma(dcoef, log_sigma)


@_causal_bwd.register_fake
def _(grad_out, q, k, v, log_sigma, probs, dist, window, top_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _causal_setup(ctx, inputs, output):
    q, k, v, log_sigma, window, top_k = inputs
    _, probs, dist = output
    ctx.mark_non_differentiable(probs, dist)
    ctx.save_for_backward(q, k, v, log_sigma, probs, dist)
    ctx.window, ctx.top_k = window, top_k


def _causal_backward(ctx, grad_out, _grad_probs, _grad_dist):
    q, k, v, log_sigma, probs, dist = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    dq, dk, dv, dls = _causal_bwd(grad_out, q, k, v, log_sigma, probs, dist, ctx.window, ctx.top_k)
    return dq, dk, dv, dls, None, None


_causal_fwd.register_autograd(_causal_backward, setup_context=_causal_setup)


@register_flop_formula(torch.ops.krause.causal_fwd)
def _causal_fwd_flops(q_shape, k_shape, v_shape, ls_shape, window, top_k, *args, **kwargs) -> int:
    b, h, t, d = q_shape
    return b * h * F.causal_forward_flops(t, d, window, top_k)


@register_flop_formula(torch.ops.krause.causal_bwd)
def _causal_bwd_flops(g_shape, q_shape, *args, **kwargs) -> int:
    window, top_k = args[-2], args[-1]
    b, h, t, d = q_shape
    return b * h * F.causal_backward_flops(t, d, window, top_k)


# --------------------------------------------------------------------------- 2-D local
def _local_parts(q, rows, cols, radius, metric, num_prefix, dense):
    """The neighbourhoods the 2-D op splits its queries into: [(nbr, query slice)]."""
    n = q.shape[2]
    if dense:
        mask = grid_candidate_mask((rows, cols), radius, metric, num_prefix, q.device)
        return [(DenseNeighbourhood(n, mask), slice(0, n))]
    parts = []
    if num_prefix:
        parts.append((DenseNeighbourhood(n, None), slice(0, num_prefix)))
    parts.append((GridNeighbourhood((rows, cols), radius, metric, num_prefix, q.device), slice(num_prefix, n)))
    return parts


@torch.library.custom_op("krause::local2d_fwd", mutates_args=())
def _local_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sigma: torch.Tensor,
    rows: int,
    cols: int,
    radius: int,
    metric: str,
    top_k: int,
    num_prefix: int,
    dense: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h = q.shape[1]
    coef = engine.sigma_coef(log_sigma, h, 2)
    qf = q.float()
    kf = repeat_kv(k, h).float()
    vf = repeat_kv(v, h).float()
    outs, saved = [], []
    for nbr, rows_of_q in _local_parts(q, rows, cols, radius, metric, num_prefix, dense):
        out, probs, dist = engine.forward(nbr, qf[:, :, rows_of_q], kf, vf, coef, top_k)
        outs.append(out)
        saved += [probs, dist]
    while len(saved) < 4:  # the dense path has one part; pad the fixed-arity output
        saved += [q.new_empty(0, dtype=torch.float32)]
    out = torch.cat(outs, dim=2).to(q.dtype)
    return (out, *saved)


@_local_fwd.register_fake
def _(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix, dense):
    b, h, n, _ = q.shape
    f32 = torch.float32
    if dense:
        return q.new_empty(q.shape), q.new_empty((b, h, n, n), dtype=f32), q.new_empty((b, h, n, n), dtype=f32), \
            q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    m = num_prefix + len(grid_offsets(radius, metric))
    grid_shape = (b, h, rows * cols, m)
    if num_prefix:
        prefix_shape = (b, h, num_prefix, n)
        return q.new_empty(q.shape), q.new_empty(prefix_shape, dtype=f32), q.new_empty(prefix_shape, dtype=f32), \
            q.new_empty(grid_shape, dtype=f32), q.new_empty(grid_shape, dtype=f32)
    return q.new_empty(q.shape), q.new_empty(grid_shape, dtype=f32), q.new_empty(grid_shape, dtype=f32), \
        q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)


@torch.library.custom_op("krause::local2d_bwd", mutates_args=())
def _local_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sigma: torch.Tensor,
    probs_a: torch.Tensor,
    dist_a: torch.Tensor,
    probs_b: torch.Tensor,
    dist_b: torch.Tensor,
    rows: int,
    cols: int,
    radius: int,
    metric: str,
    top_k: int,
    num_prefix: int,
    dense: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, hkv = q.shape[1], k.shape[1]
    coef = engine.sigma_coef(log_sigma, h, 2)
    qf, gf = q.float(), grad_out.float()
    kf = repeat_kv(k, h).float()
    vf = repeat_kv(v, h).float()
    saved = [(probs_a, dist_a), (probs_b, dist_b)]
    dqs, dk, dv, dcoef = [], 0.0, 0.0, 0.0
    for (nbr, rows_of_q), (probs, dist) in zip(_local_parts(q, rows, cols, radius, metric, num_prefix, dense), saved):
        dq_p, dk_p, dv_p, dc_p = engine.backward(nbr, gf[:, :, rows_of_q], qf[:, :, rows_of_q], kf, vf, coef, probs, dist)
        dqs.append(dq_p)
        dk, dv, dcoef = dk + dk_p, dv + dv_p, dcoef + dc_p
    dq = torch.cat(dqs, dim=2).to(q.dtype)
    dk = _sum_kv_groups(dk, hkv).to(k.dtype)
    dv = _sum_kv_groups(dv, hkv).to(v.dtype)
    return dq, dk, dv, _dlog_sigma(dcoef, log_sigma)


@_local_bwd.register_fake
def _(grad_out, q, k, v, log_sigma, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _local_setup(ctx, inputs, output):
    q, k, v, log_sigma, *static = inputs
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, log_sigma, *saved)
    ctx.static = static


def _local_backward(ctx, grad_out, *_unused):
    q, k, v, log_sigma, *saved = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    dq, dk, dv, dls = _local_bwd(grad_out, q, k, v, log_sigma, *saved, *ctx.static)
    return dq, dk, dv, dls, *([None] * len(ctx.static))


_local_fwd.register_autograd(_local_backward, setup_context=_local_setup)


@register_flop_formula(torch.ops.krause.local2d_fwd)
def _local_fwd_flops(q_shape, k_shape, v_shape, ls_shape, rows, cols, radius, metric, top_k, num_prefix, dense,
                     *args, **kwargs) -> int:
    b, h, _, d = q_shape
    return b * h * F.local2d_forward_flops((rows, cols), d, radius, metric, top_k, num_prefix)


@register_flop_formula(torch.ops.krause.local2d_bwd)
def _local_bwd_flops(g_shape, q_shape, k_shape, v_shape, ls_shape, pa, da, pb, db, rows, cols, radius, metric,
                     top_k, num_prefix, dense, *args, **kwargs) -> int:
    b, h, _, d = q_shape
    return b * h * F.local2d_backward_flops((rows, cols), d, radius, metric, top_k, num_prefix)


# --------------------------------------------------------------------------- public API
def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def causal_krause_attention(q, k, v, log_sigma, window: int, top_k: int, *, impl: str = "auto") -> torch.Tensor:
    """Causal sliding-window Krause attention.

    Query i scores the keys i - window < j <= i by ``-||q_i - k_j||^2 / (2 sigma_h^2)``
    (sigma_h = exp(log_sigma[h])), keeps the ``min(top_k, #candidates)`` nearest and
    takes the softmax over them.

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, Hkv, T, D) keys and values, H % Hkv == 0 (grouped-query attention).
        log_sigma: a float, a scalar tensor or an (H,) tensor (one sigma per head).
        window: candidate window W >= 1 (the query itself included).
        top_k: number of nearest candidates kept, >= 1.
        impl: "auto"/"fast" (linear-time, custom op, any device), "reference" (dense
            O(T^2), for tests) or "flex" (FlexAttention, fused on CUDA; see krause.flex).

    Returns:
        (B, H, T, D) in q's dtype.
    """
    impl = _check_impl(impl)
    if impl == "reference":
        return causal_krause_attention_reference(q, k, v, log_sigma, window, top_k)
    V.check_positive_int("window", window)
    V.check_positive_int("top_k", top_k)
    _, h, _, _, _ = V.check_qkv(q, k, v)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    if impl == "flex":
        from .flex import causal_krause_attention_flex

        return causal_krause_attention_flex(q, k, v, log_sigma, window, top_k)
    return _causal_fwd(q, k, v, log_sigma, window, top_k)[0]


def local_krause_attention_2d(
    q,
    k,
    v,
    log_sigma,
    grid,
    radius: int,
    metric: str,
    top_k: int,
    num_prefix_tokens: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """2-D local Krause attention for vision transformers.

    Tokens are ``num_prefix_tokens`` prefix (CLS) tokens followed by a row-major
    ``grid = (rows, cols)`` of patches. A patch query's candidates are the patches within
    ``radius`` of it under ``metric`` ("manhattan" or "chebyshev"; itself included) plus
    every prefix token; a prefix query's candidates are all tokens. Of these the
    ``min(top_k, #candidates)`` nearest in ``||q - k||`` are kept and softmax-weighted
    by ``-||q - k||^2 / (2 sigma_h^2)``.

    Args:
        q: (B, H, N, D); k, v: (B, Hkv, N, D) with N = num_prefix_tokens + rows * cols.
        log_sigma: a float, a scalar tensor or an (H,) tensor.
        impl: "auto" (dense masked path for N <= DENSE_2D_MAX_TOKENS, sparse otherwise),
            "fast" (always the sparse path), "reference" or "flex".

    Returns:
        (B, H, N, D) in q's dtype.
    """
    impl = _check_impl(impl)
    if impl == "reference":
        return local_krause_attention_2d_reference(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens)
    V.check_nonnegative_int("radius", radius)
    V.check_metric(metric)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    rows, cols = V.check_grid(grid, n, num_prefix_tokens)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    if impl == "flex":
        from .flex import local_krause_attention_2d_flex

        return local_krause_attention_2d_flex(q, k, v, log_sigma, (rows, cols), radius, metric, top_k, num_prefix_tokens)
    dense = impl == "auto" and n <= DENSE_2D_MAX_TOKENS
    return _local_fwd(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix_tokens, dense)[0]
