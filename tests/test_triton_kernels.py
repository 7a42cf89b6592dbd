"""The Triton kernels against a dense reference with the documented tie rule.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before
triton is first imported: the flag is read when a kernel is decorated). The reference
here is ``krause.reference.krause_attention_dense`` with the selection made explicit:
candidates sorted stably by distance, so at equal distance the lower key index is kept
first (torch.topk's choice among ties is unspecified). It runs in float64.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The default tiles (fast on a GPU: no tuning per shape, and the same bits every run); the
# tuners' own tests below switch tuning on.
os.environ.setdefault("KRAUSE_TRITON_AUTOTUNE", "0")

triton = pytest.importorskip("triton")

from krause import kernels  # noqa: E402
from krause.masks import grid_candidate_mask  # noqa: E402

from dense_oracle import dense_rule, sorted_candidate_distances, window_candidates  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)


# --------------------------------------------------------------------------- reference
def make_inputs(b, h, hkv, tq, tk, d, dtype=torch.float32, per_head=False, seed=0, dup_keys=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    if dup_keys:  # only dup_keys distinct keys, repeated along the sequence: exact distance ties
        k = k[:, :, torch.arange(tk) % dup_keys]
    ls = (0.3 * torch.randn(h, generator=g) + 0.8) if per_head else torch.tensor(0.8)
    go = torch.randn(b, h, tq, d, generator=g)
    leaves = [t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v)]
    ls = ls.to(DEVICE).requires_grad_(True)
    return leaves, ls, go.to(DEVICE, dtype)


def near_tie_rows(q, k, cand, top_k, gap):
    """(B, H, Tq) bool: rows whose top_k-th and next candidate distances differ by less than
    ``gap`` (float64) — at real sizes fp32 rounding may order such a pair either way."""
    far = sorted_candidate_distances(q, k, cand)
    if top_k >= far.shape[-1]:
        return torch.zeros(far.shape[:-1], dtype=torch.bool)
    return (far[..., top_k] - far[..., top_k - 1]) < gap  # inf - inf = nan: not near


def check_against_rule(out, leaves, ls, go, ref_fn, atol, grad_atol, skip_rows=None):
    """Output and every gradient of the kernel against the float64 rule-following reference.
    ``skip_rows`` (B, H, Tq): rows left out (zero output gradient, outputs not compared)."""
    if skip_rows is not None:
        go = go.masked_fill(skip_rows.to(go.device)[..., None], 0.0)
    grads = torch.autograd.grad(out, [*leaves, ls], go)
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in (*leaves, ls)]
    ref, keep = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.cpu().double())
    got_out, want_out = out.detach().cpu().double(), ref.detach()
    if skip_rows is not None:
        got_out, want_out = got_out[~skip_rows], want_out[~skip_rows]
    torch.testing.assert_close(got_out, want_out, atol=atol, rtol=0)
    for name, got, want in zip(("q", "k", "v", "log_sigma"), grads, ref_grads):
        assert got.shape == want.shape, name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.cpu().double(), want, atol=grad_atol * scale, rtol=0, msg=lambda m: f"d{name}: {m}")
    return keep


# --------------------------------------------------------------------------- causal
# Shapes, end alignment, padding, GQA and exact ties: tests/test_conformance.py (every
# implementation on one grid). Here what only the kernels have: fp16, their tile sizes.
def test_causal_bf16_and_fp16():
    for dtype in (torch.bfloat16, torch.float16):
        b, h, hkv, t, d, window, top_k = 1, 4, 2, 29, 32, 8, 4
        leaves, ls, go = make_inputs(b, h, hkv, t, t, d, dtype=dtype, per_head=True, seed=3)
        out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
        assert out.dtype == dtype
        cand = window_candidates(b, t, t, window)
        check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), 3e-2, 3e-2)


def test_benchmark_tile_sizes():
    """The tiles of the GPU benchmark's settings (W=32, top_k=16: 32-query blocks, 64-key tiles)."""
    b, h, hkv, t, d, window, top_k = 1, 4, 1, 100, 64, 32, 16
    leaves, ls, go = make_inputs(b, h, hkv, t, t, d, dtype=torch.bfloat16, per_head=True, seed=11)
    out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
    cand = window_candidates(b, t, t, window)
    check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), 3e-2, 3e-2)
    grid, n = (14, 14), 197  # ViT/16 at 224 px: 128-key band tiles, a 256-key prefix-row tile
    leaves, ls, go = make_inputs(1, 2, 2, n, n, 32, seed=12)
    out = kernels.local_krause_attention_2d_triton(*leaves, ls, grid, 2, "chebyshev", 8, 1)
    cand = grid_candidate_mask(grid, 2, "chebyshev", 1)[None]
    check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, 8), 1e-4, 1e-4)


