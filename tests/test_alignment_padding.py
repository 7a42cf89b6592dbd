"""End-aligned queries (Tq <= Tk) and key padding masks: every implementation against the
dense reference (outputs and gradients of q, k, v, log_sigma), and the dense reference
against a per-query loop over the definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import krause
from krause import dispatch

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)


def _inputs(b, h, hkv, tq, tk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


def _padding(b, tk, seed, kind):
    """True = real token. 'left'/'right': a random pad length per row (some rows all padding)."""
    g = torch.Generator().manual_seed(seed + 7)
    lengths = torch.randint(0, tk + 1, (b,), generator=g)
    pos = torch.arange(tk)[None, :]
    if kind == "left":
        return pos >= (tk - lengths)[:, None]
    if kind == "right":
        return pos < lengths[:, None]
    return torch.rand(b, tk, generator=g) > 0.3  # holes anywhere


def _grads(impl, q, k, v, ls, window, top_k, mask, grad_out):
    q, k, v, ls = (t.detach().clone().requires_grad_(True) for t in (q, k, v, ls))
    out = krause.causal_krause_attention(q, k, v, ls, window, top_k, key_padding_mask=mask, impl=impl)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad, ls.grad


def _loop_reference(q, k, v, log_sigma, window, top_k, mask):
    """The definition, one query at a time (independent of krause.dense)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    sig = log_sigma.double().exp().expand(h)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // (h // hkv)].double(), v[bi, hi // (h // hkv)].double()
            for i in range(tq):
                p = tk - tq + i
                cand = [j for j in range(max(0, p - window + 1), p + 1) if mask is None or mask[bi, j]]
                if not cand:
                    continue
                dist = ((q[bi, hi, i].double() - kk[cand]) ** 2).sum(-1)
                order = dist.argsort()[: min(top_k, len(cand))]
                w = torch.softmax(-dist[order] / (2 * sig[hi] ** 2), 0)
                out[bi, hi, i] = w @ vv[cand][order]
    return out


@PROPERTY
@given(b=st.integers(1, 3), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), tk=st.integers(1, 40),
       lag=st.integers(0, 40), window=st.integers(1, 12), top_k=st.integers(1, 14),
       padding=st.sampled_from([None, "left", "right", "holes"]), per_head=st.booleans(), seed=st.integers(0, 99))
def test_fast_equals_reference_end_aligned_and_padded(b, hkv, group, tk, lag, window, top_k, padding, per_head, seed):
    h = hkv * group
    tq = max(1, tk - lag)
    q, k, v = _inputs(b, h, hkv, tq, tk, 8, seed)
    ls = torch.rand(h if per_head else ()) * 0.6
    mask = None if padding is None else _padding(b, tk, seed, padding)
    g = torch.randn(b, h, tq, 8)
    ref = _grads("reference", q, k, v, ls, window, top_k, mask, g)
    fast = _grads("fast", q, k, v, ls, window, top_k, mask, g)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dlog_sigma"), fast, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)


@pytest.mark.parametrize("padding", [None, "left", "right", "holes"])
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 9), (5, 9), (9, 9), (3, 30)])
def test_reference_matches_the_definition(padding, tq, tk):
    q, k, v = _inputs(2, 4, 2, tq, tk, 6, seed=tq * 31 + tk)
    ls = torch.tensor([0.1, -0.2, 0.3, 0.0])
    mask = None if padding is None else _padding(2, tk, tq + tk, padding)
    out = krause.causal_krause_attention(q, k, v, ls, 4, 2, key_padding_mask=mask, impl="reference")
    torch.testing.assert_close(out.double(), _loop_reference(q, k, v, ls, 4, 2, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "fast", "flex"])
def test_all_padded_rows_return_zeros_not_nan(impl):
    q, k, v = _inputs(2, 2, 2, 6, 6, 4, seed=3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0] = False  # a whole row of padding
    mask[1, :3] = False  # left padding: the first three queries have no valid key
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = krause.causal_krause_attention(q, k, v, 0.0, 3, 2, key_padding_mask=mask, impl=impl)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and out[1, :, :3].abs().max() == 0
    assert out[1, :, 3:].abs().min() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert k.grad[0].abs().max() == 0  # padded keys get no gradient


