"""Every implementation of the two Krause ops on one property grid, against one oracle.

The oracle is the dense formula in float64 with the selection made explicit: candidates
sorted stably by distance, so at equal distance the lower key index is kept (the rule the
compiled CPU and Triton kernels implement; ``torch.topk``, used by the reference and the
engine, leaves ties unspecified, so those two sit out the exact-tie cases, and flex keeps
every tie by design). Outputs and the gradients of q, k, v and log_sigma are compared.

Implementations: reference, engine (the PyTorch engine), compiled (the compiled CPU
kernel), flex (FlexAttention, unfused on CPU) and triton (the Triton interpreter without
a GPU, on the small cases).

Beyond the grid: the NaN policy, large finite values, extreme sigmas (a softmax that keeps
only the nearest key, and c = 1/(2 sigma^2) underflowing to 0), mixed input dtypes, and
seeded random configurations.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import krause
from krause import cpu
from krause.masks import grid_candidate_mask
from krause.reference import repeat_kv

from dense_oracle import dense_rule, sorted_candidate_distances, window_candidates

try:
    import triton  # noqa: F401

    HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
except ImportError:
    HAS_TRITON = False

IMPLEMENTATIONS = ("reference", "engine", "compiled", "flex", "triton")


def oracle(q, k, v, log_sigma, cand, top_k):
    """float64 Krause attention over cand (B|1, Tq, Tk), ties to the lower key index."""
    return dense_rule(q, k, v, log_sigma, cand, top_k)[0]


def near_tie_rows(q, k, cand, top_k, gap=1e-4):
    """(B, H, Tq): rows whose k-th and next distances differ by less than ``gap`` but are not
    equal (fp32 rounding may order such a pair either way; exact ties follow the rule)."""
    far = sorted_candidate_distances(q, k, cand)
    if top_k >= far.shape[-1]:
        return torch.zeros(far.shape[:-1], dtype=torch.bool)
    gaps = far[..., top_k] - far[..., top_k - 1]
    return (gaps < gap) & (gaps > 1e-9)  # inf - inf = nan: not near


def make_inputs(b, h, hkv, tq, tk, d, per_head, seed, dup_keys=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    if dup_keys:  # dup_keys distinct keys repeated along the sequence: exact distance ties
        k = k[:, :, torch.arange(tk) % dup_keys]
    ls = (0.3 * torch.randn(h, generator=g) + 0.3) if per_head else torch.tensor(0.3)
    go = torch.randn(b, h, tq, d, generator=g)
    return q, k, v, ls, go


def padding(kind, b, tk):
    if kind is None:
        return None
    mask = torch.ones(b, tk, dtype=torch.bool)
    if kind == "empty-row":  # row 0 all padding: its queries have no candidate
        mask[0] = False
    elif kind == "left":
        mask[0, : tk // 2 + 2] = False  # the first queries of row 0 have no candidate at all
    elif kind == "right":
        mask[-1, -3:] = False
    else:  # holes inside the window
        mask[:, 2 : tk - 1 : 3] = False
    return mask


def runs(impl, dtype, ties, small):
    """Whether ``impl`` is held to the oracle on this case (and why not)."""
    if impl in ("reference", "engine") and ties:
        return "torch.topk leaves ties unspecified"
    if impl == "flex" and (ties or dtype != torch.float32):
        return "flex keeps every tie at the k-th distance; fp32 only here"
    if impl == "triton" and not (HAS_TRITON and small):
        return "triton: not installed, no GPU/interpreter, or a case too large for the interpreter"
    if impl == "compiled" and not cpu.active():
        return f"compiled CPU kernel: {cpu.status()}"
    return None


def call(impl, fn):
    if impl == "engine":
        with cpu.use_engine():
            return fn("fast")
    return fn("fast" if impl == "compiled" else impl)


def check(impl, fn, leaves, go, cand, top_k, dtype, skip):
    q, k, v, ls = (t.detach().clone().to(dtype if i < 3 else t.dtype).requires_grad_(True) for i, t in enumerate(leaves))
    out = call(impl, lambda name: fn(q, k, v, ls, name))
    assert out.dtype == dtype and out.shape == q.shape
    go_kept = go.masked_fill(skip[..., None], 0.0)
    grads = torch.autograd.grad(out, (q, k, v, ls), go_kept.to(dtype))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, ls)]
    ref = oracle(*ref_leaves, cand, top_k)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go_kept.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.detach().double()[~skip], ref.detach()[~skip], atol=tol, rtol=0, msg=lambda m: f"{impl} out: {m}")
    for name, got, want in zip(("dq", "dk", "dv", "dlog_sigma"), grads, ref_grads):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0, msg=lambda m: f"{impl} {name}: {m}")


# b, h, hkv, tq, tk, d, window, top_k, per_head, padding, dup_keys, small
CAUSAL = {
    "square": (2, 2, 2, 37, 37, 16, 8, 3, False, None, None, True),
    "T<W-gqa": (2, 4, 2, 5, 5, 16, 8, 4, True, None, None, True),
    "topk>W-mqa": (1, 2, 1, 21, 21, 8, 6, 9, False, None, None, True),
    "end-aligned": (1, 4, 2, 9, 30, 16, 7, 3, True, None, None, True),
    "decode-step": (2, 2, 1, 1, 40, 8, 12, 5, True, "empty-row", None, True),
    "left-padding": (2, 2, 1, 24, 24, 8, 6, 3, True, "left", None, True),
    "right-padding-end-aligned": (2, 2, 2, 15, 24, 8, 6, 3, False, "right", None, True),
    "holes": (2, 3, 1, 30, 30, 8, 9, 4, True, "holes", None, True),
    "W=1": (1, 2, 2, 17, 17, 8, 1, 1, False, None, None, True),
    "ties": (1, 2, 1, 40, 40, 8, 12, 5, False, None, 3, True),
    "ties-gqa-end-aligned": (2, 4, 2, 12, 33, 8, 9, 5, True, "holes", 4, True),
    # several query blocks of the compiled backward (4W queries each, even blocks then odd), so
    # the rows each block adds to below its own count
    "blocks-end-aligned-gqa": (1, 4, 2, 40, 55, 8, 5, 3, True, "holes", None, True),
    "blocks-ties": (1, 2, 1, 60, 60, 8, 6, 4, False, None, 3, True),
    # more than 16 kept keys and d not a multiple of 16 (the compiled backward's 16-key dots, tails)
    "wide-topk-odd-d": (1, 2, 1, 50, 50, 20, 40, 24, True, None, None, True),
    "long": (1, 2, 1, 300, 300, 32, 64, 16, True, "right", None, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CAUSAL))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_causal_conforms(impl, case, dtype):
    b, h, hkv, tq, tk, d, window, top_k, per_head, pad, dup, small = CAUSAL[case]
    why = runs(impl, dtype, dup, small)
    if why:
        pytest.skip(why)
    q, k, v, ls, go = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=len(case), dup_keys=dup)
    mask = padding(pad, b, tk)
    cand = window_candidates(b, tq, tk, window, mask)
    rounded = [t.to(dtype).float() for t in (q, k, v)]  # the oracle sees what the kernels see
    skip = near_tie_rows(rounded[0], rounded[1], cand, top_k)

    def fn(q_, k_, v_, ls_, name):
        return krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, key_padding_mask=mask, impl=name)

    check(impl, fn, (*rounded, ls), go, cand, top_k, dtype, skip)
    empty = ~cand.any(-1)  # (B, Tq): queries with no valid candidate return zeros
    if empty.any() and impl != "flex":
        out = call(impl, lambda name: fn(q.to(dtype), k.to(dtype), v.to(dtype), ls, name))
        assert out[empty[:, None].expand(b, h, tq)].abs().max() == 0


# b, h, hkv, grid, radius, metric, top_k, num_prefix, per_head, dup_patches, small
GRID = {
    "cifar-8x8": (2, 2, 2, (8, 8), 1, "manhattan", 2, 1, False, None, True),
    "cheb-gqa": (1, 4, 2, (5, 6), 2, "chebyshev", 8, 1, True, None, True),
    "no-prefix": (2, 2, 1, (4, 7), 1, "chebyshev", 3, 0, True, None, True),
    "two-prefix-topk-all": (1, 2, 2, (3, 3), 1, "manhattan", 40, 2, False, None, True),
    "radius-0": (1, 2, 2, (4, 4), 0, "manhattan", 1, 1, False, None, True),
    "ties": (1, 2, 1, (6, 6), 2, "chebyshev", 5, 1, False, 4, True),
    "imagenet-14x14": (1, 2, 1, (14, 14), 2, "chebyshev", 8, 1, True, None, False),
    "large-no-prefix": (1, 2, 1, (12, 11), 1, "manhattan", 3, 0, False, None, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GRID))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_local2d_conforms(impl, case, dtype):
    b, h, hkv, grid, radius, metric, top_k, num_prefix, per_head, dup, small = GRID[case]
    why = runs(impl, dtype, dup, small)
    if why:
        pytest.skip(why)
    n = num_prefix + grid[0] * grid[1]
    q, k, v, ls, go = make_inputs(b, h, hkv, n, n, 8, per_head, seed=len(case), dup_keys=dup)
    cand = grid_candidate_mask(grid, radius, metric, num_prefix)[None]
    rounded = [t.to(dtype).float() for t in (q, k, v)]
    skip = near_tie_rows(rounded[0], rounded[1], cand, top_k)

    def fn(q_, k_, v_, ls_, name):
        return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k, num_prefix, impl=name)

    check(impl, fn, (*rounded, ls), go, cand, top_k, dtype, skip)


def test_the_tie_cases_have_exact_ties_at_the_boundary():
    """The tie cases would prove nothing without a tie at the k-th distance: the rule is
    visible (keeping the higher index instead gives another output)."""
    b, h, hkv, tq, tk, d, window, top_k, per_head, pad, dup, _ = CAUSAL["ties"]
    q, k, v, ls, _ = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=len("ties"), dup_keys=dup)
    cand = window_candidates(1, tk, tk, window)
    dist = torch.cdist(q[0, 0].double(), k[0, 0].double()).pow(2).masked_fill(~cand[0], float("inf"))
    far = dist.sort(-1).values
    assert ((far[:, top_k - 1] == far[:, top_k]) & far[:, top_k].isfinite()).sum() > 5
    low = oracle(q, k, v, ls, cand, top_k)
    flipped = oracle(q, k.flip(2), v.flip(2), ls, cand.flip(-1), top_k)  # the same keys, tie order reversed
    assert not torch.allclose(low, flipped)


# --------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["q-fp32-kv-bf16", "q-bf16-kv-fp32"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_mixed_dtypes_give_q_dtype(impl, dtypes):
    """q in one float dtype, k and v in another: every implementation that takes the call
    returns q's dtype (docs/api.md) and the oracle's values; the Triton kernels refuse it
    naming the cause."""
    why = runs(impl, torch.float32, None, True)
    if why:
        pytest.skip(why)
    q_dtype, kv_dtype = dtypes
    b, h, hkv, tq, tk, d, window, top_k, *_ = CAUSAL["end-aligned"]
    q, k, v, ls, _ = make_inputs(b, h, hkv, tq, tk, d, True, seed=9)
    q, k, v = q.to(q_dtype), k.to(kv_dtype), v.to(kv_dtype)

    def fn(name):
        return krause.causal_krause_attention(q, k, v, ls, window, top_k, impl=name)

    if impl == "triton":
        with pytest.raises(ValueError, match="different dtypes"):
            call(impl, fn)
        return
    out = call(impl, fn)
    assert out.dtype == q_dtype
    cand = window_candidates(1, tq, tk, window)
    near = near_tie_rows(q.float(), k.float(), cand, top_k, gap=1e-2)
    ref = oracle(q.double(), k.double(), v.double(), ls.double(), cand, top_k)
    torch.testing.assert_close(out.double()[~near], ref[~near], atol=3e-2, rtol=0, msg=lambda m: f"{impl}: {m}")


# Random configurations beyond the grid (seeded, so each run checks the same ones): shapes,
# windows, top_k above and below the window, GQA, padding, per-head sigma, input scales.
def random_causal_config(rng):
    hkv = rng.choice([1, 2])
    tk = rng.randint(1, 70)
    return dict(b=rng.choice([1, 2]), h=hkv * rng.choice([1, 2, 3]), hkv=hkv, tq=rng.randint(1, tk), tk=tk,
                d=rng.choice([1, 3, 8, 17, 33]), window=rng.randint(1, 40), top_k=rng.randint(1, 45),
                scale=rng.choice([0.1, 1.0, 3.0]), log_sigma=rng.uniform(-2.0, 2.0), padded=rng.random() < 0.4)


def random_grid_config(rng):
    hkv = rng.choice([1, 2])
    return dict(b=rng.choice([1, 2]), h=hkv * rng.choice([1, 2]), hkv=hkv, grid=(rng.randint(1, 8), rng.randint(1, 8)),
                num_prefix=rng.choice([0, 1, 2]), radius=rng.randint(0, 3), metric=rng.choice(["manhattan", "chebyshev"]),
                top_k=rng.randint(1, 30), d=rng.choice([1, 4, 8, 17]), scale=rng.choice([0.1, 1.0, 3.0]),
                log_sigma=rng.uniform(-2.0, 2.0))


def check_random(impl, fn, shapes, cfg, cand, top_k, seed):
    """Output and gradients against the float64 oracle; rows with a near tie at the top_k-th
    distance (relative to the inputs' scale) are left out."""
    g = torch.Generator().manual_seed(seed)
    q_shape, kv_shape = shapes
    q = torch.randn(q_shape, generator=g) * cfg["scale"]
    k = torch.randn(kv_shape, generator=g) * cfg["scale"]
    v = torch.randn(kv_shape, generator=g)
    ls = cfg["log_sigma"] + 0.2 * torch.randn(q_shape[1], generator=g)
    near = near_tie_rows(q, k, cand, top_k, gap=1e-3 * cfg["scale"] ** 2)
    go = torch.randn(q_shape, generator=g).masked_fill(near[..., None], 0.0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, ls)]
    out = call(impl, lambda name: fn(*leaves, name))
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, ls)]
    ref = oracle(*ref_leaves, cand, top_k)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    torch.testing.assert_close(out.detach().double()[~near], ref.detach()[~near], atol=2e-3, rtol=0,
                               msg=lambda m: f"{impl} {cfg} out: {m}")
    for name, got, want, tol in zip(("dq", "dk", "dv", "dlog_sigma"), grads, ref_grads, (2e-3, 2e-3, 2e-3, 2e-2)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0, msg=lambda m: f"{impl} {cfg} {name}: {m}")


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "triton"])
@pytest.mark.parametrize("seed", range(4))
def test_random_causal_configs_conform(impl, seed):
    why = runs(impl, torch.float32, None, True)
    if why:
        pytest.skip(why)
    rng = random.Random(seed)
    for n in range(8):
        cfg = random_causal_config(rng)
        b, tq, tk, window, top_k = cfg["b"], cfg["tq"], cfg["tk"], cfg["window"], cfg["top_k"]
        mask = (torch.rand(b, tk, generator=torch.Generator().manual_seed(seed * 100 + n)) > 0.3) if cfg["padded"] else None
        cand = window_candidates(b, tq, tk, window, mask)

        def fn(q_, k_, v_, ls_, name):
            return krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, key_padding_mask=mask, impl=name)

        shapes = ((b, cfg["h"], tq, cfg["d"]), (b, cfg["hkv"], tk, cfg["d"]))
        check_random(impl, fn, shapes, cfg, cand, top_k, seed * 100 + n)


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "triton"])
@pytest.mark.parametrize("seed", range(4))
def test_random_grid_configs_conform(impl, seed):
    why = runs(impl, torch.float32, None, True)
    if why:
        pytest.skip(why)
    rng = random.Random(1000 + seed)
    for n in range(8):
        cfg = random_grid_config(rng)
        grid, radius, metric, top_k, num_prefix = cfg["grid"], cfg["radius"], cfg["metric"], cfg["top_k"], cfg["num_prefix"]
        tokens = num_prefix + grid[0] * grid[1]
        cand = grid_candidate_mask(grid, radius, metric, num_prefix)[None]

        def fn(q_, k_, v_, ls_, name):
            return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k, num_prefix, impl=name)

        shapes = ((cfg["b"], cfg["h"], tokens, cfg["d"]), (cfg["b"], cfg["hkv"], tokens, cfg["d"]))
        check_random(impl, fn, shapes, cfg, cand, top_k, 1000 + seed * 100 + n)


