"""impl="flex" (FlexAttention) against the dense reference: outputs and gradients.

On CPU FlexAttention runs its unfused eager implementation (and, for gradients, its
higher-order op's generic backward; see krause/flex.py), so these tests check the
augmented-vector scores, the top-k thresholds, the score_mod / mask_mod logic and the
scale-gradient routing. The block-sparse structure is not used by the eager path, so the
causal BlockMask is checked separately against FlexAttention's own create_block_mask and,
in a slow test, through the compiled (block-skipping) inductor CPU kernel. Nothing here
runs the CUDA Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import krause
from krause import flex

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _inputs(b, h, hkv, n, d, per_head_sigma, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    if per_head_sigma:
        log_sigma = 0.3 + 0.4 * torch.rand(h, generator=g)
    else:
        log_sigma = torch.tensor(0.45)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_sigma


def _run_with_grads(fn, q, k, v, log_sigma, impl):
    q, k, v, log_sigma = (x.detach().clone().requires_grad_() for x in (q, k, v, log_sigma))
    out = fn(q, k, v, log_sigma, impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    (out * grad_out).sum().backward()
    return out, q.grad, k.grad, v.grad, log_sigma.grad


def _assert_matches_reference(fn, q, k, v, log_sigma, atol=1e-4, rtol=1e-4):
    got = _run_with_grads(fn, q, k, v, log_sigma, "flex")
    want = _run_with_grads(fn, q, k, v, log_sigma, "reference")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_sigma"), got, want):
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# Shapes, GQA, padding and gradients against the oracle: tests/test_conformance.py.
def test_causal_flex_float_log_sigma_and_no_grad():
    q, k, v, _ = _inputs(2, 2, 1, 10, 8, False, seed=3)
    with torch.no_grad():  # the public (non-differentiable) eager flex_attention path
        got = krause.causal_krause_attention(q, k, v, 0.2, 4, 2, impl="flex")
    want = krause.causal_krause_attention(q, k, v, 0.2, 4, 2, impl="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_select_like_fp32(dtype):
    """16-bit inputs: the kernel sees |k|^2 to fp32 accuracy (split into pieces), so the
    kept keys agree with the reference's fp32 distances and only output rounding differs."""
    q, k, v, log_sigma = _inputs(1, 2, 2, 1 + 12 * 11, 8, True, seed=0, dtype=dtype)
    args = ((12, 11), 2, "chebyshev", 8, 1)
    with torch.no_grad():
        got = krause.local_krause_attention_2d(q, k, v, log_sigma, *args, impl="flex")
        want = krause.local_krause_attention_2d(q, k, v, log_sigma, *args, impl="reference")
    assert got.dtype == dtype
    # One rounding of outputs of magnitude < 4 in the 16-bit dtype; a wrongly kept key
    # would move an output by ~0.1 or more.
    tol = 2.0 * torch.finfo(dtype).eps * 4
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


def test_float64_inputs():
    """fp64 runs the eager kernel in fp64 and returns fp64 (the reference computes in fp32)."""
    q, k, v, log_sigma = _inputs(1, 2, 2, 9, 4, True, seed=5, dtype=torch.float64)
    log_sigma = log_sigma.double()

    def fn(q, k, v, ls, impl):
        return krause.causal_krause_attention(q, k, v, ls, 4, 2, impl=impl)

    _assert_matches_reference(fn, q, k, v, log_sigma, atol=1e-5, rtol=1e-5)


def test_exact_ties_keep_every_tied_candidate():
    """Documented difference: at an exact tie at the k-th distance the flex path keeps all
    tied candidates (the reference keeps exactly top_k)."""
    d = 4
    q = torch.zeros(1, 1, 3, d)
    k = torch.zeros(1, 1, 3, d)
    k[0, 0, 0, 0], k[0, 0, 1, 0], k[0, 0, 2, 0] = 1.0, -1.0, 2.0  # distances from 0: 1, 1, 4
    v = torch.randn(1, 1, 3, d, generator=torch.Generator().manual_seed(0))
    flex_out = krause.causal_krause_attention(q, k, v, 0.0, 3, 1, impl="flex")
    ref_out = krause.causal_krause_attention(q, k, v, 0.0, 3, 1, impl="reference")
    torch.testing.assert_close(flex_out[0, 0, 2], 0.5 * (v[0, 0, 0] + v[0, 0, 1]))
    assert any(torch.allclose(ref_out[0, 0, 2], v[0, 0, j]) for j in (0, 1))


