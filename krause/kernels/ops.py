"""Custom ops (``krause::triton_*``) around the Triton kernels: launch geometry, fake
kernels for torch.compile, FLOP formulas (from ``krause.flops``) and autograd.

No ``from __future__ import annotations`` here: torch.library infers the op schemas
from the real annotation objects.
"""

import os
from typing import Optional

import torch
import triton
from torch.utils.flop_counter import register_flop_formula

from .. import flops as F
from ..masks import grid_offsets
from . import _triton as K

# Widest key (or query) tile a program gathers. The kernels keep a whole row's
# candidates in one tile; wider neighbourhoods go to the other implementations.
MAX_TILE = 2048
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


try:  # where Triton reports a launch that needs more shared memory / registers than the device has
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts
    OutOfResources = RuntimeError


def _launch(kernel, grid, *args, **meta):
    try:
        kernel[grid](*args, **meta)
    except OutOfResources as exc:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise ValueError(f"{name}: {exc}; this shape needs more on-chip memory than the device has "
                         f"(use impl='fast')") from exc


def _blocks(n: int, block: int) -> int:
    """Number of blocks of a launch; they go on grid axis 1, which CUDA caps at 65535."""
    count = triton.cdiv(n, block)
    if count > 65535:
        raise ValueError(f"sequence of {n} tokens: {count} blocks of {block} exceed CUDA's 65535 grid rows")
    return count


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def _prec(dtype) -> str:
    # fp32 dots in full precision (TF32 would move distances by ~1e-3 and change the top-k);
    # bf16 under the interpreter: see _triton._mm.
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"
    return "default"


def _common(q, k, log_sigma):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    ls = log_sigma.detach().float().reshape(-1).contiguous()
    qn = torch.linalg.vector_norm(q, 2, dim=-1, dtype=torch.float32).square().contiguous()
    kn = torch.linalg.vector_norm(k, 2, dim=-1, dtype=torch.float32).square().contiguous()
    return b, h, hkv, tq, tk, d, ls, log_sigma.dim() == 1, qn, kn


def _valid_arg(key_valid, like):
    if key_valid is None:
        return like.new_empty(1, dtype=torch.int8), False
    return key_valid.to(torch.int8).contiguous(), True


def _dlog_sigma(dcoef_partials, log_sigma, b, h):
    # coef = exp(-2 log_sigma) / 2, so dcoef / dlog_sigma = -2 coef.
    dcoef = dcoef_partials.view(b, h, -1).sum((0, 2))
    coef = 0.5 * torch.exp(-2.0 * log_sigma.detach().float().reshape(-1))
    grad = dcoef * (-2.0 * coef)
    if log_sigma.dim() == 0:
        grad = grad.sum()
    return grad.reshape(log_sigma.shape).to(log_sigma.dtype)