# The NaN policy (krause/nonfinite.py, docs/api.md): output row i is all NaN when query i has
# a valid candidate and q_i, or the key or value of one of its valid candidates, holds a NaN
# or an infinity; a query with no valid candidate returns zeros; every other row is the
# oracle on the finite entries. Backward: a NaN row's upstream gradient (here NaN itself) is
# ignored and non-finite entries get gradient 0, the rest is the finite computation's.
NAN, INF = float("nan"), float("inf")


def poison(q, k, v, kind):
    """Copies of q, k, v with non-finite entries: "q" (a NaN and a -inf query, and one in
    the first query of batch 0, which has no candidate under left or empty-row padding),
    "k" / "v" (a NaN and a +inf key/value row, and a NaN in key 0: padded, outside every
    window when end-aligned, or a candidate)."""
    q, k, v = q.clone(), k.clone(), v.clone()
    tq, tk = q.shape[2], k.shape[2]
    if kind == "q":
        q[0, 0, tq // 2, 1] = NAN
        q[-1, -1, tq - 1, 0] = -INF
        q[0, :, 0, 0] = NAN
    else:
        x = k if kind == "k" else v
        x[0, 0, tk // 2, 1] = NAN
        x[-1, -1, tk - 1, 0] = INF
        x[0, 0, 0, 2] = NAN
    return q, k, v


def poisoned_rows(q, k, v, cand):
    """The rule, on the dense candidate mask cand (B|1, Tq, Tk): (B, H, Tq) bool."""
    h = q.shape[1]
    bad_q = ~q.isfinite().all(-1)
    bad_kv = repeat_kv(~(k.isfinite().all(-1) & v.isfinite().all(-1))[..., None], h)[..., 0]
    c = cand[:, None]
    return (c & (bad_q[..., None] | bad_kv[..., None, :])).any(-1)


def check_nonfinite(impl, fn, leaves, go, cand, top_k, dtype, near):
    q, k, v, ls = (t.detach().clone().to(dtype if i < 3 else t.dtype).requires_grad_(True) for i, t in enumerate(leaves))
    bad = poisoned_rows(q.detach(), k.detach(), v.detach(), cand)
    empty = ~cand.any(-1)[:, None].expand_as(bad)
    assert bad.any()
    out = call(impl, lambda name: fn(q, k, v, ls, name))
    assert out.dtype == dtype and out.shape == q.shape
    assert out.detach()[bad].isnan().all(), f"{impl}: a row that sees a non-finite input is not NaN"
    assert out.detach()[~bad].isfinite().all(), f"{impl}: NaN leaked into a row that cannot see it"
    assert (out.detach()[empty] == 0).all(), f"{impl}: a query with no candidate must return zeros"
    upstream = go.masked_fill(bad[..., None], NAN).masked_fill(near[..., None], 0.0)
    grads = torch.autograd.grad(out, (q, k, v, ls), upstream.to(dtype))
    finite = [torch.where(t.isfinite(), t, 0.0).detach().double().requires_grad_(True) for t in (q, k, v)]
    ls_ref = ls.detach().double().requires_grad_(True)
    ref = oracle(*finite, ls_ref, cand, top_k)
    ref_grads = torch.autograd.grad(ref, (*finite, ls_ref), go.double().masked_fill((bad | near)[..., None], 0.0))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    clean = ~bad & ~near
    torch.testing.assert_close(out.detach().double()[clean], ref.detach()[clean], atol=tol, rtol=0,
                               msg=lambda m: f"{impl} out: {m}")
    for name, got, want in zip(("dq", "dk", "dv", "dlog_sigma"), grads, ref_grads):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0, msg=lambda m: f"{impl} {name}: {m}")


NONFINITE_CAUSAL = ("square", "end-aligned", "decode-step", "left-padding", "holes")


@pytest.mark.parametrize("kind", ["q", "k", "v"])
@pytest.mark.parametrize("case", NONFINITE_CAUSAL)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_causal_nonfinite(impl, case, kind):
    b, h, hkv, tq, tk, d, window, top_k, per_head, pad, dup, small = CAUSAL[case]
    dtype = torch.float32
    why = runs(impl, dtype, dup, small)
    if why:
        pytest.skip(why)
    q, k, v, ls, go = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=len(case), dup_keys=dup)
    mask = padding(pad, b, tk)
    cand = window_candidates(b, tq, tk, window, mask)
    near = near_tie_rows(q, k, cand, top_k)

    def fn(q_, k_, v_, ls_, name):
        return krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, key_padding_mask=mask, impl=name)

    check_nonfinite(impl, fn, (*poison(q, k, v, kind), ls), go, cand, top_k, dtype, near)


