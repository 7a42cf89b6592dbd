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

import torch.nn.functional as tnf

from . import _validation as V
from . import cpu
from . import engine
from . import flops as F
from .dense import repeat_kv, sigma_coefficient
from .dispatch import DENSE_2D_MAX_TOKENS, IMPLS, backend_for, keys_in_one_span  # noqa: F401  (IMPLS, DENSE_2D_MAX_TOKENS re-exported)
from .masks import grid_candidate_mask, grid_offsets
from .neighbourhoods import BandNeighbourhood, DenseNeighbourhood, GridNeighbourhood, band_block_size
from .nonfinite import causal_poisoned_rows, fill_nan_rows, finite_or_zero, grid_poisoned_rows, split_finite
from .reference import causal_krause_attention_reference, local_krause_attention_2d_reference


def _sum_kv_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    b, h, n, d = x.shape
    if h == num_kv_heads:
        return x
    return x.view(b, num_kv_heads, h // num_kv_heads, n, d).sum(2)


def _dlog_sigma(dcoef: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    # coef = exp(-2 log_sigma) / 2, so dcoef/dlog_sigma = -2 coef.
    grad = dcoef * (-2.0 * sigma_coefficient(log_sigma))
    if log_sigma.dim() == 0:
        grad = grad.sum()
    return grad.to(log_sigma.dtype)


# --------------------------------------------------------------------------- causal
# The ops take end-aligned queries (Tq <= Tk, query i at key position Tk - Tq + i). What
# they save for the backward depends on the kernel that ran: the engine saves band-layout
# probs/dist (B, Hkv, nb, G*C, span) and an empty ``kept``; the compiled CPU kernel saves
# per query its kept keys (int32 ``kept``) with their probs/dist, (B, H, Tq, Ks).
def _band_tokens(q, k, window) -> int:
    """Rows of the engine's square band after end alignment (see ``_end_align``)."""
    return min(k.shape[2], q.shape[2] + window - 1)


def _causal_shapes(q, k, window):
    """The engine's saved probs/dist: (B, Hkv, nb, G*C, span), the band's GQA-folded query layout."""
    b, h = q.shape[:2]
    hkv = k.shape[1]
    c = band_block_size(window)
    nb = -(-_band_tokens(q, k, window) // c)
    return (b, hkv, nb, (h // hkv) * c, c + window - 1)


def band_span(window: int) -> int:
    """Keys one query block of the band scores (C + W - 1)."""
    return band_block_size(window) + window - 1


def _band(q, k, window):
    return BandNeighbourhood(q.shape[2], window, q.device, group=q.shape[1] // k.shape[1])


def _no_kept(q):
    return q.new_empty(0, dtype=torch.int32)


def _causal_fwd_engine(q, k, v, log_sigma, key_valid, window, top_k, saved: bool = True):
    (q, bad_q), (k, bad_k), (v, bad_v) = split_finite(q), split_finite(k), split_finite(v)
    poisoned = causal_poisoned_rows(bad_q, bad_k | bad_v, window, key_valid)  # the NaN policy: marked afterwards
    qa, k, v, key_valid, offset = _end_align(q, k, v, key_valid, window)
    nbr = _band(qa, k, window)
    coef = engine.sigma_coef(log_sigma, q.shape[1], 3)
    # GQA: the group's query heads share their key/value head's spans (no repeat_kv).
    out, probs, dist = engine.forward(nbr, nbr.to_query_layout(qa.float()), k.float(), v.float(), coef, top_k, key_valid)
    if saved:  # a NaN row saves no probabilities: it passes no gradient, like a row with no candidate
        probs.masked_fill_(nbr.to_query_layout(tnf.pad(poisoned[..., None].float(), (0, 0, offset, 0))) > 0, 0.0)
    out = fill_nan_rows(nbr.from_query_layout(out)[:, :, offset:], poisoned)
    return out.to(q.dtype).contiguous(), probs, dist, _no_kept(q)


def _causal_fwd_kernel(q, k, v, log_sigma, key_valid, window, top_k, saved: bool = True):
    """The causal op's forward on q's device: the compiled CPU kernel where it runs, else the
    engine. ``saved=False`` (inference) leaves what only the backward reads unfinished; the
    output is the same either way."""
    if cpu.runs(q, k, v):
        return cpu.causal_forward(q, k, v, log_sigma, key_valid, window, top_k, saved=saved)
    return _causal_fwd_engine(q, k, v, log_sigma, key_valid, window, top_k, saved=saved)


@torch.library.custom_op("krause::causal_fwd", mutates_args=())
def _causal_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sigma: torch.Tensor,
    key_valid: torch.Tensor | None,
    window: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_fwd_engine(q, k, v, log_sigma, key_valid, window, top_k)


@_causal_fwd.register_kernel("cpu")
def _(q, k, v, log_sigma, key_valid, window, top_k):
    return _causal_fwd_kernel(q, k, v, log_sigma, key_valid, window, top_k)


# Fake (meta) implementations for torch.compile. The real kernels return contiguous
# tensors whatever the input layout, so these must too (new_empty, not empty_like).
@_causal_fwd.register_fake
def _(q, k, v, log_sigma, key_valid, window, top_k):
    f32 = torch.float32
    if cpu.runs(q, k, v):
        shape = (*q.shape[:3], cpu.causal_saved_slots(q.shape[2], k.shape[2], window, top_k))
        return q.new_empty(q.shape), q.new_empty(shape, dtype=f32), q.new_empty(shape, dtype=f32), \
            q.new_empty(shape, dtype=torch.int32)
    shape = _causal_shapes(q, k, window)
    return q.new_empty(q.shape), q.new_empty(shape, dtype=f32), q.new_empty(shape, dtype=f32), _no_kept(q)


def _causal_bwd_engine(grad_out, q, k, v, log_sigma, probs, dist, window):
    tk = k.shape[2]
    q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
    qa, ka, va, _, offset = _end_align(q, k, v, None, window)
    nbr = _band(qa, ka, window)
    coef = engine.sigma_coef(log_sigma, q.shape[1], 3)
    dq, dk, dv, dcoef = engine.backward(
        nbr,
        nbr.to_query_layout(tnf.pad(grad_out.float(), (0, 0, offset, 0))),
        nbr.to_query_layout(qa.float()),
        ka.float(),
        va.float(),
        coef,
        probs,
        dist,
    )
    dq = nbr.from_query_layout(dq)[:, :, offset:]
    dropped = tk - ka.shape[2]  # keys no query could see
    dk, dv = (tnf.pad(x, (0, 0, dropped, 0)) for x in (dk, dv))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype), dv.to(v.dtype), _dlog_sigma(dcoef, log_sigma)


@torch.library.custom_op("krause::causal_bwd", mutates_args=())
def _causal_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sigma: torch.Tensor,
    probs: torch.Tensor,
    dist: torch.Tensor,
    kept: torch.Tensor,
    window: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_bwd_engine(grad_out, q, k, v, log_sigma, probs, dist, window)


@_causal_bwd.register_kernel("cpu")
def _(grad_out, q, k, v, log_sigma, probs, dist, kept, window, top_k):
    if kept.numel() == 0:  # the engine ran the forward
        return _causal_bwd_engine(grad_out, q, k, v, log_sigma, probs, dist, window)
    return _compiled_bwd(grad_out, q, k, v, log_sigma, probs, dist, kept, window)


def _compiled_bwd(grad_out, q, k, v, log_sigma, probs, dist, kept, window=0):
    dq, dk, dv, dcoef = cpu.backward(grad_out, q, k, v, log_sigma, probs, dist, kept, window)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _dlog_sigma(dcoef, log_sigma)


@_causal_bwd.register_fake
def _(grad_out, q, k, v, log_sigma, probs, dist, kept, window, top_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _causal_setup(ctx, inputs, output):
    q, k, v, log_sigma, _key_valid, window, top_k = inputs  # padding lives on in the saved probs
    _, probs, dist, kept = output
    ctx.mark_non_differentiable(probs, dist, kept)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved rows (grad_out None is handled)
    ctx.save_for_backward(q, k, v, log_sigma, probs, dist, kept)
    ctx.window, ctx.top_k = window, top_k


def _causal_backward(ctx, grad_out, _grad_probs, _grad_dist, _grad_kept):
    q, k, v, log_sigma, probs, dist, kept = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    dq, dk, dv, dls = _causal_bwd(grad_out, q, k, v, log_sigma, probs, dist, kept, ctx.window, ctx.top_k)
    return dq, dk, dv, dls, None, None, None


_causal_fwd.register_autograd(_causal_backward, setup_context=_causal_setup)


@register_flop_formula(torch.ops.krause.causal_fwd)
def _causal_fwd_flops(q_shape, k_shape, v_shape, ls_shape, kv_shape, window, top_k, *args, **kwargs) -> int:
    b, h, t, d = q_shape
    return b * h * F.causal_forward_flops(t, d, window, top_k, k_shape[2])


@register_flop_formula(torch.ops.krause.causal_bwd)
def _causal_bwd_flops(g_shape, q_shape, k_shape, *args, **kwargs) -> int:
    window, top_k = args[-2], args[-1]
    b, h, t, d = q_shape
    return b * h * F.causal_backward_flops(t, d, window, top_k, k_shape[2])


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


def _local_fwd_engine(
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
    (qf, bad_q), (kf, bad_k), (vf, bad_v) = split_finite(q), split_finite(k), split_finite(v)
    poisoned = grid_poisoned_rows(bad_q, bad_k | bad_v, (rows, cols), radius, metric, num_prefix)  # the NaN policy
    coef = engine.sigma_coef(log_sigma, h, 2)
    qf, kf, vf = qf.float(), repeat_kv(kf, h).float(), repeat_kv(vf, h).float()
    outs, saved = [], []
    for nbr, rows_of_q in _local_parts(q, rows, cols, radius, metric, num_prefix, dense):
        out, probs, dist = engine.forward(nbr, qf[:, :, rows_of_q], kf, vf, coef, top_k)
        probs.masked_fill_(poisoned[:, :, rows_of_q, None], 0.0)  # a NaN row passes no gradient
        outs.append(out)
        saved += [probs, dist]
    while len(saved) < 4:  # the dense path has one part; pad the fixed-arity output
        saved += [q.new_empty(0, dtype=torch.float32)]
    out = fill_nan_rows(torch.cat(outs, dim=2), poisoned).to(q.dtype)
    return (out, *saved)


# Saved tensors: the engine's (probs, dist) per part, an empty pair for the dense path;
# the compiled CPU kernel's (probs, dist, kept int32, empty). The engine is the op's default kernel.
_local_fwd = torch.library.custom_op("krause::local2d_fwd", mutates_args=())(_local_fwd_engine)


@_local_fwd.register_kernel("cpu")
def _(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix, dense):
    if not cpu.runs(q, k, v):
        return _local_fwd_engine(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix, dense)
    out, probs, dist, kept = cpu.local2d_forward(q, k, v, log_sigma, (rows, cols), radius,
                                                 metric, top_k, num_prefix)
    return out, probs, dist, kept, q.new_empty(0, dtype=torch.float32)


@_local_fwd.register_fake
def _(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix, dense):
    b, h, n, _ = q.shape
    f32 = torch.float32
    if cpu.runs(q, k, v):
        shape = (b, h, n, cpu.local2d_saved_slots((rows, cols), radius, metric, top_k, num_prefix))
        return q.new_empty(q.shape), q.new_empty(shape, dtype=f32), q.new_empty(shape, dtype=f32), \
            q.new_empty(shape, dtype=torch.int32), q.new_empty(0, dtype=f32)
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


def _local_bwd_engine(
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
    qf, gf = finite_or_zero(q).float(), grad_out.float()
    kf = repeat_kv(finite_or_zero(k), h).float()
    vf = repeat_kv(finite_or_zero(v), h).float()
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


_local_bwd = torch.library.custom_op("krause::local2d_bwd", mutates_args=())(_local_bwd_engine)


@_local_bwd.register_kernel("cpu")
def _(grad_out, q, k, v, log_sigma, probs_a, dist_a, probs_b, dist_b, rows, cols, radius, metric, top_k, num_prefix,
      dense):
    if probs_b.dtype == torch.int32:  # the compiled kernel ran the forward: probs_b holds the kept keys
        return _compiled_bwd(grad_out, q, k, v, log_sigma, probs_a, dist_a, probs_b)
    return _local_bwd_engine(grad_out, q, k, v, log_sigma, probs_a, dist_a, probs_b, dist_b, rows, cols, radius,
                             metric, top_k, num_prefix, dense)


@_local_bwd.register_fake
def _(grad_out, q, k, v, log_sigma, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _local_setup(ctx, inputs, output):
    q, k, v, log_sigma, *static = inputs
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # as in _causal_setup
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
def _end_align(q, k, v, key_padding_mask, window: int):
    """Reduces end-aligned queries (Tq <= Tk) to the band's square case: keys older than
    the first query's window are dropped and the queries are front-padded to the remaining
    keys (at most W - 1 throwaway rows). Returns (q, k, v, mask, offset)."""
    tq, tk = q.shape[2], k.shape[2]
    keep = min(tk, tq + window - 1)
    if keep < tk:
        k, v = k[:, :, tk - keep :], v[:, :, tk - keep :]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, tk - keep :]
    offset = keep - tq
    if offset:
        q = tnf.pad(q, (0, 0, offset, 0))
    return q, k, v, key_padding_mask, offset


def causal_krause_attention(
    q, k, v, log_sigma, window: int, top_k: int, *, key_padding_mask=None, impl: str = "auto"
) -> torch.Tensor:
    """Causal sliding-window Krause attention (docs/api.md).

    Query i sits at position p = Tk - Tq + i (queries are the last Tq of the Tk keys, as a
    decoding step, a chunked prefill or an HF cache hands them over) and scores the keys
    p - window < j <= p that are not padding by ``-||q_i - k_j||^2 / (2 sigma_h^2)``
    (sigma_h = exp(log_sigma[h])); it keeps the ``min(top_k, #valid candidates)`` nearest
    and takes the softmax over them. A query with no valid candidate returns zeros.

    NaN policy (docs/api.md): the output row of a query is all NaN when its q, or the key or
    value of one of its valid candidates, holds a NaN or an infinity (padding and keys
    outside the window never count); backward passes no gradient through such a row.

    Args:
        q: (B, H, Tq, D) queries.
        k, v: (B, Hkv, Tk, D) keys and values, Tq <= Tk, H % Hkv == 0 (grouped-query attention).
        log_sigma: a float, a scalar tensor or an (H,) tensor (one sigma per head).
        window: candidate window W >= 1 (the query itself included).
        top_k: number of nearest candidates kept, >= 1.
        key_padding_mask: optional (B, Tk) bool, True = real token (left or right padding).
        impl: "auto", "fast" (the linear-time ops: the compiled kernel on CPU, else the
            engine), "reference" (dense O(T^2), for tests),
            "flex" (FlexAttention) or "triton" (fused kernels); see ``krause.dispatch``.

    Returns:
        (B, H, Tq, D) in q's dtype.
    """
    V.check_positive_int("window", window)
    V.check_positive_int("top_k", top_k)
    b, h, _, tk, _ = V.check_qkv(q, k, v, end_aligned=True)
    tq = q.shape[2]
    key_padding_mask = V.check_key_padding_mask(key_padding_mask, b, tk, q)
    # a plain bool (a guard under torch.compile), so the decision sees constants only
    one_span = True if keys_in_one_span(window, tq, tk) else False
    backend = backend_for(impl, "causal", q.device.type, _call_dtype(q, k, v), window, one_span)
    if backend in ("reference", "dense"):
        return causal_krause_attention_reference(q, k, v, log_sigma, window, top_k, key_padding_mask=key_padding_mask)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    if backend == "triton":
        from .kernels import causal_krause_attention_triton

        return causal_krause_attention_triton(q, k, v, log_sigma, window, top_k, key_padding_mask)
    if backend == "flex":
        from .flex import causal_krause_attention_flex

        q, k, v, key_padding_mask, offset = _end_align(q, k, v, key_padding_mask, window)
        out = causal_krause_attention_flex(q, k, v, log_sigma, window, top_k, key_padding_mask)
        return out[:, :, offset:] if offset else out
    if plain_inference(q, k, v, log_sigma, key_padding_mask):  # e.g. a decoding step: no autograd, no saved rows
        return _causal_fwd_kernel(q, k, v, log_sigma, key_padding_mask, window, top_k, saved=False)[0]
    return _causal_fwd(q, k, v, log_sigma, key_padding_mask, window, top_k)[0]  # compiled or engine


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # no __torch_function__ / __torch_dispatch__ of their own


def plain_inference(*tensors) -> bool:
    """Whether a call can run the op's kernel as a plain function: no gradient is wanted and
    nothing sees the op itself (torch.compile, jit tracing, a dispatch or function mode such as
    FlopCounterMode, a torch.func transform such as vmap, tensor subclasses, meta tensors). The custom op's dispatch and autograd
    layers then have nothing to do, and the kernel need not finish the rows it saves for backward."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: dynamo traces no further
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap / torch.func: wrapped tensors
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_meta or (grad and t.requires_grad)):
            return False
    return True


def _call_dtype(q, k, v) -> torch.dtype | None:
    """The dtype a backend must take: q's, or None (the kernels refuse it) when q, k, v differ."""
    return q.dtype if k.dtype == q.dtype and v.dtype == q.dtype else None


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
    """2-D local Krause attention for vision transformers (docs/api.md).

    Tokens are ``num_prefix_tokens`` prefix (CLS) tokens followed by a row-major
    ``grid = (rows, cols)`` of patches. A patch query's candidates are the patches within
    ``radius`` of it under ``metric`` ("manhattan" or "chebyshev"; itself included) plus
    every prefix token; a prefix query's candidates are all tokens. Of these the
    ``min(top_k, #candidates)`` nearest in ``||q - k||`` are kept and softmax-weighted
    by ``-||q - k||^2 / (2 sigma_h^2)``. NaN policy as ``causal_krause_attention``: a query
    whose q, or a candidate's key or value, holds a NaN or an infinity gets an all-NaN row.

    Args:
        q: (B, H, N, D); k, v: (B, Hkv, N, D) with N = num_prefix_tokens + rows * cols.
        log_sigma: a float, a scalar tensor or an (H,) tensor.
        impl: "auto", "fast", "reference", "flex" or "triton" (see ``krause.dispatch``).
            Where "auto" runs the engine (no compiled CPU kernel) it uses one dense masked
            matmul for N <= DENSE_2D_MAX_TOKENS; "fast" never does.

    Returns:
        (B, H, N, D) in q's dtype.
    """
    V.check_nonnegative_int("radius", radius)
    V.check_metric(metric)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    rows, cols = V.check_grid(grid, n, num_prefix_tokens)
    backend = backend_for(impl, "local2d", q.device.type, _call_dtype(q, k, v), None, None, (rows, cols), radius,
                          num_prefix_tokens)
    if backend == "reference":
        return local_krause_attention_2d_reference(q, k, v, log_sigma, grid, radius, metric, top_k, num_prefix_tokens)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    if backend == "triton":
        from .kernels import local_krause_attention_2d_triton

        return local_krause_attention_2d_triton(q, k, v, log_sigma, (rows, cols), radius, metric, top_k,
                                                num_prefix_tokens)
    if backend == "flex":
        from .flex import local_krause_attention_2d_flex

        return local_krause_attention_2d_flex(q, k, v, log_sigma, (rows, cols), radius, metric, top_k, num_prefix_tokens)
    # compiled, engine, or the engine's dense masked path ("dense": small grids off the compiled kernel)
    return _local_fwd(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix_tokens, backend == "dense")[0]