def test_causal_forward_tile_candidates():
    """Pinned (KRAUSE_TRITON_AUTOTUNE=0, or the interpreter): the one default config per window;
    tuning: every candidate whose key tile fits."""
    from krause.kernels import ops

    configs = ops.CAUSAL_FWD_CONFIGS
    pinned = pytest.MonkeyPatch.context()
    with pinned as mp:
        mp.setattr(ops, "autotune_enabled", lambda: False)
        for window, block in ((8, 16), (32, 32), (128, 64)):
            (only,) = ops._causal_fwd_kernel.early_config_prune(configs, {"W": window})
            assert only.kwargs["BLOCK_M"] == block == ops.causal_blocks(window)[0] and only.num_warps == 4
    tuning = pytest.MonkeyPatch.context()
    with tuning as mp:
        mp.setattr(ops, "autotune_enabled", lambda: True)
        assert ops._causal_fwd_kernel.early_config_prune(configs, {"W": 32}) == configs
        wide = ops._causal_fwd_kernel.early_config_prune(configs, {"W": 2000})  # 64 + 1999 keys need a 4096 tile
        assert {c.kwargs["BLOCK_M"] for c in wide} == {16, 32}


def test_autotune_switch_reads_the_environment(monkeypatch):
    from krause.kernels import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KRAUSE_TRITON_AUTOTUNE", raising=False)
    assert ops.autotune_enabled()
    monkeypatch.setenv("KRAUSE_TRITON_AUTOTUNE", "0")
    assert not ops.autotune_enabled()
    monkeypatch.setenv("KRAUSE_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no device to time
    assert not ops.autotune_enabled()


def test_causal_backward_tile_candidates():
    """The backward's two passes prune the same way: dq over query blocks, dk/dv over key blocks."""
    from krause.kernels import ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "autotune_enabled", lambda: False)
        for window, block in ((8, 16), (32, 32), (128, 64)):
            (dq,) = ops._causal_dq_kernel.early_config_prune(ops.CAUSAL_DQ_CONFIGS, {"W": window})
            (dkdv,) = ops._causal_dkdv_kernel.early_config_prune(ops.CAUSAL_DKDV_CONFIGS, {"W": window})
            assert dq.kwargs["BLOCK_M"] == dkdv.kwargs["BLOCK_N"] == block and dq.num_warps == dkdv.num_warps == 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "autotune_enabled", lambda: True)
        assert ops._causal_dkdv_kernel.early_config_prune(ops.CAUSAL_DKDV_CONFIGS, {"W": 32}) == ops.CAUSAL_DKDV_CONFIGS
        wide = ops._causal_dkdv_kernel.early_config_prune(ops.CAUSAL_DKDV_CONFIGS, {"W": 2000})
        assert {c.kwargs["BLOCK_N"] for c in wide} == {16, 32}


