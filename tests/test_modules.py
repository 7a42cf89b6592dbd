"""Attention modules: Krause modules against their standard twins, against the reference
ops and direct formulas, the Swin helpers, the gated mix and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import krause
from krause.masks import grid_candidate_mask
from krause.nn import (
    CausalKrauseAttention,
    CausalSelfAttention,
    GatedKrauseAttention,
    LocalKrauseAttention2d,
    SlidingWindowAttention,
    StandardAttention,
    TopKAttention,
    WindowAttention,
    WindowKrauseAttention,
    gated_mix,
    relative_position_index,
    shifted_window_mask,
    topk_schedule,
    window_partition,
    window_reverse,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- twins
VISION_KW = dict(grid=(3, 3), radius=1, top_k=3, sigma=2.0)
CAUSAL_KW = dict(window=4, top_k=2)
# name -> (Krause class, twin class, shared positional args, Krause kwargs, twin kwargs, input)
TWINS = {
    "vision": (LocalKrauseAttention2d, StandardAttention, (32, 4), VISION_KW, {}, lambda: _randn(2, 10, 32)),
    "vision_per_head": (
        LocalKrauseAttention2d, StandardAttention, (32, 4), dict(VISION_KW, per_head_sigma=True), {},
        lambda: _randn(2, 10, 32),
    ),
    "swin": (WindowKrauseAttention, WindowAttention, (32, 4, 4), {}, {}, lambda: _randn(3, 16, 32)),
    "causal": (CausalKrauseAttention, CausalSelfAttention, (32, 4, 2), CAUSAL_KW, {}, lambda: _randn(2, 9, 32)),
    "sliding_window": (
        CausalKrauseAttention, SlidingWindowAttention, (32, 4, 2), CAUSAL_KW, dict(window=4), lambda: _randn(2, 9, 32)
    ),
    "topk": (CausalKrauseAttention, TopKAttention, (32, 4, 2), CAUSAL_KW, dict(top_k=2), lambda: _randn(2, 9, 32)),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twins_differ_only_by_log_sigma(name):
    krause_cls, twin_cls, args, kwargs, twin_kwargs, make_x = TWINS[name]
    torch.manual_seed(0)
    kmod, tmod = krause_cls(*args, **kwargs), twin_cls(*args, **twin_kwargs)
    k_params, t_params = dict(kmod.named_parameters()), dict(tmod.named_parameters())
    assert set(k_params) - set(t_params) == {"log_sigma"}
    assert set(t_params) <= set(k_params)
    for n, p in t_params.items():
        assert p.shape == k_params[n].shape, n
    k_count = sum(p.numel() for p in kmod.parameters())
    t_count = sum(p.numel() for p in tmod.parameters())
    assert k_count - t_count == kmod.log_sigma.numel()
    assert set(kmod.state_dict()) - set(tmod.state_dict()) == {"log_sigma"}
    assert set(tmod.state_dict()) <= set(kmod.state_dict())


@pytest.mark.parametrize("name", sorted(TWINS))
@pytest.mark.parametrize("which", ["krause", "twin"])
def test_forward_backward_shapes(name, which):
    krause_cls, twin_cls, args, kwargs, twin_kwargs, make_x = TWINS[name]
    torch.manual_seed(0)
    mod = krause_cls(*args, **kwargs) if which == "krause" else twin_cls(*args, **twin_kwargs)
    x = make_x().requires_grad_(True)
    out = mod(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_twin_state_dict_loads_into_krause_model():
    twin = CausalSelfAttention(32, 4, 2)
    kmod = CausalKrauseAttention(32, 4, 2, window=4, top_k=2, sigma=3.0)
    missing, unexpected = kmod.load_state_dict(twin.state_dict(), strict=False)
    assert missing == ["log_sigma"] and unexpected == []
    torch.testing.assert_close(kmod.q_proj.weight, twin.q_proj.weight)


# ----------------------------------------------------------------------------- vision
def _vision_qkv(mod, x):
    b, n, c = x.shape
    qkv = F.linear(x, mod.qkv.weight, mod.qkv.bias).reshape(b, n, 3, mod.num_heads, c // mod.num_heads)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _vision_by_hand(mod, x, attention):
    b, n, c = x.shape
    q, k, v = _vision_qkv(mod, x)
    out = attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, mod.proj.weight, mod.proj.bias)


@pytest.mark.parametrize(
    "grid, radius, metric, top_k, per_head",
    [((3, 3), 1, "manhattan", 3, False), ((4, 5), 2, "chebyshev", 6, True), ((12, 12), 1, "manhattan", 4, True)],
)
def test_local_krause_matches_reference_op(grid, radius, metric, top_k, per_head):
    # 12x12 + CLS = 145 tokens takes the sparse path of the op, the others the dense one.
    torch.manual_seed(1)
    mod = LocalKrauseAttention2d(24, 3, grid, radius=radius, metric=metric, top_k=top_k, sigma=1.5,
                                 per_head_sigma=per_head)
    with torch.no_grad():
        mod.log_sigma.add_(torch.linspace(-0.3, 0.3, mod.log_sigma.numel()).reshape(mod.log_sigma.shape))
    x = _randn(2, 1 + grid[0] * grid[1], 24, seed=2)

    def reference(q, k, v):
        return krause.local_krause_attention_2d_reference(q, k, v, mod.log_sigma, grid, radius, metric, top_k)

    expected = _vision_by_hand(mod, x, reference)
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    probs = mod.attention_weights(x)
    _, _, v = _vision_qkv(mod, x)
    by_weights = F.linear((probs @ v).transpose(1, 2).reshape(x.shape), mod.proj.weight, mod.proj.bias)
    torch.testing.assert_close(by_weights, expected, rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 3, x.shape[1], x.shape[1])


def test_local_krause_attention_weights_are_sparse_rows():
    grid, top_k = (4, 4), 5
    mod = LocalKrauseAttention2d(16, 2, grid, radius=1, top_k=top_k, sigma=50.0)  # wide sigma: no weight underflows
    x = _randn(3, 17, 16, seed=3)
    probs = mod.attention_weights(x)
    candidates = grid_candidate_mask(grid, 1, "manhattan", 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert (probs[..., ~candidates] == 0).all()
    # Corner patches have 3 grid candidates + CLS = 4 < top_k, edges 5, inner 6, CLS 17.
    expected = torch.clamp(candidates.sum(-1), max=top_k)
    assert set(expected.tolist()) == {4, 5}
    assert torch.equal((probs > 0).sum(-1), expected.expand(3, 2, 17))


def test_local_krause_keeps_the_nearest_keys():
    mod = LocalKrauseAttention2d(8, 1, (3, 3), radius=1, top_k=2, sigma=10.0)
    x = _randn(1, 10, 8, seed=4)
    q, k, _ = _vision_qkv(mod, x)
    probs = mod.attention_weights(x)
    dist = torch.cdist(q[0, 0], k[0, 0]).masked_fill(~grid_candidate_mask((3, 3), 1, "manhattan", 1), math.inf)
    nearest = dist.topk(2, largest=False).indices.sort(-1).values
    kept = (probs[0, 0] > 0).nonzero()[:, 1].view(10, 2)
    assert torch.equal(kept, nearest)


def test_standard_attention_weights_and_fused_path_agree():
    mod = StandardAttention(16, 2)
    x = _randn(2, 7, 16, seed=5)
    probs = mod.attention_weights(x)
    q, k, v = _vision_qkv(mod, x)
    torch.testing.assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1))
    out = F.linear((probs @ v).transpose(1, 2).reshape(x.shape), mod.proj.weight, mod.proj.bias)
    torch.testing.assert_close(mod(x), out, rtol=1e-5, atol=1e-6)


def test_krause_attention_dropout_applies_in_training_only():
    mod = LocalKrauseAttention2d(16, 2, (2, 2), top_k=2, attn_drop=0.5)
    x = _randn(2, 5, 16, seed=6)
    mod.eval()
    torch.testing.assert_close(mod(x), mod(x))
    mod.train()
    torch.manual_seed(0)
    a = mod(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, mod(x))


def test_topk_schedule():
    assert topk_schedule(2, 12) == [2, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4]
    ks = topk_schedule(8, 12)
    assert ks[0] == 8 and ks[-1] == 16 and ks == sorted(ks)
    assert topk_schedule(5, 1) == [5]
    with pytest.raises(ValueError, match="num_layers"):
        topk_schedule(2, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(top_k=0), "top_k"),
        (dict(radius=-1), "radius"),
        (dict(metric="euclid"), "metric"),
        (dict(grid=(3,)), "grid"),
        (dict(grid=(0, 3)), "grid"),
        (dict(num_heads=3), "num_heads"),
        (dict(attn_drop=1.0), "attn_drop"),
    ],
)
def test_local_krause_rejects_bad_arguments(kwargs, match):
    base = dict(dim=20, num_heads=4, grid=(3, 3))
    with pytest.raises(ValueError, match=match):
        LocalKrauseAttention2d(**{**base, **kwargs})


def test_local_krause_rejects_a_grid_that_does_not_match_the_input():
    mod = LocalKrauseAttention2d(16, 2, (3, 3))
    with pytest.raises(ValueError, match="grid"):
        mod(_randn(1, 12, 16))


# ----------------------------------------------------------------------------- swin
@pytest.mark.parametrize("window", [(4, 4), (2, 3)])
def test_relative_position_index(window):
    wh, ww = window
    n, table = wh * ww, (2 * wh - 1) * (2 * ww - 1)
    idx = relative_position_index(window)
    assert idx.shape == (n, n) and idx.dtype == torch.long
    assert idx.min() == 0 and idx.max() == table - 1
    assert len(idx.unique()) == table  # every offset occurs
    centre = (wh - 1) * (2 * ww - 1) + (ww - 1)
    assert (idx.diagonal() == centre).all()
    assert torch.equal(idx + idx.T, torch.full_like(idx, 2 * centre))  # offset (a, b) mirrors (-a, -b)
    # Pairs with the same 2-D offset share an entry.
    r, c = torch.arange(n) // ww, torch.arange(n) % ww
    offsets = torch.stack([r[:, None] - r[None, :], c[:, None] - c[None, :]], -1).view(-1, 2)
    for off in offsets.unique(dim=0):
        same = (offsets == off).all(-1)
        assert len(idx.view(-1)[same].unique()) == 1


def test_window_partition_round_trip():
    x = _randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 5)
    torch.testing.assert_close(windows[4], x[0, 4:8, 4:8])  # image 0, window row 1, col 1
    torch.testing.assert_close(window_reverse(windows, 4, 8, 12), x)
    with pytest.raises(ValueError, match="window_size"):
        window_partition(x, 5)


def test_shifted_window_mask_separates_regions():
    size, ws, shift = 8, 4, 2
    mask = shifted_window_mask(size, size, ws, shift)
    assert mask.shape == ((size // ws) ** 2, ws * ws, ws * ws)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # Independent criterion: after rolling by -shift, a token at shifted row r came from
    # row (r + shift) % size; two tokens of a window may attend iff both or neither
    # wrapped around, on each axis.
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wrapped = torch.stack([(rows + shift >= size), (cols + shift >= size)], -1).float()
    wrapped = window_partition(wrapped[None], ws).reshape(-1, ws * ws, 2)
    same_region = (wrapped[:, :, None] == wrapped[:, None, :]).all(-1)
    assert torch.equal(mask == 0, same_region)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped tokens
    assert torch.equal(shifted_window_mask(size, size, ws, 0), torch.zeros_like(mask))
    with pytest.raises(ValueError, match="shift_size"):
        shifted_window_mask(size, size, ws, ws)


@pytest.mark.parametrize("cls", [WindowAttention, WindowKrauseAttention])
def test_shifted_mask_blocks_cross_region_attention(cls):
    mod = cls(16, (4, 4), 2)
    mask = shifted_window_mask(8, 8, 4, 2)
    x = _randn(2 * 4, 16, 16, seed=7)  # two images of 2x2 windows
    probs = mod.attention_weights(x, mask=mask)
    blocked = (mask != 0).repeat(2, 1, 1)[:, None].expand_as(probs)
    assert probs[blocked].max() < 1e-30
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    _, _, v = _vision_qkv(mod, x)
    out = F.linear((probs @ v).transpose(1, 2).reshape(x.shape), mod.proj.weight, mod.proj.bias)
    torch.testing.assert_close(mod(x, mask=mask), out, rtol=1e-5, atol=1e-6)


def test_krause_window_logits_equal_the_formula():
    torch.manual_seed(0)
    mod = WindowKrauseAttention(24, 3, 3, sigma=4.0)
    with torch.no_grad():
        mod.log_sigma.copy_(torch.tensor([0.5, 1.0, 1.5]))
        mod.relative_position_bias_table.normal_()
    assert torch.allclose(WindowKrauseAttention(24, 3, 3).sigma, torch.full((3,), 4.0))
    mask = shifted_window_mask(6, 6, 3, 1)
    x = _randn(4, 9, 24, seed=8)
    probs = mod.attention_weights(x, mask=mask)

    q, k, _ = _vision_qkv(mod, x)
    scale = 8**-0.5
    sq_dist = ((q[..., :, None, :] * scale - k[..., None, :, :] * scale) ** 2).sum(-1)
    sigma = mod.log_sigma.exp().view(1, 3, 1, 1)
    idx = relative_position_index(3)
    bias = mod.relative_position_bias_table[idx.view(-1)].view(9, 9, 3).permute(2, 0, 1)
    logits = -sq_dist / (2 * sigma**2) + bias + mask[:, None]
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)


def test_window_attention_matches_swin_formula():
    mod = WindowAttention(16, 2, 2)
    x = _randn(6, 4, 16, seed=9)
    mask = shifted_window_mask(4, 6, 2, 1)  # 6 windows of one image
    probs = mod.attention_weights(x, mask=mask)
    q, k, _ = _vision_qkv(mod, x)
    bias = mod.relative_position_bias().detach()
    expected = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5 + bias + mask[:, None], -1)
    torch.testing.assert_close(probs, expected)


def test_window_attention_rejects_bad_inputs():
    with pytest.raises(ValueError, match="sigma"):
        WindowKrauseAttention(16, 2, 2, sigma=0)
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention(16, 2, 3)
    mod = WindowKrauseAttention(16, 2, 2)
    with pytest.raises(ValueError, match="window_size"):
        mod(_randn(2, 9, 16))
    with pytest.raises(ValueError, match="mask"):
        mod(_randn(3, 4, 16), mask=torch.zeros(2, 4, 4))


# ----------------------------------------------------------------------------- causal
def test_causal_krause_matches_reference_op():
    torch.manual_seed(0)
    mod = CausalKrauseAttention(24, 6, 3, window=5, top_k=3, sigma=1.5)
    with torch.no_grad():
        mod.log_sigma.copy_(torch.linspace(-0.5, 0.8, 6))
    x = _randn(2, 11, 24, seed=10)
    b, t, c = x.shape
    q = mod.q_proj(x).view(b, t, 6, 4).transpose(1, 2)
    k = mod.k_proj(x).view(b, t, 3, 4).transpose(1, 2)
    v = mod.v_proj(x).view(b, t, 3, 4).transpose(1, 2)
    out = krause.causal_krause_attention_reference(q, k, v, mod.log_sigma, 5, 3)
    expected = mod.o_proj(out.transpose(1, 2).reshape(b, t, c))
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)


def _causal_by_hand(mod, x, weights_of):
    """Projects x like the module and mixes values by weights_of(scores (B, H, T, T)) row by row."""
    b, t, c = x.shape
    h, hkv = mod.num_heads, mod.num_kv_heads
    q = mod.q_proj(x).view(b, t, h, -1).transpose(1, 2)
    k = mod.k_proj(x).view(b, t, hkv, -1).transpose(1, 2).repeat_interleave(h // hkv, 1)
    v = mod.v_proj(x).view(b, t, hkv, -1).transpose(1, 2).repeat_interleave(h // hkv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = weights_of(scores) @ v
    return mod.o_proj(out.transpose(1, 2).reshape(b, t, c))


def test_sliding_window_attention_matches_formula():
    mod = SlidingWindowAttention(24, 6, 2, window=3)
    x = _randn(2, 10, 24, seed=20)

    def weights(scores):
        i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
        return torch.softmax(scores.masked_fill((j > i) | (j <= i - 3), -math.inf), -1)

    torch.testing.assert_close(mod(x), _causal_by_hand(mod, x, weights), rtol=1e-5, atol=1e-6)


def test_topk_attention_matches_formula():
    mod = TopKAttention(24, 6, 3, top_k=4)
    x = _randn(2, 10, 24, seed=21)

    def weights(scores):
        out = torch.zeros_like(scores)
        for i in range(scores.shape[-2]):  # row i: the 4 best of keys 0..i
            row = scores[..., i, : i + 1]
            best = row.topk(min(4, i + 1), -1)
            out[..., i, : i + 1] = torch.zeros_like(row).scatter(-1, best.indices, torch.softmax(best.values, -1))
        return out

    torch.testing.assert_close(mod(x), _causal_by_hand(mod, x, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: CausalKrauseAttention(16, 2, window=3, top_k=2), lambda: CausalSelfAttention(16, 2),
    lambda: SlidingWindowAttention(16, 2, window=3), lambda: TopKAttention(16, 2, top_k=2),
], ids=["krause", "standard", "sliding_window", "topk"])
def test_causal_modules_do_not_look_ahead(make):
    mod = make()
    x = _randn(1, 8, 16, seed=11)
    y = x.clone()
    y[:, 5:] = _randn(1, 3, 16, seed=12)
    torch.testing.assert_close(mod(x)[:, :5], mod(y)[:, :5])
    assert not torch.allclose(mod(x)[:, 5:], mod(y)[:, 5:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window"),
        (dict(top_k=0), "top_k"),
        (dict(sigma=0.0), "sigma"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(attn_drop=0.1), "attn_drop"),
    ],
)
def test_causal_krause_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalKrauseAttention(**{**dict(dim=16, num_heads=4), **kwargs})


# ----------------------------------------------------------------------------- gated
def test_gate_starts_near_gate_init_on_the_standard_branch():
    torch.manual_seed(0)
    mod = GatedKrauseAttention(32, 4, 2, window=4, top_k=2)
    weights = mod.gate_weights(_randn(4, 16, 32, seed=13))
    assert weights.shape == (4, 16, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 16))
    assert abs(weights[..., 0].mean().item() - 0.8) < 0.01
    assert torch.allclose(mod.gate.bias, torch.tensor([math.log(4.0), 0.0]))
    assert 0.005 < mod.gate.weight.std().item() < 0.015


def test_gated_output_is_the_weighted_mix_of_the_branches():
    torch.manual_seed(0)
    mod = GatedKrauseAttention(16, 2, window=3, top_k=2, gate_init=0.8)
    with torch.no_grad():
        mod.gate.weight.zero_()  # gate = softmax(bias) = (0.8, 0.2) for every token
    x = _randn(2, 7, 16, seed=14)
    expected = 0.8 * mod.standard(x) + 0.2 * mod.krause(x)
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-6)


def test_gated_mix_functional():
    a, b = _randn(3, 5, 4, seed=15), _randn(3, 5, 4, seed=16)
    gate = torch.nn.Linear(8, 2)
    out, w = gated_mix(a, b, gate, return_gate=True)
    expected_w = torch.softmax(gate(torch.cat([a, b], -1)), -1)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, expected_w[..., :1] * a + expected_w[..., 1:] * b)
    with pytest.raises(ValueError, match="out_krause"):
        gated_mix(a, b[..., :3], gate)


def test_gated_backward_reaches_every_parameter():
    mod = GatedKrauseAttention(16, 4, 2, window=3, top_k=2)
    mod(_randn(2, 6, 16, seed=17)).square().sum().backward()
    for n, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("gate_init", [0.0, 1.0, -0.5])
def test_gated_rejects_bad_gate_init(gate_init):
    with pytest.raises(ValueError, match="gate_init"):
        GatedKrauseAttention(16, 2, gate_init=gate_init)


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize(
    "make",
    [
        lambda: (CausalKrauseAttention(16, 4, 2, window=3, top_k=2), _randn(2, 9, 16)),
        lambda: (LocalKrauseAttention2d(16, 2, (3, 3), top_k=3), _randn(2, 10, 16)),
    ],
    ids=["causal", "local2d"],
)
def test_krause_modules_compile_without_graph_breaks(make):
    # The ops are opaque custom ops; the modules around them must trace in one graph and
    # hand them inputs whose strides match what the ops' compile-time fakes assume.
    torch._dynamo.reset()
    mod, x = make()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, mod(x))
    out.sum().backward()
    assert mod.log_sigma.grad is not None


# ----------------------------------------------------------------------------- config, factory, impl
from krause.nn import KrauseConfig, build_attention  # noqa: E402


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "^window"),
        (dict(top_k=1.5), "^top_k"),
        (dict(sigma=float("nan")), "^sigma"),
        (dict(radius=-1), "^radius"),
        (dict(metric="euclid"), "^metric"),
        (dict(per_head_sigma=1), "^per_head_sigma"),
        (dict(impl="cuda"), "^impl"),
    ],
)
def test_krause_config_validates_once_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KrauseConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        KrauseConfig().replace(**kwargs)


def test_krause_config_is_frozen_and_modules_read_it():
    cfg = KrauseConfig(window=4, top_k=2, sigma=3.0, impl="reference")
    with pytest.raises(AttributeError):
        cfg.window = 8
    with pytest.raises(ValueError, match="^widnow is not a Krause setting"):
        cfg.replace(widnow=8)
    mod = CausalKrauseAttention(16, 2, config=cfg)
    assert (mod.window, mod.top_k, mod.impl, mod.config) == (4, 2, "reference", cfg)
    assert torch.allclose(mod.log_sigma.exp(), torch.full((2,), 3.0))
    # keyword overrides apply on top of the config (or of the module's preset)
    assert CausalKrauseAttention(16, 2, config=cfg, top_k=3).config == cfg.replace(top_k=3)
    assert CausalKrauseAttention(16, 2, top_k=3).config == CausalKrauseAttention.preset.replace(top_k=3)
    assert LocalKrauseAttention2d(16, 2, (2, 2), per_head_sigma=True).log_sigma.shape == (2,)
    assert LocalKrauseAttention2d(16, 2, (2, 2)).log_sigma.shape == ()
    with pytest.raises(ValueError, match="^widnow is not a Krause setting"):
        CausalKrauseAttention(16, 2, widnow=4)


@pytest.mark.parametrize(
    "kind, args, shared, x",
    [
        ("causal", (16, 2), {}, _randn(2, 6, 16)),
        ("vision", (16, 2), dict(grid=(2, 2), num_prefix_tokens=1), _randn(2, 5, 16)),
        ("window", (16, 2, 2), {}, _randn(2, 4, 16)),
    ],
)
def test_factory_builds_both_twins_from_the_same_arguments(kind, args, shared, x):
    torch.manual_seed(0)
    kmod = build_attention(kind, *args, krause=KrauseConfig(window=3, top_k=2, sigma=2.0), **shared)
    torch.manual_seed(0)
    smod = build_attention(kind, *args, **shared)
    assert isinstance(kmod, krause.nn.TWINS[kind].krause) and isinstance(smod, krause.nn.TWINS[kind].standard)
    assert kmod.config.sigma == 2.0 and not hasattr(smod, "config")
    assert set(kmod.state_dict()) - set(smod.state_dict()) == {"log_sigma"}
    assert kmod(x).shape == smod(x).shape == x.shape
    with pytest.raises(ValueError, match="^sigma is a Krause setting"):
        build_attention(kind, *args, sigma=2.0, **shared)


def test_standard_twins_refuse_krause_arguments():
    for make in (lambda: CausalSelfAttention(16, 2, window=4), lambda: StandardAttention(16, 2, top_k=3),
                 lambda: WindowAttention(16, 2, 2, sigma=4.0), lambda: SlidingWindowAttention(16, 2, sigma=1.0),
                 lambda: StandardAttention(16, 2, config=KrauseConfig())):
        with pytest.raises(TypeError):
            make()
    with pytest.raises(ValueError, match="^attention 'global' is not registered; registered names: gated, "):
        build_attention("global", 16, 2)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_module_impl_reaches_the_op(impl, monkeypatch):
    import krause.cache
    import krause.nn.causal as causal_module
    import krause.nn.vision as vision_module

    seen = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs["impl"])
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(causal_module, "causal_krause_attention", spy(causal_module.causal_krause_attention))
    monkeypatch.setattr(krause.cache, "causal_krause_attention", spy(krause.cache.causal_krause_attention))
    monkeypatch.setattr(vision_module, "local_krause_attention_2d", spy(vision_module.local_krause_attention_2d))
    torch.manual_seed(0)
    causal = CausalKrauseAttention(16, 2, window=3, top_k=2, impl=impl)
    local = LocalKrauseAttention2d(16, 2, (3, 3), top_k=3, impl=impl)
    x, y = _randn(2, 7, 16, seed=40), _randn(2, 10, 16, seed=41)
    with torch.no_grad():
        out_causal, out_local = causal(x), local(y)
        cache = causal.new_cache(2)
        causal(x, cache)  # a multi-token cached step goes through the op too
    assert seen == [impl, impl, impl] and cache.impl == impl
    ref_causal = CausalKrauseAttention(16, 2, config=causal.config.replace(impl="reference"))
    ref_causal.load_state_dict(causal.state_dict())
    torch.testing.assert_close(out_causal, ref_causal(x), rtol=1e-5, atol=1e-5)
    assert out_local.shape == y.shape


@pytest.mark.parametrize("make", [
    lambda: CausalKrauseAttention(24, 6, 3, window=4, top_k=2, sigma=1.5),
    lambda: CausalSelfAttention(24, 6, 3),
], ids=["krause", "standard"])
def test_causal_attention_weights_reproduce_the_forward(make):
    torch.manual_seed(0)
    mod = make()
    x = _randn(2, 9, 24, seed=42)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    for kpm in (None, mask):
        probs = mod.attention_weights(x, key_padding_mask=kpm)
        assert probs.shape == (2, 6, 9, 9)
        assert (probs.triu(1) == 0).all()  # causal
        b, t, c = x.shape
        v = mod.v_proj(x).view(b, t, 3, 4).transpose(1, 2).repeat_interleave(2, 1)
        by_weights = mod.o_proj((probs @ v).transpose(1, 2).reshape(b, t, c))
        torch.testing.assert_close(by_weights, mod(x, key_padding_mask=kpm), rtol=1e-5, atol=1e-5)
    assert (probs[1, :, :3] == 0).all() and (probs[1, :, :, :3] == 0).all()  # padding never attended


def test_new_cache_capacity():
    """Growing caches allocate ``capacity`` slots with the first tokens; window caches keep W tokens whatever it is."""
    kv = torch.zeros(2, 2, 3, 8)

    def filled(cache):
        cache.append(kv, kv)
        return cache

    assert filled(CausalSelfAttention(16, 2).new_cache(2, capacity=50)).capacity == 50
    assert filled(TopKAttention(16, 2, top_k=2).new_cache(2, capacity=30)).capacity == 30
    long = torch.zeros(2, 2, 60, 8)
    krause_cache = CausalKrauseAttention(16, 2, window=4, top_k=2).new_cache(2, capacity=50)
    krause_cache.append(long, long)
    assert krause_cache.keys.shape[2] == 4
    window_cache = SlidingWindowAttention(16, 2, window=5).new_cache(2, capacity=50)
    window_cache.append(long, long)
    assert window_cache.keys.shape[2] == 5
    gated = GatedKrauseAttention(16, 2, window=4, top_k=2).new_cache(1, capacity=40)
    gated.standard.append(kv[:1], kv[:1])
    assert gated.standard.capacity == 40
    gated.standard.append(long[:1], long[:1])  # 63 tokens: the storage doubles
    gated.update_krause(long[:1], long[:1])
    assert (gated.standard.capacity, gated.standard.keys.shape[2], gated.krause.keys.shape[2]) == (80, 63, 4)

def test_swin_krause_window_passes_nan_and_inf_like_sdpa():
    """The Swin Krause window (dense softmax in each window): a non-finite token makes every row of
    its own window NaN, as SDPA over that window does, and leaves the other windows finite."""
    import torch.nn.functional as F

    from krause.nn.swin import WindowKrauseAttention

    torch.manual_seed(0)
    m = WindowKrauseAttention(16, (2, 2), 2)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(3, 4, 16)
        x[1, 2, 5] = bad
        rows = m(x).isnan().any(-1)
        q = torch.randn(3, 2, 4, 8)
        q[1, :, 2] = bad  # the same rule, read off SDPA on a window of the same shape
        want = F.scaled_dot_product_attention(q, q, q).isnan().any(-1).any(1)
        assert torch.equal(rows, want) and rows[1].all() and not rows[0].any() and not rows[2].any(), bad