NONFINITE_GRID = ("cifar-8x8", "cheb-gqa", "no-prefix")


@pytest.mark.parametrize("kind", ["q", "k", "v"])
@pytest.mark.parametrize("case", NONFINITE_GRID)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_local2d_nonfinite(impl, case, kind):
    b, h, hkv, grid, radius, metric, top_k, num_prefix, per_head, dup, small = GRID[case]
    dtype = torch.float32
    why = runs(impl, dtype, dup, small)
    if why:
        pytest.skip(why)
    n = num_prefix + grid[0] * grid[1]
    q, k, v, ls, go = make_inputs(b, h, hkv, n, n, 8, per_head, seed=len(case), dup_keys=dup)
    cand = grid_candidate_mask(grid, radius, metric, num_prefix)[None]
    near = near_tie_rows(q, k, cand, top_k)

    def fn(q_, k_, v_, ls_, name):
        return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k, num_prefix, impl=name)

    check_nonfinite(impl, fn, (*poison(q, k, v, kind), ls), go, cand, top_k, dtype, near)


def check_large_finite_values(impl, fn, q, k, v, ls, cand, top_k):
    """Value rows of +-2e38 (finite; three such rows, so the sum of a row or of a lane over the
    rows overflows fp32): no NaN row, and the forward matches the oracle (their gradients
    overflow in fp32 by themselves, so only the forward is held to it)."""
    v = v.clone()
    v[0, 0, 3:6] = 2e38
    v[-1, -1, 7, ::2] = -2e38
    out = call(impl, lambda name: fn(q, k, v, ls, name))
    assert out.isfinite().all(), f"{impl}: large finite values made {int((~out.isfinite()).any(-1).sum())} rows NaN"
    ref = oracle(q.double(), k.double(), v.double(), ls.double(), cand, top_k)
    near = near_tie_rows(q, k, cand, top_k)
    torch.testing.assert_close(out.double()[~near], ref[~near], rtol=1e-4, atol=1e-4, msg=lambda m: f"{impl}: {m}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_large_finite_values_are_finite_inputs(impl):
    why = runs(impl, torch.float32, None, True)
    if why:
        pytest.skip(why)
    b, h, hkv, tq, tk, d, window, top_k, per_head, *_ = CAUSAL["square"]
    q, k, v, ls, _ = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=5)
    cand = window_candidates(1, tk, tk, window)

    def causal(q_, k_, v_, ls_, name):
        return krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, impl=name)

    check_large_finite_values(impl, causal, q, k, v, ls, cand, top_k)
    b, h, hkv, grid, radius, metric, top_k, num_prefix, per_head, *_ = GRID["cifar-8x8"]
    n = num_prefix + grid[0] * grid[1]
    q, k, v, ls, _ = make_inputs(b, h, hkv, n, n, 8, per_head, seed=6)

    def local2d(q_, k_, v_, ls_, name):
        return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k, num_prefix, impl=name)

    check_large_finite_values(impl, local2d, q, k, v, ls, grid_candidate_mask(grid, radius, metric, num_prefix)[None],
                              top_k)