def test_every_causal_backward_config_gives_the_rule(monkeypatch):
    """Each tile of the backward's dq and dk/dv passes alone (as the autotuner runs them) gives the
    rule's gradients, incl. dlog_sigma, which sums per-row partials whatever the block."""
    from krause.kernels import ops

    b, h, hkv, t, d, window, top_k = 1, 2, 1, 40, 16, 8, 4
    leaves, ls, go = make_inputs(b, h, hkv, t, t, d, per_head=True, seed=6)
    cand = window_candidates(b, t, t, window)
    default_dq = ops._causal_dq_kernel.early_config_prune(ops.CAUSAL_DQ_CONFIGS, {"W": window})[0]
    default_kv = ops._causal_dkdv_kernel.early_config_prune(ops.CAUSAL_DKDV_CONFIGS, {"W": window})[0]
    cases = [(c, default_kv) for c in ops.CAUSAL_DQ_CONFIGS if c.num_warps == 4] + \
        [(default_dq, c) for c in ops.CAUSAL_DKDV_CONFIGS if c.num_warps == 4]
    for dq_config, kv_config in cases:
        for tuner, config in ((ops._causal_dq_kernel, dq_config), (ops._causal_dkdv_kernel, kv_config)):
            monkeypatch.setattr(tuner, "cache", {})
            monkeypatch.setattr(tuner, "early_config_prune", lambda configs, nargs, c=config, **kw: [c])
        out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
        check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), 1e-4, 1e-4)
        assert ops._causal_dq_kernel.best_config is dq_config and ops._causal_dkdv_kernel.best_config is kv_config


def test_every_causal_forward_config_gives_the_rule(monkeypatch):
    """The autotuner's own path: all candidates run and are timed (here by wall clock under the
    interpreter), the fastest is kept, and every one of them computes the rule."""
    from krause.kernels import ops

    monkeypatch.setattr(ops, "autotune_enabled", lambda: True)
    tuner = ops._causal_fwd_kernel
    timed = []

    def wall_clock(call, quantiles):
        import time

        start = time.perf_counter()
        call()
        timed.append(time.perf_counter() - start)
        return [timed[-1]] * len(quantiles)

    monkeypatch.setattr(tuner, "_do_bench", wall_clock)
    monkeypatch.setattr(tuner, "cache", {})
    b, h, hkv, t, d, window, top_k = 1, 2, 1, 40, 16, 8, 4
    leaves, ls, go = make_inputs(b, h, hkv, t, t, d, seed=5)
    cand = window_candidates(b, t, t, window)
    with torch.no_grad():
        out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
    assert len(timed) == len(ops.CAUSAL_FWD_CONFIGS) and tuner.best_config in ops.CAUSAL_FWD_CONFIGS
    want = dense_rule(*(x.detach().double().cpu() for x in leaves), ls.detach().double().cpu(), cand, top_k)[0]
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4)
    for config in ops.CAUSAL_FWD_CONFIGS:  # each candidate alone
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "early_config_prune", lambda configs, nargs, c=config, **kw: [c])
        with torch.no_grad():
            got = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
        assert tuner.best_config is config
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 2-D
def test_local2d_band_candidates():
    """Pinned: the default block of `local2d_blocks` alone; tuning: every block whose band tile fits."""
    from krause.kernels import ops

    for cols, radius, prefix in ((14, 2, 1), (8, 1, 0), (60, 15, 1)):
        args = {"cols": cols, "radius": radius, "P": prefix}
        block = ops.local2d_blocks((cols, cols), radius, prefix)[0]
        for configs, prune, name in ((ops.LOCAL2D_CONFIGS, ops._local_fwd_kernel.early_config_prune, "BLOCK_M"),
                                     (ops.LOCAL2D_DKDV_CONFIGS, ops._local_dkdv_kernel.early_config_prune, "BLOCK_N")):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ops, "autotune_enabled", lambda: False)
                (only,) = prune(configs, args)
            assert only.kwargs[name] == block and only.num_warps == 4
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ops, "autotune_enabled", lambda: True)
                tuned = prune(configs, args)
            fits = {c.kwargs[name] for c in configs if ops._grid_band(cols, radius, prefix, c.kwargs[name])[1] <= ops.MAX_TILE}
            assert {c.kwargs[name] for c in tuned} == (fits or {configs[0].kwargs[name]})