def test_halfway_threshold():
    inf = float("inf")
    dist = torch.tensor([[3.0, 1.0, 2.0, inf], [1.0, inf, inf, inf], [2.0, 2.0, 5.0, 0.5]])
    tau = flex._halfway_threshold(dist, 2)
    torch.testing.assert_close(tau, torch.tensor([2.5, inf, 2.0]))
    assert torch.isinf(flex._halfway_threshold(dist, 4)).all()


def _dense_blocks(num, idx, num_kv_blocks):
    num, idx = num[0, 0], idx[0, 0]
    dense = torch.zeros(idx.shape[0], num_kv_blocks, dtype=torch.bool)
    for row in range(idx.shape[0]):
        dense[row, idx[row, : num[row]].long()] = True
    return dense


@pytest.mark.parametrize(
    "t,window,block",
    [(13, 5, 4), (64, 16, 16), (100, 7, 16), (96, 40, 32), (33, 33, 16), (10, 64, 16), (256, 32, 32), (200, 100, 64)],
)
def test_causal_block_mask_equals_create_block_mask(t, window, block):
    ours = flex.causal_block_mask(t, window, block, "cpu")
    theirs = create_block_mask(flex._band_mask_mod(window), None, None, t, t, device="cpu", BLOCK_SIZE=block)
    nkb = -(-t // block)
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    assert ours.seq_lengths == theirs.seq_lengths
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        a = _dense_blocks(getattr(ours, num), getattr(ours, idx), nkb)
        b = _dense_blocks(getattr(theirs, num), getattr(theirs, idx), nkb)
        assert torch.equal(a, b), num
    # Every candidate pair lies in a listed block: the band is covered, nothing is skipped.
    covered = ours.to_dense()[0, 0].repeat_interleave(block, 0).repeat_interleave(block, 1)[:t, :t].bool()
    assert covered[krause.masks.causal_window_mask(t, window)].all()


def test_grid_mask_mod_equals_candidate_mask():
    cases = (((4, 5), 1, "manhattan", 1), ((5, 4), 2, "chebyshev", 2), ((3, 3), 0, "chebyshev", 0))
    for grid, radius, metric, p in cases:
        n = p + grid[0] * grid[1]
        mask_mod = flex._grid_mask_mod(grid[1], radius, metric, p)
        i = torch.arange(n)[:, None].expand(n, n)
        j = torch.arange(n)[None, :].expand(n, n)
        zero = torch.zeros((), dtype=torch.long)
        got = mask_mod(zero, zero, i, j)
        want = krause.masks.grid_candidate_mask(grid, radius, metric, p)
        assert torch.equal(got, want), (grid, radius, metric, p)


@pytest.mark.slow
def test_compiled_block_sparse_kernel_on_cpu():
    """The compiled (inductor) FlexAttention kernel with our BlockMask, score_mod buffers and
    GQA. Inductor's CPU template, unlike the eager path, really skips empty blocks and
    runs no mask_mod on full ones, so this checks the block structure end to end. (The
    CUDA Triton kernel is generated from the same BlockMask / score_mod / mask_mod.)"""
    b, h, hkv, t, d, window, top_k, block = 1, 4, 2, 120, 16, 40, 6, 16
    q, k, v, log_sigma = _inputs(b, h, hkv, t, d, True, seed=7)
    block_mask = flex.causal_block_mask(t, window, block, "cpu")
    assert int(block_mask.full_kv_num_blocks.sum()) > 0  # full blocks (no mask_mod) are exercised
    nb = -(-t // block)
    listed = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
    assert listed < nb * (nb + 1) // 2  # fewer blocks than plain causal: blocks left of the band are skipped
    with torch.no_grad():
        q_aug, k_aug, v_aug, scale = flex._prepare(q, k, v, log_sigma)
        threshold = flex._causal_threshold(q, k, window, top_k)
        compiled = torch.compile(flex.flex_attention, dynamic=False)
        out = compiled(q_aug, k_aug, v_aug, score_mod=flex._krause_score_mod(threshold, scale),
                       block_mask=block_mask, scale=1.0, enable_gqa=True)
    want = krause.causal_krause_attention(q, k, v, log_sigma, window, top_k, impl="reference")
    torch.testing.assert_close(out[..., :d], want, atol=1e-5, rtol=1e-5)