# --------------------------------------------------------------------------- geometry
def causal_blocks(window: int) -> tuple[int, int]:
    """(query block, key tile) of the causal forward: the tile holds block + W - 1 keys."""
    block = min(64, _pow2(window))
    return block, _pow2(block + window - 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def autotune_enabled() -> bool:
    """Whether the causal forward's tile sizes are timed on the device (once per window, head dim and
    dtype). KRAUSE_TRITON_AUTOTUNE=0 pins the fixed default (`causal_blocks`): the same tiles, so
    the same bits, on every run; the interpreter has no device to time and uses the default too."""
    return os.environ.get("KRAUSE_TRITON_AUTOTUNE", "1") != "0" and not _interpreting()


#: the blocks and warp counts every tuned kernel tries (pruned where the block's tile does not fit)
TUNED_BLOCKS, TUNED_WARPS = (16, 32, 64), (4, 8)


def _block_configs(block_arg: str) -> list:
    return [triton.Config({block_arg: m}, num_warps=w) for m in TUNED_BLOCKS for w in TUNED_WARPS]


#: candidates of the causal forward and the backward's dq pass (query blocks; the key tile
#: follows from the block and W) and of its dk/dv pass (key blocks, whose query tile holds the
#: block + W - 1 queries that can keep them)
CAUSAL_FWD_CONFIGS = CAUSAL_DQ_CONFIGS = _block_configs("BLOCK_M")
CAUSAL_DKDV_CONFIGS = _block_configs("BLOCK_N")


def _pruner(block_arg: str, tile_of, default_block):
    """The config pruner of a tuned kernel: the default block alone (4 warps) when not tuning,
    else every config whose tile `tile_of(args, block)` fits in MAX_TILE."""
    def prune(configs, nargs, **kwargs):
        if not autotune_enabled():
            block = default_block(nargs)
            return [c for c in configs if c.kwargs[block_arg] == block and c.num_warps == 4]
        fitting = [c for c in configs if tile_of(nargs, c.kwargs[block_arg]) <= MAX_TILE]
        return fitting or configs[:1]
    return prune


def _tuned(kernel, configs, block_arg: str, tile_arg: str, tile_of, default_block, key):
    """kernel tuned over configs of `block_arg`, timed once per value of the `key` arguments
    (Triton adds the dtypes); its `tile_arg` follows from the block chosen."""
    prune = _pruner(block_arg, tile_of, default_block)
    tiled = triton.heuristics({tile_arg: lambda a: tile_of(a, a[block_arg])})(kernel)
    return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": prune})(tiled)


def _causal_tile(args, block):  # the block and the W - 1 tokens before it
    return _pow2(block + args["W"] - 1)


def _causal_default(args):
    return causal_blocks(args["W"])[0]


# The causal forward, tuned: BLOCK_N (the key tile) is the band a block of BLOCK_M queries reads.
# Its outputs (out, lse, thr) are per row, so the backward is independent of the block chosen;
# so are the backward's (dq, delta and dcoef per query row, dk/dv per key row).
_causal_fwd_kernel = _tuned(K._fwd_kernel, CAUSAL_FWD_CONFIGS, "BLOCK_M", "BLOCK_N", _causal_tile, _causal_default,
                            ("W", "D", "n_iter"))
_causal_dq_kernel = _tuned(K._bwd_dq_kernel, CAUSAL_DQ_CONFIGS, "BLOCK_M", "BLOCK_N", _causal_tile, _causal_default,
                           ("W", "D"))
_causal_dkdv_kernel = _tuned(K._bwd_dkdv_kernel, CAUSAL_DKDV_CONFIGS, "BLOCK_N", "BLOCK_Q", _causal_tile,
                             _causal_default, ("W", "D"))


def causal_supported(window: int) -> tuple[bool, str]:
    """Whether the causal band tile (block + W - 1 keys) fits."""
    tile = causal_blocks(window)[1]
    if tile > MAX_TILE:
        return False, f"window {window} needs a {tile}-key tile, more than {MAX_TILE}"
    return True, ""


def _prefix_pad(num_prefix: int) -> int:
    """Tile slots for the prefix tokens (a power of two; none without them)."""
    return triton.next_power_of_2(num_prefix) if num_prefix else 0


def _grid_band(cols, radius, num_prefix, block):
    p_pad = _prefix_pad(num_prefix)
    return p_pad, _pow2(p_pad + block + 2 * radius * cols + 2 * radius)


def _default_band_block(cols: int, radius: int, num_prefix: int) -> int:
    block = 32
    while block > 16 and _grid_band(cols, radius, num_prefix, block)[1] > MAX_TILE:
        block //= 2
    return block


def local2d_blocks(grid, radius: int, num_prefix: int) -> tuple[int, int, int]:
    """(patch query block, its key tile, prefix-row key tile) of the 2-D forward's default."""
    rows, cols = grid
    block = _default_band_block(cols, radius, num_prefix)
    return block, _grid_band(cols, radius, num_prefix, block)[1], _pow2(num_prefix + rows * cols)


#: candidates of the 2-D band kernels (forward and dq: query blocks; dk/dv: key blocks); the
#: tile is the prefix plus the band of rows within `radius` of the block
LOCAL2D_CONFIGS, LOCAL2D_DKDV_CONFIGS = CAUSAL_FWD_CONFIGS, CAUSAL_DKDV_CONFIGS


def _band_tile(args, block):  # the prefix and the rows within `radius` of the block
    return _grid_band(args["cols"], args["radius"], args["P"], block)[1]


def _band_default(args):
    return _default_band_block(args["cols"], args["radius"], args["P"])


# The 2-D patch-row kernels, tuned the same way (the prefix-row launches keep their one tile).
_local_fwd_kernel = _tuned(K._fwd_kernel, LOCAL2D_CONFIGS, "BLOCK_M", "BLOCK_N", _band_tile, _band_default,
                           ("cols", "radius", "P", "D", "n_iter"))
_local_dq_kernel = _tuned(K._bwd_dq_kernel, LOCAL2D_CONFIGS, "BLOCK_M", "BLOCK_N", _band_tile, _band_default,
                          ("cols", "radius", "P", "D"))
_local_dkdv_kernel = _tuned(K._bwd_dkdv_kernel, LOCAL2D_DKDV_CONFIGS, "BLOCK_N", "BLOCK_Q", _band_tile, _band_default,
                            ("cols", "radius", "P", "D"))


def local2d_supported(grid, radius: int, num_prefix: int) -> tuple[bool, str]:
    """Whether the 2-D kernels' tiles fit (the band and, with prefix tokens, a whole row)."""
    _, band, full = local2d_blocks(grid, radius, num_prefix)
    if band > MAX_TILE:
        return False, f"2-D band tile of {band} keys exceeds {MAX_TILE} (grid {tuple(grid)}, radius {radius})"
    if num_prefix and full > MAX_TILE:
        return False, f"prefix rows need a {full}-key tile, more than {MAX_TILE}"
    return True, ""


# --------------------------------------------------------------------------- causal
def _causal_forward(q, k, v, log_sigma, key_valid, window, top_k):
    b, h, hkv, tq, tk, d, ls, per_head, qn, kn = _common(q, k, log_sigma)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    valid, has_valid = _valid_arg(key_valid, q)
    out = torch.empty_like(q)
    lse = q.new_empty((b, h, tq), dtype=torch.float32)
    thr = q.new_empty((b, h, tq), dtype=torch.int64)
    n_iter = top_k if top_k < window else 0
    grid = lambda meta: (b * h, _blocks(tq, meta["BLOCK_M"]))  # noqa: E731 - the tuned block decides
    _launch(_causal_fwd_kernel, grid,
        q, k, v, qn, kn, ls, valid, out, lse, thr,
        h, h // hkv, tq, tk, d, window, 0, 0, 1, 0, n_iter, 0,
        LS_PER_HEAD=per_head, HAS_VALID=has_valid, GRID=False, CHEB=False, KMODE=K.CAUSAL_KEYS,
        PREC=_prec(q.dtype), BLOCK_D=_pow2(d),
    )
    return out, lse, thr


def _causal_backward_impl(grad, q, k, v, log_sigma, key_valid, lse, thr, window, top_k):
    b, h, hkv, tq, tk, d, ls, per_head, qn, kn = _common(q, k, log_sigma)
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), grad.to(q.dtype).contiguous()
    valid, has_valid = _valid_arg(key_valid, q)
    delta = q.new_empty((b, h, tq), dtype=torch.float32)  # written by the dq pass
    dq = torch.empty_like(q)
    dcoef = q.new_empty((b * h, tq), dtype=torch.float32)  # per query row
    common = dict(LS_PER_HEAD=per_head, HAS_VALID=has_valid, GRID=False, CHEB=False, PREC=_prec(q.dtype))
    bd = _pow2(d)
    _launch(_causal_dq_kernel, lambda meta: (b * h, _blocks(tq, meta["BLOCK_M"])),
        q, k, v, qn, kn, ls, valid, grad, lse, thr, delta, dq, dcoef,
        h, h // hkv, tq, tk, d, window, 0, 0, 1, 0, 0,
        KMODE=K.CAUSAL_KEYS, BLOCK_D=bd, **common,
    )
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _launch(_causal_dkdv_kernel, lambda meta: (b * hkv, _blocks(tk, meta["BLOCK_N"])),
        q, k, v, qn, kn, ls, valid, grad, lse, thr, delta, dk, dv,
        h, h // hkv, tq, tk, d, window, 0, 0, 1, 0, 0, tk, 1,
        QMODE=K.CAUSAL_QUERIES, BLOCK_D=bd, **common,
    )
    return dq, dk, dv, _dlog_sigma(dcoef, log_sigma, b, h)