def test_every_local2d_config_gives_the_rule(monkeypatch):
    """Each block of the 2-D band kernels alone (forward, dq, dk/dv), with a prefix token: the rule's output
    and gradients."""
    from krause.kernels import ops

    grid, num_prefix, radius, top_k = (5, 5), 1, 1, 3
    n = num_prefix + 25
    leaves, ls, go = make_inputs(1, 2, 1, n, n, 16, per_head=True, seed=8)
    cand = grid_candidate_mask(grid, radius, "manhattan", num_prefix)[None]
    tuners = (ops._local_fwd_kernel, ops._local_dq_kernel, ops._local_dkdv_kernel)
    for block in (16, 32, 64):
        for tuner in tuners:
            name = "BLOCK_N" if tuner is ops._local_dkdv_kernel else "BLOCK_M"
            (config,) = [c for c in tuner.configs if c.kwargs[name] == block and c.num_warps == 4]
            monkeypatch.setattr(tuner, "cache", {})
            monkeypatch.setattr(tuner, "early_config_prune", lambda configs, nargs, c=config, **kw: [c])
        out = kernels.local_krause_attention_2d_triton(*leaves, ls, grid, radius, "manhattan", top_k, num_prefix)
        check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), 1e-4, 1e-4)
        assert all(t.best_config.kwargs.get("BLOCK_N" if t is ops._local_dkdv_kernel else "BLOCK_M") == block
                   for t in tuners)


# The grid cases: tests/test_conformance.py.
def test_local2d_duplicate_patches_and_bf16():
    grid, num_prefix, top_k = (5, 5), 1, 4
    n = num_prefix + 25
    leaves, ls, go = make_inputs(1, 2, 2, n, n, 16, dtype=torch.bfloat16, seed=5, dup_keys=4)
    out = kernels.local_krause_attention_2d_triton(*leaves, ls, grid, 1, "chebyshev", top_k, num_prefix)
    assert torch.equal(out, kernels.local_krause_attention_2d_triton(*leaves, ls, grid, 1, "chebyshev", top_k, num_prefix))
    cand = grid_candidate_mask(grid, 1, "chebyshev", num_prefix)[None]
    check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), 3e-2, 3e-2)


