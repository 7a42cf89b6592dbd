"""The fast Krause ops against the dense reference, their FLOP formulas, memory shape and
argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import krause
from krause import cpu
from krause import flops as kflops
from krause.masks import causal_window_mask, grid_candidate_mask

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def _inputs(b, h, hkv, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def _run(fn, q, k, v, log_sigma, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ls = log_sigma.detach().clone().requires_grad_(True)
    out = fn(q, k, v, ls)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad, ls.grad


def _assert_close(fast, ref, rtol=1e-5, atol=1e-5):
    names = ("out", "dq", "dk", "dv", "dlog_sigma")
    for name, a, b in zip(names, fast, ref):
        assert a.shape == b.shape, name
        # log_sigma's gradient sums over every query and head, so its absolute error
        # scales with that sum: compare it relative to its size.
        # It is also a long fp32 sum with cancellation, whose rounding depends on the
        # reduction order (torch's intra-op thread count): 1e-4 relative.
        scale = b.abs().max().item() if name == "dlog_sigma" else 1.0
        tol = max(atol, 1e-4) if name == "dlog_sigma" else atol
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=tol * max(1.0, scale), msg=lambda m: f"{name}: {m}")


def _backend(name):
    """The fast ops on the compiled CPU kernel or on the PyTorch engine."""
    if name == "compiled" and not cpu.active():
        pytest.skip(f"compiled CPU kernel: {cpu.status()}")
    return cpu.use_engine(name == "engine")


def _log_sigma(per_head, h, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(h if per_head else (), generator=g) - 0.5) * 1.0 + 0.3


# ----------------------------------------------------------------------------- causal
@PROPERTY
@given(
    b=st.integers(1, 2),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    t=st.integers(1, 70),
    d=st.sampled_from([4, 8, 16]),
    window=st.integers(1, 40),
    top_k=st.integers(1, 45),
    per_head=st.booleans(),
    seed=st.integers(0, 10_000),
)
@pytest.mark.parametrize("backend", ["compiled", "engine"])
def test_causal_fast_matches_reference(backend, b, hkv, group, t, d, window, top_k, per_head, seed):
    """Random shapes (the conformance grid in test_conformance.py holds the named cases)."""
    h = hkv * group
    q, k, v = _inputs(b, h, hkv, t, d, seed)
    ls = _log_sigma(per_head, h, seed)
    grad = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed + 2))
    with _backend(backend):
        fast = _run(lambda *a: krause.causal_krause_attention(*a, window, top_k, impl="fast"), q, k, v, ls, grad)
    ref = _run(lambda *a: krause.causal_krause_attention(*a, window, top_k, impl="reference"), q, k, v, ls, grad)
    _assert_close(fast, ref)


def test_causal_keeps_exactly_top_k_nearest():
    """With value vectors one-hot per position, the output rows are the attention weights."""
    t, window, top_k = 20, 6, 3
    q, k, _ = _inputs(1, 1, 1, t, t, seed=3)
    q, k = q * 0.3, k * 0.3  # keep the softmax from saturating so every kept weight is visibly > 0
    v = torch.eye(t)[None, None]  # v_j = e_j, so out_i = a_i
    probs = krause.causal_krause_attention(q, k, v, 0.0, window, top_k)[0, 0]
    dist = torch.cdist(q[0, 0], k[0, 0]).pow(2)
    for i in range(t):
        cands = list(range(max(0, i - window + 1), i + 1))
        nearest = sorted(cands, key=lambda j: dist[i, j].item())[: min(top_k, len(cands))]
        support = probs[i].nonzero().flatten().tolist()
        assert sorted(support) == sorted(nearest)
        expected = torch.softmax(-dist[i, nearest] / 2.0, 0)
        torch.testing.assert_close(probs[i, nearest], expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(t))


def test_sigma_sets_temperature_not_selection():
    q, k, v = _inputs(1, 2, 2, 30, 30, seed=5)
    q, k = q * 0.3, k * 0.3
    eye = torch.eye(30)[None, None].expand(1, 2, 30, 30)
    sharp = krause.causal_krause_attention(q, k, eye, -1.0, 8, 3)
    soft = krause.causal_krause_attention(q, k, eye, 2.0, 8, 3)
    assert torch.equal(sharp > 0, soft > 0)
    assert not torch.allclose(sharp, soft)


# ----------------------------------------------------------------------------- 2-D
GRIDS = st.tuples(st.integers(1, 9), st.integers(1, 9))


@PROPERTY
@given(
    b=st.integers(1, 2),
    h=st.sampled_from([1, 2, 3]),
    grid=GRIDS,
    num_prefix=st.integers(0, 2),
    radius=st.integers(0, 3),
    metric=st.sampled_from(["manhattan", "chebyshev"]),
    top_k=st.integers(1, 30),
    impl=st.sampled_from(["fast", "auto"]),
    per_head=st.booleans(),
    seed=st.integers(0, 10_000),
)
@pytest.mark.parametrize("backend", ["compiled", "engine"])
def test_local_2d_matches_reference(backend, b, h, grid, num_prefix, radius, metric, top_k, impl, per_head, seed):
    n = num_prefix + grid[0] * grid[1]
    q, k, v = _inputs(b, h, h, n, 8, seed)
    ls = _log_sigma(per_head, h, seed)
    grad = torch.randn(b, h, n, 8, generator=torch.Generator().manual_seed(seed + 2))
    args = (grid, radius, metric, top_k, num_prefix)
    with _backend(backend):
        fast = _run(lambda *a: krause.local_krause_attention_2d(*a, *args, impl=impl), q, k, v, ls, grad)
    ref = _run(lambda *a: krause.local_krause_attention_2d(*a, *args, impl="reference"), q, k, v, ls, grad)
    _assert_close(fast, ref)


def test_grid_candidate_mask_counts():
    mask = grid_candidate_mask((4, 5), 1, "manhattan", 1)
    assert mask.shape == (21, 21)
    assert mask[0].all()  # CLS sees everything
    per_patch = mask[1:, 1:].sum(-1).view(4, 5)
    assert per_patch[0, 0] == 3 and per_patch[0, 2] == 4 and per_patch[1, 1] == 5
    cheb = grid_candidate_mask((6, 6), 2, "chebyshev", 0)
    assert cheb.sum(-1).view(6, 6)[3, 3] == 25 and cheb.sum(-1).view(6, 6)[0, 0] == 9


# ----------------------------------------------------------------------------- dtypes, devices, compile
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_reference(dtype):
    q, k, v = _inputs(1, 4, 2, 48, 16, seed=11, dtype=dtype)
    ls = torch.tensor(0.5)
    out = krause.causal_krause_attention(q, k, v, ls, 16, 8)
    assert out.dtype == dtype
    ref = krause.causal_krause_attention(q.float(), k.float(), v.float(), ls, 16, 8, impl="reference")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    q.requires_grad_(True)
    krause.local_krause_attention_2d(q, k, v, ls, (6, 8), 1, "manhattan", 2, 0).sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_distance_is_clamped_when_query_equals_key():
    # q == k makes the expanded distance |q|^2+|k|^2-2q.k round to small negatives.
    x = torch.randn(1, 1, 12, 32) * 100
    out = krause.causal_krause_attention(x, x, x, 0.0, 4, 2)
    assert torch.isfinite(out).all()


def test_torch_compile_runs_custom_ops():
    q, k, v = _inputs(1, 2, 2, 24, 8, seed=2)
    ls = torch.zeros(2, requires_grad=True)

    def f(q, k, v, ls):
        return krause.causal_krause_attention(q, k, v, ls, 8, 4)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, ls)
    torch.testing.assert_close(out, f(q, k, v, ls))
    out.sum().backward()
    assert ls.grad is not None and torch.isfinite(ls.grad).all()


def test_torch_compile_with_dynamic_shapes():
    """New lengths make torch.compile trace with symbolic shapes: the dispatch decision
    must still be a constant of the graph (no graph break under fullgraph)."""
    def f(q, ls):
        return krause.causal_krause_attention(q, q, q, ls, 8, 4)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for t in (24, 32, 40, 5):
        q = torch.randn(1, 2, t, 8, requires_grad=True)
        ls = torch.zeros(2, requires_grad=True)
        out = compiled(q, ls)
        torch.testing.assert_close(out, f(q, ls))
        out.sum().backward()
        assert torch.isfinite(ls.grad).all()


def test_custom_ops_pass_opcheck():
    q, k, v = _inputs(1, 2, 1, 20, 8, seed=1)
    ls = torch.zeros(2)
    torch.library.opcheck(torch.ops.krause.causal_fwd.default, (q, k, v, ls, None, 8, 4))
    padding = torch.ones(1, 20, dtype=torch.bool)
    padding[:, :5] = False
    torch.library.opcheck(torch.ops.krause.causal_fwd.default, (q, k, v, ls, padding, 8, 4))
    q2, k2, v2 = _inputs(1, 2, 2, 17, 8, seed=1)
    for dense in (True, False):
        torch.library.opcheck(
            torch.ops.krause.local2d_fwd.default, (q2, k2, v2, ls, 4, 4, 1, "manhattan", 2, 1, dense)
        )


# ----------------------------------------------------------------------------- linear memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["compiled", "engine"])
def test_fast_causal_never_builds_a_token_by_token_tensor(backend):
    """Under impl="auto" too (the dense shortcut must not fire for long sequences)."""
    b, h, t, d, window = 1, 2, 2048, 16, 32
    q, k, v = (x.requires_grad_(True) for x in _inputs(b, h, h, t, d, seed=0))
    with _backend(backend), _LargestTensor() as probe:
        krause.causal_krause_attention(q, k, v, 0.0, window, 8).sum().backward()
    # Banded scores are (B, H, T, ~1.5 W); a dense score matrix would be B*H*T*T.
    assert probe.largest <= 4 * b * h * t * window < b * h * t * t // 8


def test_fast_2d_never_builds_a_token_by_token_tensor():
    grid = (40, 40)
    n = 1 + grid[0] * grid[1]
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 2, 2, n, 16, seed=0))
    with _LargestTensor() as probe:
        krause.local_krause_attention_2d(q, k, v, 0.0, grid, 2, "chebyshev", 8, 1).sum().backward()
    assert probe.largest <= 2 * n * 16 * 4 < 2 * n * n // 8


# ----------------------------------------------------------------------------- FLOPs
def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_counts_causal_by_sparse_formula():
    b, h, t, d, window, top_k = 2, 4, 100, 16, 32, 8
    q, k, v = (x.requires_grad_(True) for x in _inputs(b, h, h, t, d, seed=0))
    fwd = _count(lambda: krause.causal_krause_attention(q, k, v, 0.0, window, top_k))
    # hand count: query i has min(W, i+1) candidates and keeps min(k, i+1) of them
    candidates = sum(min(window, i + 1) for i in range(t))
    kept = sum(min(top_k, i + 1) for i in range(t))
    assert fwd == b * h * 2 * d * (candidates + kept)
    total = _count(lambda: krause.causal_krause_attention(q, k, v, 0.0, window, top_k).sum().backward())
    assert total == fwd + b * h * 8 * d * kept
    # far below what dense attention over the same tokens costs
    sdpa = _count(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert fwd < sdpa / 2


def test_flop_counter_counts_cpu_sdpa_like_the_math_kernel():
    """krause registers the formula torch lacks for the CPU SDPA kernel."""
    q, k, v = (x.requires_grad_(True) for x in _inputs(2, 4, 4, 50, 16, seed=0))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = _count(lambda: sdpa(q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        math_fwd = _count(lambda: sdpa(q, k, v))
    assert fwd == math_fwd == 2 * 4 * (2 * 50 * 50 * 16) * 2
    # backward as torch counts the CUDA flash kernels: 2.5x forward (scores are recomputed)
    assert _count(lambda: sdpa(q, k, v).sum().backward()) == fwd + fwd * 5 // 2


def test_flop_counter_counts_2d_by_candidates():
    grid, d = (8, 8), 32
    n = 1 + 64
    q, k, v = _inputs(1, 6, 6, n, d, seed=0)
    for impl in ("auto", "fast"):  # the same count whichever kernel runs
        fwd = _count(lambda: krause.local_krause_attention_2d(q, k, v, 0.0, grid, 1, "manhattan", 2, 1, impl=impl))
        mask = grid_candidate_mask(grid, 1, "manhattan", 1)
        candidates = int(mask.sum())
        kept = int(mask.sum(-1).clamp(max=2).sum())
        assert fwd == 6 * 2 * d * (candidates + kept)
    assert kflops.local2d_forward_flops(grid, d, 1, "manhattan", 2, 1) * 6 == fwd


def test_causal_mask_helper():
    m = causal_window_mask(5, 2)
    assert m.tolist()[3] == [False, False, True, True, False]


# ----------------------------------------------------------------------------- bad input
def _good():
    q, k, v = _inputs(1, 4, 2, 10, 8, seed=0)
    return q, k, v


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize(
    "mutate,arg",
    [
        (lambda a: {**a, "top_k": 0}, "top_k"),
        (lambda a: {**a, "top_k": 2.5}, "top_k"),
        (lambda a: {**a, "window": 0}, "window"),
        (lambda a: {**a, "window": -3}, "window"),
        (lambda a: {**a, "k": a["k"][:, :, :9]}, "k"),
        (lambda a: {**a, "k": torch.randn(1, 3, 10, 8), "v": torch.randn(1, 3, 10, 8)}, "k heads"),
        (lambda a: {**a, "v": a["v"][..., :4]}, "k and v"),
        (lambda a: {**a, "q": a["q"][0]}, "q"),
        (lambda a: {**a, "k": torch.randn(2, 2, 10, 8), "v": torch.randn(2, 2, 10, 8)}, "k batch"),
        (lambda a: {**a, "log_sigma": float("nan")}, "log_sigma"),
        (lambda a: {**a, "log_sigma": torch.zeros(3)}, "log_sigma"),
    ],
)
def test_causal_bad_input_names_the_argument(mutate, arg, impl):
    q, k, v = _good()
    args = mutate({"q": q, "k": k, "v": v, "log_sigma": 0.0, "window": 4, "top_k": 2})
    with pytest.raises(ValueError, match=f"^{arg}"):
        krause.causal_krause_attention(**args, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "fast", "reference"])
@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"grid": (3, 4)}, "grid"),
        ({"grid": (3,)}, "grid"),
        ({"num_prefix_tokens": 0}, "grid"),
        ({"num_prefix_tokens": -1}, "num_prefix_tokens"),
        ({"metric": "euclid"}, "metric"),
        ({"radius": -1}, "radius"),
        ({"top_k": 0}, "top_k"),
        ({"log_sigma": float("inf")}, "log_sigma"),
    ],
)
def test_local_2d_bad_input_names_the_argument(kwargs, arg, impl):
    q, k, v = _inputs(1, 2, 2, 17, 8, seed=0)
    args = {"log_sigma": 0.0, "grid": (4, 4), "radius": 1, "metric": "manhattan", "top_k": 2, "num_prefix_tokens": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{arg}"):
        krause.local_krause_attention_2d(q, k, v, **args, impl=impl)


def test_unknown_impl_is_rejected():
    q, k, v = _good()
    with pytest.raises(ValueError, match="^impl"):
        krause.causal_krause_attention(q, k, v, 0.0, 4, 2, impl="cuda")


def test_compiled_op_accepts_non_contiguous_inputs():
    """The fake kernels must describe the real (contiguous) outputs for any input layout."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(1, 2, 2, 20, 8, seed=4))
    q = q.requires_grad_(True)
    assert not q.is_contiguous()

    def f(q, k, v):
        a = krause.causal_krause_attention(q, k, v, 0.0, 8, 4)
        b = krause.local_krause_attention_2d(q, k, v, 0.0, (4, 4), 1, "manhattan", 2, 4, impl="fast")
        # merging the head and token dims is a legal view of the real (contiguous) output
        # only; it fails if the compile-time kernels claim q's permuted layout
        return (a + b).view(1, 40, 8)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    out.sum().backward()


def test_non_finite_log_sigma_tensor_is_an_opt_in_debug_check(monkeypatch):
    """The check costs a host sync, so it only runs with KRAUSE_DEBUG (no sync on the hot path)."""
    q, k, v = _good()
    ls = torch.tensor([0.0, float("inf"), 0.0, 0.0])
    krause.causal_krause_attention(q, k, v, ls, 4, 2)  # no check, no sync
    monkeypatch.setattr(krause._validation, "DEBUG_CHECKS", True)
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match="^log_sigma"):
            krause.causal_krause_attention(q, k, v, ls, 4, 2, impl=impl)