def test_flex_matches_reference_with_padding_and_alignment():
    q, k, v = _inputs(2, 4, 2, 7, 19, 8, seed=5)
    mask = _padding(2, 19, 5, "left")
    ls = torch.tensor([0.0, 0.2, -0.1, 0.3])
    g = torch.randn(2, 4, 7, 8)
    ref = _grads("reference", q, k, v, ls, 6, 3, mask, g)
    flex = _grads("flex", q, k, v, ls, 6, 3, mask, g)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dlog_sigma"), flex, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)


def test_padding_keeps_top_k_among_valid_keys_per_row():
    """Row 0 has its nearest keys padded away: it must keep its top_k nearest *valid* keys."""
    tk, d = 8, 4
    k = torch.randn(2, 1, tk, d)
    q = k[:, :, -1:].clone()  # the last query sits on its own key
    v = torch.eye(tk)[None, None].expand(2, 1, tk, tk).clone()[..., :d].contiguous()
    v = torch.randn(2, 1, tk, d)
    mask = torch.ones(2, tk, dtype=torch.bool)
    mask[0, 4:7] = False
    for impl in ("reference", "fast"):
        out = krause.causal_krause_attention(q, k, v, 0.0, tk, 3, key_padding_mask=mask, impl=impl)
        ref = krause.causal_krause_attention(q[:1], k[:1, :, mask[0]], v[:1, :, mask[0]], 0.0, tk, 3, impl="reference")
        torch.testing.assert_close(out[:1], ref)


def test_a_decode_step_equals_the_full_forward_at_that_position():
    q, k, v = _inputs(1, 2, 1, 30, 30, 8, seed=9)
    full = krause.causal_krause_attention(q, k, v, 0.2, 5, 3)
    for p in (0, 4, 17, 29):
        step = krause.causal_krause_attention(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], 0.2, 5, 3)
        torch.testing.assert_close(step[:, :, 0], full[:, :, p])


@pytest.mark.parametrize("bad,match", [
    (lambda q, k: dict(key_padding_mask=torch.ones(2, 5)), "^key_padding_mask"),
    (lambda q, k: dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "^key_padding_mask"),
    (lambda q, k: dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), "^key_padding_mask"),
    (lambda q, k: dict(impl="cuda-magic"), "^impl"),
])
def test_bad_padding_and_impl_arguments(bad, match):
    q, k, v = _inputs(2, 2, 2, 5, 5, 4, seed=0)
    with pytest.raises(ValueError, match=match):
        krause.causal_krause_attention(q, k, v, 0.0, 3, 2, **bad(q, k))


def test_more_queries_than_keys_is_refused():
    q, _, _ = _inputs(1, 2, 2, 6, 6, 4, seed=0)
    _, k, v = _inputs(1, 2, 2, 6, 4, 4, seed=0)
    with pytest.raises(ValueError, match="^q has 6 tokens but k only 4"):
        krause.causal_krause_attention(q, k, v, 0.0, 3, 2)