# --------------------------------------------------------------------------- decode
def test_decode_matches_rule_with_ring_and_left_padding():
    b, h, hkv, w, d, top_k = 3, 4, 2, 8, 16, 3
    g = torch.Generator().manual_seed(6)
    pos = 11  # the ring has wrapped: slot s holds token p with p % 8 == s
    k_ring = torch.randn(b, hkv, w, d, generator=g)
    k_ring[:, :, 5] = k_ring[:, :, 1]  # an exact tie between two slots
    v_ring = torch.randn(b, hkv, w, d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    ls = 0.3 * torch.randn(h, generator=g) + 0.8
    lengths = torch.tensor([11, 5, 2])  # row 1: 6 tokens of left padding; row 2: only 2 real tokens
    out = kernels.decode_krause_attention_triton(q.to(DEVICE), k_ring.to(DEVICE), v_ring.to(DEVICE), ls.to(DEVICE),
                                                lengths.to(DEVICE), top_k, pos=pos)
    # reference: slots in token order, then the causal rule on the last query
    tokens = torch.arange(pos - w, pos)
    slots = tokens % w
    keys, values = k_ring[:, :, slots], v_ring[:, :, slots]
    real = tokens[None, :] >= (pos - lengths)[:, None]
    ref, _ = dense_rule(q[:, :, None], keys, values, ls, real[:, None, :], top_k)
    torch.testing.assert_close(out.cpu().double(), ref[:, :, 0], atol=1e-4, rtol=0)
    # (B, H, 1, D) in, same shape out
    out4 = kernels.decode_krause_attention_triton(q[:, :, None].to(DEVICE), k_ring.to(DEVICE), v_ring.to(DEVICE),
                                                 ls.to(DEVICE), lengths.to(DEVICE), top_k, pos=pos)
    assert out4.shape == (b, h, 1, d) and torch.equal(out4[:, :, 0], out)
    # bf16 ring and query: the same within bf16 rounding of the output
    half = kernels.decode_krause_attention_triton(*(x.to(DEVICE, torch.bfloat16) for x in (q, k_ring, v_ring)),
                                                 ls.to(DEVICE), lengths.to(DEVICE), top_k, pos=pos)
    assert half.dtype == torch.bfloat16
    ref_half, _ = dense_rule(q.bfloat16()[:, :, None], keys.bfloat16(), values.bfloat16(), ls, real[:, None, :], top_k)
    torch.testing.assert_close(half.cpu().double(), ref_half[:, :, 0], atol=2e-2, rtol=0)


def test_decode_equals_krause_window_layer_steps():
    """Against the decoding cache (krause.cache.KrauseWindowLayer), its window laid out as a
    ring of capacity > window: per-slot padding, a wrapped ring."""
    from krause.cache import KrauseWindowLayer

    b, h, hkv, d, window, capacity, top_k = 2, 4, 2, 16, 6, 8, 3
    g = torch.Generator().manual_seed(14)
    ls = (0.3 * torch.randn(h, generator=g) + 0.8).to(DEVICE)
    cache = KrauseWindowLayer(window, top_k)
    prompt = 5
    mask = torch.ones(b, prompt, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is left-padded
    q, k, v = (torch.randn(b, n, prompt, d, generator=g).to(DEVICE) for n in (h, hkv, hkv))
    cache.attend(q, k, v, ls, key_padding_mask=mask.to(DEVICE))
    for _ in range(7):  # single-token steps until the ring has wrapped
        q, k, v = (torch.randn(b, n, 1, d, generator=g).to(DEVICE) for n in (h, hkv, hkv))
        want = cache.attend(q, k, v, ls)
        slots = (torch.arange(cache.seen - cache.num_cached, cache.seen) % capacity).to(DEVICE)
        k_ring, v_ring = (torch.zeros(b, hkv, capacity, d, device=DEVICE) for _ in range(2))
        valid = torch.zeros(b, capacity, dtype=torch.bool, device=DEVICE)
        k_ring[:, :, slots], v_ring[:, :, slots], valid[:, slots] = cache.keys, cache.values, cache.valid
        got = kernels.decode_krause_attention_triton(q, k_ring, v_ring, ls, None, top_k, pos=cache.seen,
                                                    window=window, valid=valid)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- op plumbing
def test_public_ops_route_to_the_kernels():
    """krause.causal_krause_attention / local_krause_attention_2d with impl="triton" (the
    dispatcher's path) equal the engine, also on non-contiguous (B, T, H, D)-transposed inputs."""
    import krause

    g = torch.Generator().manual_seed(15)
    q = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).transpose(1, 2)[:, :, 5:]
    k, v = (torch.randn(1, 20, 1, 16, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
    mask = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    mask[0, :4] = False
    got = krause.causal_krause_attention(q, k, v, 0.3, 6, 3, key_padding_mask=mask, impl="triton")
    want = krause.causal_krause_attention(q, k, v, 0.3, 6, 3, key_padding_mask=mask, impl="fast")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 2, 21, 16, generator=g).to(DEVICE)
    got = krause.local_krause_attention_2d(x, x, x, 0.3, (4, 5), 1, "manhattan", 3, 1, impl="triton")
    want = krause.local_krause_attention_2d(x, x, x, 0.3, (4, 5), 1, "manhattan", 3, 1, impl="fast")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flop_counter_and_fake_kernels_see_the_ops():
    from torch.utils.flop_counter import FlopCounterMode

    from krause import flops as F

    b, h, t, d, window, top_k = 1, 2, 20, 16, 6, 3
    leaves, ls, go = make_inputs(b, h, h, t, t, d)
    with FlopCounterMode(display=False) as counter:
        out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
        out.backward(go)
    expected = b * h * (F.causal_forward_flops(t, d, window, top_k) + F.causal_backward_flops(t, d, window, top_k))
    assert counter.get_total_flops() == expected
    # end-aligned queries count only their own positions; 2-D and decode from krause.flops too
    with FlopCounterMode(display=False) as counter:
        kernels.causal_krause_attention_triton(leaves[0][:, :, -5:].detach(), *leaves[1:], ls, window, top_k)
    per_head = F.causal_forward_flops(t, d, window, top_k) - F.causal_forward_flops(t - 5, d, window, top_k)
    assert counter.get_total_flops() == b * h * per_head
    x = torch.randn(1, 2, 13, 16, device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        kernels.local_krause_attention_2d_triton(x, x, x, ls, (3, 4), 1, "manhattan", 3, 1)
    assert counter.get_total_flops() == 2 * F.local2d_forward_flops((3, 4), 16, 1, "manhattan", 3, 1)
    with FlopCounterMode(display=False) as counter:
        kernels.decode_krause_attention_triton(x[:, :, 0], x[:, :, :8], x[:, :, :8], ls, torch.tensor([9]), 3)
    assert counter.get_total_flops() == 2 * 2 * 16 * (8 + 3)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq = torch.empty(b, h, t, d, device=DEVICE)
        fo, lse, thr = torch.ops.krause.triton_causal_fwd(fq, fq, fq, torch.empty((), device=DEVICE), None, window, top_k)
        assert fo.shape == fq.shape and thr.dtype == torch.int64


def test_custom_op_registrations_pass_opcheck():
    # schema, fake kernel, autograd registration and AOT dispatch of each op
    ls = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    q, k, v = (torch.randn(1, h, 12, 16, device=DEVICE, requires_grad=True) for h in (2, 1, 1))
    mask = torch.ones(1, 12, dtype=torch.bool, device=DEVICE)
    mask[0, :3] = False
    for valid in (None, mask):
        torch.library.opcheck(torch.ops.krause.triton_causal_fwd, (q, k, v, ls, valid, 4, 2))
    q, k, v = (torch.randn(1, 2, 13, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.krause.triton_local2d_fwd, (q, k, v, ls, 3, 4, 1, "manhattan", 3, 1))
    torch.library.opcheck(torch.ops.krause.triton_decode, (
        q[:, :, 0].detach(), k[:, :, :8].detach(), v[:, :, :8].detach(), ls.detach(),
        torch.tensor([5], device=DEVICE), None, 5, 8, 3))


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    leaves, ls, go = make_inputs(1, 2, 1, 12, 12, 16, seed=13)
    fn = torch.compile(lambda q, k, v, s: kernels.causal_krause_attention_triton(q, k, v, s, 4, 2), fullgraph=True)
    out = fn(*leaves, ls)
    eager = kernels.causal_krause_attention_triton(*leaves, ls, 4, 2)
    torch.testing.assert_close(out, eager)
    got = torch.autograd.grad(out, leaves, go)
    want = torch.autograd.grad(eager, leaves, go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every other test compiles and runs the kernels")
def test_causal_kernels_compile_for_sm90():
    """The interpreter never compiles: build the causal launches, every autotuned block, for Hopper (no GPU
    needed)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "krause.kernels.compile_check", "--arch", "90", "--dtype", "bf16",
                          "--head-dim", "64", "--only", "causal"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    from krause.kernels import compile_check, ops

    assert run.stdout.count(" ok ") == 3 * len(compile_check.tuned_causal_blocks(ops, 32)) == 9, run.stdout


def test_bad_arguments_name_themselves():
    leaves, ls, _ = make_inputs(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="window"):
        kernels.causal_krause_attention_triton(*leaves, ls, 0, 3)
    with pytest.raises(ValueError, match="k has 8 tokens|q has 9"):
        q9 = torch.randn(1, 2, 9, 16, device=DEVICE)
        kernels.causal_krause_attention_triton(q9, leaves[1], leaves[2], ls, 4, 3)
    with pytest.raises(ValueError, match="dtype"):
        kernels.causal_krause_attention_triton(leaves[0].double(), leaves[1].double(), leaves[2].double(), ls, 4, 3)
    with pytest.raises(ValueError, match="window"):
        kernels.causal_krause_attention_triton(*leaves, ls, 2000, 3)
    assert kernels.causal_triton_supported(1985)[0] and not kernels.causal_triton_supported(1986)[0]
    assert not kernels.local2d_triton_supported((60, 60), 1, 1)[0]
    assert kernels.triton_available()[0]


# --------------------------------------------------------------------------- CUDA only
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_real_sizes_match_rule(dtype):
    b, h, hkv, t, d, window, top_k = 1, 8, 2, 1000, 128, 32, 16
    leaves, ls, go = make_inputs(b, h, hkv, t, t, d, dtype=dtype, per_head=True, seed=7)
    out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
    cand = window_candidates(b, t, t, window)
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
    skip = near_tie_rows(leaves[0], leaves[1], cand, top_k, 1e-2)
    assert skip.float().mean() < 0.05
    check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, top_k), tol, tol, skip)
    grid, n = (14, 14), 197
    leaves, ls, go = make_inputs(4, 6, 6, n, n, 64, dtype=dtype, seed=8)
    out = kernels.local_krause_attention_2d_triton(*leaves, ls, grid, 2, "chebyshev", 8, 1)
    cand = grid_candidate_mask(grid, 2, "chebyshev", 1)[None]
    skip = near_tie_rows(leaves[0], leaves[1], cand, 8, 1e-2)
    check_against_rule(out, leaves, ls, go, lambda q, k, v, s: dense_rule(q, k, v, s, cand, 8), tol, tol, skip)


@cuda_only
def test_cuda_equals_engine_and_flex_paths():
    """Same outputs and gradients as impl="fast" and impl="flex" (rows with a near tie at the
    top_k-th distance left out: each implementation rounds distances its own way)."""
    import krause

    b, h, hkv, t, d, window, top_k = 2, 8, 2, 700, 64, 32, 16
    leaves, ls, go = make_inputs(b, h, hkv, t, t, d, per_head=True, seed=9)
    skip = near_tie_rows(leaves[0], leaves[1], window_candidates(b, t, t, window), top_k, 1e-2).to(DEVICE)
    go = go.masked_fill(skip[..., None], 0.0)
    out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
    grads = torch.autograd.grad(out, [*leaves, ls], go)
    for impl in ("fast", "flex"):
        other = krause.causal_krause_attention(*leaves, ls, window, top_k, impl=impl)
        other_grads = torch.autograd.grad(other, [*leaves, ls], go)
        torch.testing.assert_close(out[~skip], other[~skip], atol=2e-4, rtol=0, msg=lambda m: f"{impl}: {m}")
        for got, want in zip(grads, other_grads):
            torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3, msg=lambda m: f"{impl} grad: {m}")
    grid, n = (14, 14), 197
    leaves, ls, go = make_inputs(2, 6, 6, n, n, 64, seed=10)
    skip = near_tie_rows(leaves[0], leaves[1], grid_candidate_mask(grid, 2, "chebyshev", 1)[None], 8, 1e-2).to(DEVICE)
    out = kernels.local_krause_attention_2d_triton(*leaves, ls, grid, 2, "chebyshev", 8, 1)
    for impl in ("fast", "flex"):
        other = krause.local_krause_attention_2d(*leaves, ls, grid, 2, "chebyshev", 8, 1, impl=impl)
        torch.testing.assert_close(out[~skip], other[~skip], atol=2e-4, rtol=0, msg=lambda m: f"2-D {impl}: {m}")


@cuda_only
@pytest.mark.parametrize("log_sigma", [-10.0, 60.0])
def test_cuda_extreme_sigma_matches_rule(log_sigma):
    """Compiled for the GPU (where Triton may fuse a multiply into an add): a sigma so small
    that coef * dist ~ 1e10, and one so large that coef underflows to 0; finite outputs equal
    to the rule and finite gradients (tests/test_conformance.py holds the interpreter to it)."""
    b, h, hkv, t, d, window, top_k = 1, 4, 2, 600, 64, 32, 16
    leaves, _, go = make_inputs(b, h, hkv, t, t, d, seed=11)
    ls = torch.full((h,), log_sigma, device=DEVICE, requires_grad=True)
    out = kernels.causal_krause_attention_triton(*leaves, ls, window, top_k)
    assert out.isfinite().all()
    cand = window_candidates(b, t, t, window)
    skip = near_tie_rows(leaves[0], leaves[1], cand, top_k, 1e-2)
    if log_sigma < 0:  # only the nearest key counts: rows whose two nearest are close turn on rounding
        near = sorted_candidate_distances(leaves[0], leaves[1], cand)
        skip = skip | ((near[..., 1] - near[..., 0]) < 1e-2)
    grads = torch.autograd.grad(out, [*leaves, ls], go.masked_fill(skip.to(DEVICE)[..., None], 0.0))
    ref, _ = dense_rule(*(x.detach().cpu().double() for x in (*leaves, ls)), cand, top_k)
    torch.testing.assert_close(out.detach().cpu().double()[~skip], ref[~skip], atol=2e-4, rtol=0)
    for name, g in zip(("dq", "dk", "dv", "dlog_sigma"), grads):
        assert g.isfinite().all(), name


def test_decode_nan_policy():
    """The decode kernel's NaN rule: a NaN key or an infinite value in a real slot makes the
    rows of its key/value head NaN, a NaN in a padded slot does not, a NaN query makes its own
    row NaN; every other row is the rule on the finite inputs."""
    b, h, hkv, w, d, top_k, pos = 3, 4, 2, 8, 16, 3, 11
    g = torch.Generator().manual_seed(6)
    k_ring, v_ring = torch.randn(b, hkv, w, d, generator=g), torch.randn(b, hkv, w, d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    ls = 0.3 * torch.randn(h, generator=g) + 0.8
    lengths = torch.tensor([11, 5, 11])  # row 1: tokens 3..5 are padding
    k_ring[0, 1, 10 % w, 0] = float("nan")  # token 10, real: heads 2, 3 of row 0
    v_ring[1, 0, 4 % w, 0] = float("nan")  # token 4 of row 1: padding
    v_ring[2, 0, 9 % w, 3] = float("inf")  # token 9, real: heads 0, 1 of row 2
    q[1, 3, 2] = float("-inf")
    out = kernels.decode_krause_attention_triton(q.to(DEVICE), k_ring.to(DEVICE), v_ring.to(DEVICE), ls.to(DEVICE),
                                                lengths.to(DEVICE), top_k, pos=pos).cpu()
    bad = torch.zeros(b, h, dtype=torch.bool)
    bad[0, 2:], bad[2, :2], bad[1, 3] = True, True, True
    assert out[bad].isnan().all() and out[~bad].isfinite().all()
    tokens = torch.arange(pos - w, pos)
    slots = tokens % w
    finite = [torch.where(x.isfinite(), x, 0.0) for x in (q, k_ring, v_ring)]
    real = tokens[None, :] >= (pos - lengths)[:, None]
    ref, _ = dense_rule(finite[0][:, :, None], finite[1][:, :, slots], finite[2][:, :, slots], ls, real[:, None, :],
                        top_k)
    torch.testing.assert_close(out.double()[~bad], ref[:, :, 0][~bad], atol=1e-4, rtol=0)