@torch.library.custom_op("krause::triton_causal_fwd", mutates_args=())
def _causal_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sigma: torch.Tensor,
    key_valid: Optional[torch.Tensor], window: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_forward(q, k, v, log_sigma, key_valid, window, top_k)


@_causal_fwd_op.register_fake
def _(q, k, v, log_sigma, key_valid, window, top_k):
    b, h, tq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=torch.float32), q.new_empty((b, h, tq), dtype=torch.int64)


@torch.library.custom_op("krause::triton_causal_bwd", mutates_args=())
def _causal_bwd_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sigma: torch.Tensor,
    key_valid: Optional[torch.Tensor], lse: torch.Tensor, thr: torch.Tensor, window: int, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _causal_backward_impl(grad, q, k, v, log_sigma, key_valid, lse, thr, window, top_k)


@_causal_bwd_op.register_fake
def _(grad, q, k, v, log_sigma, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _causal_setup(ctx, inputs, output):
    q, k, v, log_sigma, key_valid, window, top_k = inputs
    out, lse, thr = output
    ctx.mark_non_differentiable(lse, thr)
    ctx.save_for_backward(q, k, v, log_sigma, lse, thr)
    ctx.key_valid, ctx.window, ctx.top_k = key_valid, window, top_k


def _causal_grad(ctx, grad, _glse, _gthr):
    q, k, v, log_sigma, lse, thr = ctx.saved_tensors
    dq, dk, dv, dls = _causal_bwd_op(grad, q, k, v, log_sigma, ctx.key_valid, lse, thr, ctx.window, ctx.top_k)
    return dq, dk, dv, dls, None, None, None


_causal_fwd_op.register_autograd(_causal_grad, setup_context=_causal_setup)


def _end_aligned(fn, tq, tk, *rest):
    # queries sit at positions tk - tq .. tk - 1: the per-position costs summed over them
    return fn(tk, *rest) - fn(tk - tq, *rest)


@register_flop_formula(torch.ops.krause.triton_causal_fwd)
def _causal_fwd_flops(q_shape, k_shape, v_shape, ls_shape, valid_shape, window, top_k, *args, **kwargs) -> int:
    b, h, tq, d = q_shape
    return b * h * _end_aligned(F.causal_forward_flops, tq, k_shape[2], d, window, top_k)


@register_flop_formula(torch.ops.krause.triton_causal_bwd)
def _causal_bwd_flops(g_shape, q_shape, k_shape, *args, **kwargs) -> int:
    window, top_k = args[-2], args[-1]
    b, h, tq, d = q_shape
    return b * h * _end_aligned(F.causal_backward_flops, tq, k_shape[2], d, window, top_k)


# --------------------------------------------------------------------------- 2-D local
def _local_launch_args(q, k, log_sigma, rows, cols, radius, metric, num_prefix):
    b, h, hkv, n, _, d, ls, per_head, qn, kn = _common(q, k, log_sigma)
    full = local2d_blocks((rows, cols), radius, num_prefix)[2]  # the prefix rows' tile (the band's: tuned)
    common = dict(LS_PER_HEAD=per_head, HAS_VALID=False, GRID=True, CHEB=metric == "chebyshev", PREC=_prec(q.dtype))
    return b, h, hkv, n, d, ls, qn, kn, full, _prefix_pad(num_prefix), common


def _local_forward(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix):
    b, h, hkv, n, d, ls, qn, kn, full, p_pad, common = _local_launch_args(
        q, k, log_sigma, rows, cols, radius, metric, num_prefix)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dummy = q.new_empty(1, dtype=torch.int8)
    out = torch.empty_like(q)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    thr = q.new_empty((b, h, n), dtype=torch.int64)
    bd = _pow2(d)
    max_cand = num_prefix + len(grid_offsets(radius, metric))
    scalars = (h, h // hkv, n, n, d, 1, num_prefix, p_pad, cols, radius)
    _launch(_local_fwd_kernel, lambda meta: (b * h, _blocks(n - num_prefix, meta["BLOCK_M"])),
        q, k, v, qn, kn, ls, dummy, out, lse, thr, *scalars, top_k if top_k < max_cand else 0, num_prefix,
        KMODE=K.GRID_BAND, BLOCK_D=bd, **common,
    )
    if num_prefix:
        _launch(K._fwd_kernel, (b * h, triton.cdiv(num_prefix, 16)),
            q, k, v, qn, kn, ls, dummy, out, lse, thr, *scalars, top_k if top_k < n else 0, 0,
            KMODE=K.ALL, BLOCK_M=16, BLOCK_N=full, BLOCK_D=bd, **common,
        )
    return out, lse, thr


def _local_backward_impl(grad, q, k, v, log_sigma, lse, thr, rows, cols, radius, metric, top_k, num_prefix):
    b, h, hkv, n, d, ls, qn, kn, full, p_pad, common = _local_launch_args(
        q, k, log_sigma, rows, cols, radius, metric, num_prefix)
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), grad.to(q.dtype).contiguous()
    dummy = q.new_empty(1, dtype=torch.int8)
    delta = q.new_empty((b, h, n), dtype=torch.float32)  # written by the dq passes
    bd = _pow2(d)
    scalars = (h, h // hkv, n, n, d, 1, num_prefix, p_pad, cols, radius)
    dq = torch.empty_like(q)
    dcoef = q.new_empty((b * h, n), dtype=torch.float32)  # per query row: each launch writes its own rows
    tensors = (q, k, v, qn, kn, ls, dummy, grad, lse, thr, delta)
    _launch(_local_dq_kernel, lambda meta: (b * h, triton.cdiv(n - num_prefix, meta["BLOCK_M"])),
        *tensors, dq, dcoef, *scalars, num_prefix,
        KMODE=K.GRID_BAND, BLOCK_D=bd, **common,
    )
    if num_prefix:
        _launch(K._bwd_dq_kernel, (b * h, triton.cdiv(num_prefix, 16)),
            *tensors, dq, dcoef, *scalars, 0,
            KMODE=K.ALL, BLOCK_M=16, BLOCK_N=full, BLOCK_D=bd, **common,
        )
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # patch keys: their queries are the prefix rows and the symmetric patch band
    _launch(_local_dkdv_kernel, lambda meta: (b * hkv, triton.cdiv(n - num_prefix, meta["BLOCK_N"])),
        *tensors, dk, dv, *scalars, num_prefix, n, 1,
        QMODE=K.GRID_BAND, BLOCK_D=bd, **common,
    )
    if num_prefix:  # prefix keys: every query, in chunks
        _launch(K._bwd_dkdv_kernel, (b * hkv, triton.cdiv(num_prefix, 16)),
            *tensors, dk, dv, *scalars, 0, num_prefix, triton.cdiv(n, 64),
            QMODE=K.ALL, BLOCK_N=16, BLOCK_Q=64, BLOCK_D=bd, **common,
        )
    return dq, dk, dv, _dlog_sigma(dcoef, log_sigma, b, h)


@torch.library.custom_op("krause::triton_local2d_fwd", mutates_args=())
def _local_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sigma: torch.Tensor,
    rows: int, cols: int, radius: int, metric: str, top_k: int, num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _local_forward(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix)


@_local_fwd_op.register_fake
def _(q, k, v, log_sigma, rows, cols, radius, metric, top_k, num_prefix):
    b, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32), q.new_empty((b, h, n), dtype=torch.int64)


@torch.library.custom_op("krause::triton_local2d_bwd", mutates_args=())
def _local_bwd_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sigma: torch.Tensor,
    lse: torch.Tensor, thr: torch.Tensor,
    rows: int, cols: int, radius: int, metric: str, top_k: int, num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _local_backward_impl(grad, q, k, v, log_sigma, lse, thr, rows, cols, radius, metric, top_k, num_prefix)


@_local_bwd_op.register_fake
def _(grad, q, k, v, log_sigma, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_sigma.new_empty(log_sigma.shape)


def _local_setup(ctx, inputs, output):
    q, k, v, log_sigma, *static = inputs
    out, lse, thr = output
    ctx.mark_non_differentiable(lse, thr)
    ctx.save_for_backward(q, k, v, log_sigma, lse, thr)
    ctx.static = static


def _local_grad(ctx, grad, _glse, _gthr):
    q, k, v, log_sigma, lse, thr = ctx.saved_tensors
    dq, dk, dv, dls = _local_bwd_op(grad, q, k, v, log_sigma, lse, thr, *ctx.static)
    return dq, dk, dv, dls, *([None] * len(ctx.static))


_local_fwd_op.register_autograd(_local_grad, setup_context=_local_setup)


@register_flop_formula(torch.ops.krause.triton_local2d_fwd)
def _local_fwd_flops(q_shape, k_shape, v_shape, ls_shape, rows, cols, radius, metric, top_k, num_prefix,
                     *args, **kwargs) -> int:
    b, h, _, d = q_shape
    return b * h * F.local2d_forward_flops((rows, cols), d, radius, metric, top_k, num_prefix)


@register_flop_formula(torch.ops.krause.triton_local2d_bwd)
def _local_bwd_flops(g_shape, q_shape, k_shape, v_shape, ls_shape, lse_shape, thr_shape,
                     rows, cols, radius, metric, top_k, num_prefix, *args, **kwargs) -> int:
    b, h, _, d = q_shape
    return b * h * F.local2d_backward_flops((rows, cols), d, radius, metric, top_k, num_prefix)


# --------------------------------------------------------------------------- decode
@torch.library.custom_op("krause::triton_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, log_sigma: torch.Tensor,
    lengths: torch.Tensor, valid: Optional[torch.Tensor], pos: int, window: int, top_k: int,
) -> torch.Tensor:
    b, h, d = q.shape
    hkv, capacity = k_ring.shape[1], k_ring.shape[2]
    g = h // hkv
    ls = log_sigma.detach().float().reshape(-1).contiguous()
    q, k_ring, v_ring = q.contiguous(), k_ring.contiguous(), v_ring.contiguous()
    qn = torch.linalg.vector_norm(q, 2, dim=-1, dtype=torch.float32).square().contiguous()
    kn = torch.linalg.vector_norm(k_ring, 2, dim=-1, dtype=torch.float32).square().contiguous()
    valid_arg, has_valid = _valid_arg(valid, q)
    out = torch.empty_like(q)
    _launch(K._decode_kernel, (b * hkv,),
        q, k_ring, v_ring, qn, kn, ls, lengths.to(torch.int32).contiguous(), valid_arg, out,
        h, g, capacity, d, window, pos, top_k if top_k < min(window, capacity) else 0,
        LS_PER_HEAD=log_sigma.dim() == 1, HAS_VALID=has_valid, PREC=_prec(q.dtype),
        BLOCK_M=_pow2(g), BLOCK_N=_pow2(capacity), BLOCK_D=_pow2(d),
    )
    return out


@_decode_op.register_fake
def _(q, k_ring, v_ring, log_sigma, lengths, valid, pos, window, top_k):
    return q.new_empty(q.shape)


@register_flop_formula(torch.ops.krause.triton_decode)
def _decode_flops(q_shape, k_shape, *args, **kwargs) -> int:
    window, top_k = args[-2], args[-1]
    b, h, d = q_shape
    w = min(window, k_shape[2])
    # one query at a full ring: the cost of the last position of a W-token sequence
    return b * h * (F.causal_forward_flops(w, d, w, top_k) - F.causal_forward_flops(w - 1, d, w, top_k))