def test_an_impl_that_cannot_run_here_says_why(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_reason", lambda device: "triton is not installed")
    dispatch.clear_cache()
    q, k, v = _inputs(1, 2, 2, 5, 5, 4, seed=0)
    try:
        with pytest.raises(ValueError, match="impl='triton' cannot run causal on cpu: triton is not installed"):
            krause.causal_krause_attention(q, k, v, 0.0, 3, 2, impl="triton")
    finally:
        dispatch.clear_cache()


def test_auto_explains_its_choice_on_cpu():
    why = dispatch.explain("causal", "cpu", window=8, num_queries=100, num_keys=100)
    assert why["compiled" if krause.cpu.active() else "engine"] == "chosen"
    assert why["reference"] == "available"
    assert why["dense"].startswith("the keys exceed one band span")


@pytest.mark.parametrize("group", [1, 3])
def test_the_path_cuda_takes_without_a_chunk_budget(monkeypatch, group):
    """Off CPU the engine runs one chunk of all heads (4-D matmuls, no CPU chunk budget):
    forced here on CPU against the reference, with GQA, padding and end alignment."""
    monkeypatch.setattr(krause.engine, "chunk_budget", lambda device: None)
    monkeypatch.setitem(krause.cpu._state, "engine", True)  # the engine, not the compiled CPU kernel
    q, k, v = _inputs(2, 2 * group, 2, 21, 45, 8, seed=11)
    ls = torch.rand(2 * group) * 0.5
    mask = _padding(2, 45, 11, "left")
    g = torch.randn(2, 2 * group, 21, 8)
    ref = _grads("reference", q, k, v, ls, 9, 4, mask, g)
    fast = _grads("fast", q, k, v, ls, 9, 4, mask, g)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dlog_sigma"), fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)
    q2, k2, v2 = _inputs(2, 2, 2, 1 + 36, 1 + 36, 8, seed=12)
    g2 = torch.randn_like(q2)
    outs = []
    for impl in ("reference", "fast", "auto"):
        q_, k_, v_, ls_ = (t.clone().requires_grad_(True) for t in (q2, k2, v2, torch.tensor(0.2)))
        out = krause.local_krause_attention_2d(q_, k_, v_, ls_, (6, 6), 2, "chebyshev", 5, impl=impl)
        out.backward(g2)
        outs.append((out.detach(), q_.grad, k_.grad, v_.grad, ls_.grad))
    for other in outs[1:]:
        for name, a, r in zip(("out", "dq", "dk", "dv", "dlog_sigma"), other, outs[0]):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)


def test_gqa_keys_are_never_expanded_to_query_heads():
    """The band reads each key/value head once for its whole group: no op sees a tensor
    with H x Tk x D elements (the size of repeat_kv's output)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
            return out

    b, h, hkv, t, d = 1, 8, 1, 256, 4
    q, k, v = (x.requires_grad_(True) for x in _inputs(b, h, hkv, t, t, d, seed=2))
    with Shapes() as probe:
        krause.causal_krause_attention(q, k, v, 0.0, 8, 4, impl="fast").sum().backward()
    expanded = [s for s in probe.shapes if s == (b, h, t, d) or s == (b * h, t, d)]
    # q-shaped tensors (q, dq, out, grad_out) are fine; keys expanded to H heads are not.
    assert all(s == (b, h, t, d) for s in expanded)
    assert (b * h, t, d) not in probe.shapes


def test_auto_falls_back_to_the_engine_where_the_kernels_cannot_take_the_shape(monkeypatch):
    """Once the kernels are chosen for a device, a call they cannot take (here fp64) runs on
    the engine under auto, and raises when triton was asked for explicitly."""
    pytest.importorskip("triton")
    monkeypatch.setattr(dispatch, "_AUTO_REFUSALS", {})  # as if verified on this device
    monkeypatch.setattr(dispatch, "_triton_reason", lambda device: None)
    dispatch.clear_cache()
    try:
        q, k, v = (t.double() for t in _inputs(1, 2, 2, 9, 9, 4, seed=1))
        out = krause.causal_krause_attention(q, k, v, 0.0, 3, 2)  # auto -> triton refuses fp64 -> dense
        ref = krause.causal_krause_attention(q, k, v, 0.0, 3, 2, impl="reference")
        torch.testing.assert_close(out, ref)
        why = dispatch.explain("causal", "cpu", dtype=torch.float64, window=3, num_queries=9, num_keys=9)
        assert why["triton"].startswith("dtype") and why["compiled"].startswith("dtype") and why["dense"] == "chosen"
        with pytest.raises(ValueError, match="^impl='triton' cannot run causal on cpu: dtype"):
            krause.causal_krause_attention(q, k, v, 0.0, 3, 2, impl="triton")
    finally:
        dispatch.clear_cache()