def peaked_rows(q, k, cand, gap=1e-3):
    """(B, H, Tq): rows whose two nearest candidates are closer than ``gap`` (a tiny sigma's
    softmax then turns on fp32 rounding of the distances)."""
    near = sorted_candidate_distances(q, k, cand)
    return (near[..., 1] - near[..., 0]) < gap


# log sigma -10: c = 2.4e8, so c * dist reaches ~1e10 (a fused multiply-subtract of two such
# logits once put exp past overflow); +60: c underflows to 0 in fp32 (inf * -0 is NaN)
EXTREME_LOG_SIGMA = (-10.0, 60.0)


@pytest.mark.parametrize("log_sigma", EXTREME_LOG_SIGMA)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_extreme_sigma_conforms(impl, log_sigma):
    """A sigma so small that only the nearest kept key counts, or so large that c = 0 (every
    kept key weighs the same): no NaN, the oracle's output, finite gradients; causal (with
    rows that have fewer candidates than top_k) and 2-D."""
    why = runs(impl, torch.float32, None, True)
    if why:
        pytest.skip(why)
    b, h, hkv, tq, tk, d, window, top_k, *_ = CAUSAL["square"]
    q, k, v, _, _ = make_inputs(b, h, hkv, tq, tk, d, False, seed=7)
    causal_cand = window_candidates(1, tk, tk, window)
    b2, h2, hkv2, grid, radius, metric, top_k2, num_prefix, *_ = GRID["cifar-8x8"]
    n = num_prefix + grid[0] * grid[1]
    q2, k2, v2, _, _ = make_inputs(b2, h2, hkv2, n, n, 8, False, seed=8)
    cases = [
        (lambda q_, k_, v_, ls_, name: krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, impl=name),
         (q, k, v), causal_cand, top_k),
        (lambda q_, k_, v_, ls_, name: krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k2,
                                                                         num_prefix, impl=name),
         (q2, k2, v2), grid_candidate_mask(grid, radius, metric, num_prefix)[None], top_k2),
    ]
    for fn, (q_, k_, v_), cand, kk in cases:
        leaves = [t.clone().requires_grad_(True) for t in (q_, k_, v_)]
        ls = torch.full((q_.shape[1],), log_sigma, requires_grad=True)
        out = call(impl, lambda name: fn(*leaves, ls, name))
        assert out.isfinite().all(), f"{impl}: log sigma {log_sigma} made {int((~out.isfinite()).any(-1).sum())} rows NaN"
        ref = oracle(q_.double(), k_.double(), v_.double(), ls.detach().double(), cand, kk)
        skip = near_tie_rows(q_, k_, cand, kk) | (peaked_rows(q_, k_, cand) if log_sigma < 0 else False)
        torch.testing.assert_close(out.detach().double()[~skip], ref[~skip], atol=1e-4, rtol=0,
                                   msg=lambda m: f"{impl} log sigma {log_sigma}: {m}")
        if impl == "flex" and log_sigma < 0:
            continue  # a documented limit of flex (krause/flex.py): absolute logits s u0 ~ 1e10 in its backward
        grads = torch.autograd.grad(out, (*leaves, ls), torch.ones_like(out).masked_fill(skip[..., None], 0.0))
        for name, g in zip(("dq", "dk", "dv", "dlog_sigma"), grads):
            assert g.isfinite().all(), f"{impl} log sigma {log_sigma}: {name} is not finite"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nonfinite_in_low_precision_and_engine_dense_2d(impl, dtype):
    """The same rule in bf16 and on the engine's dense 2-D path (small grids, impl="auto" off the compiled kernel)."""
    why = runs(impl, dtype, None, True)
    if why:
        pytest.skip(why)
    b, h, hkv, grid, radius, metric, top_k, num_prefix, per_head, dup, _ = GRID["cifar-8x8"]
    n = num_prefix + grid[0] * grid[1]
    q, k, v, ls, go = make_inputs(b, h, hkv, n, n, 8, per_head, seed=3)
    q, k, v = (t.to(dtype).float() for t in poison(q, k, v, "k"))
    cand = grid_candidate_mask(grid, radius, metric, num_prefix)[None]
    near = near_tie_rows(q, k, cand, top_k)
    name = {"engine": "auto"}.get(impl)

    def fn(q_, k_, v_, ls_, chosen):
        return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, radius, metric, top_k, num_prefix,
                                                impl=name or chosen)

    check_nonfinite(impl, fn, (q, k, v, ls), go, cand, top_k, dtype, near)


def test_nonfinite_rule_against_sdpa():
    """What SDPA (math backend, the same causal window as a bool mask) does with the same
    inputs: a NaN query gives exactly the same NaN rows; a NaN key or value makes NaN at least
    every row the rule does (SDPA's masked-out products 0 * NaN spread it to every row)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d, window = 1, 2, 12, 4, 4
    cand = window_candidates(1, t, t, window)
    for kind in ("q", "k", "v"):
        q, k, v, _, _ = make_inputs(b, h, h, t, t, d, False, seed=5)
        q, k, v = (x.nan_to_num(nan=NAN, posinf=NAN, neginf=NAN) for x in poison(q, k, v, kind))
        with sdpa_kernel(SDPBackend.MATH):
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=cand[:, None])
        ours = krause.causal_krause_attention(q, k, v, 0.3, window, 2, impl="reference")
        sdpa_rows, our_rows = sdpa.isnan().any(-1), ours.isnan().any(-1)
        assert our_rows.any()
        if kind == "q":
            assert torch.equal(our_rows, sdpa_rows)
        else:
            assert (sdpa_rows | ~our_rows).all()
