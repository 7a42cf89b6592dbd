"""ViT/KViT and Swin/KSwin: registry, twins differing only in attention, shapes, bad input."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_transformers as vt
from krause.nn import LocalKrauseAttention2d, StandardAttention, WindowAttention, WindowKrauseAttention
from vision_transformers.models import sigma_per_layer

# Tiny widths: each registered model keeps its structure (patching, neighbourhood, window
# handling, stages) but is small enough to build and run in well under a second.
SMALL = {
    "vit_small_patch4_32": dict(embed_dim=32, depth=3, num_heads=2),
    "kvit_small_patch4_32": dict(embed_dim=32, depth=3, num_heads=2),
    "vit_small_patch16_224_twin": dict(embed_dim=32, depth=2, num_heads=2),
    "kvit_small_patch16_224": dict(embed_dim=32, depth=2, num_heads=2),
    "vit_base_patch16_224_twin": dict(embed_dim=48, depth=2, num_heads=3),
    "kvit_base_patch16_224": dict(embed_dim=48, depth=2, num_heads=3),
    "swin_tiny_patch4_window4_32": dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    "kswin_tiny_patch4_window4_32": dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)),
}


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


def _sigma_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("log_sigma"))


def test_all_models_are_registered_with_timm():
    assert set(SMALL) == set(vt.MODEL_DEFAULTS)
    for name in vt.MODEL_DEFAULTS:
        assert timm.is_model(name), name
    for krause_name, base_name in vt.TWINS.items():
        assert krause_name.startswith("k") and base_name in vt.MODEL_DEFAULTS


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_backward_small(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **SMALL[name])
    img = model.img_size
    x = torch.randn(2, 3, *img)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if name.startswith("k"):
        # sigma is learnable: its gradient is a real number, not zero
        grads = [p.grad for n, p in model.named_parameters() if n.endswith("log_sigma")]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("krause_name", sorted(vt.TWINS))
def test_twins_differ_only_in_attention(krause_name):
    """Same seed -> identical shared parameters; the Krause model adds only log_sigma."""
    base_name = vt.TWINS[krause_name]
    torch.manual_seed(123)
    kmodel = timm.create_model(krause_name, **SMALL[krause_name])
    torch.manual_seed(123)
    bmodel = timm.create_model(base_name, **SMALL[base_name])
    ks, bs = kmodel.state_dict(), bmodel.state_dict()
    extra = set(ks) - set(bs)
    assert extra and all(k.endswith("log_sigma") for k in extra)
    assert set(bs) <= set(ks)
    for key, value in bs.items():
        assert torch.equal(ks[key], value), key
    assert _param_count(kmodel) - _param_count(bmodel) == _sigma_count(kmodel)
    # same modules apart from the attention class: same block types, norms, drop-path rates
    kmods = [(n, type(m).__name__, getattr(m, "drop_prob", None)) for n, m in kmodel.named_modules()]
    bmods = [(n, type(m).__name__, getattr(m, "drop_prob", None)) for n, m in bmodel.named_modules()]
    swap = {"LocalKrauseAttention2d": "StandardAttention", "WindowKrauseAttention": "WindowAttention"}
    assert [(n, swap.get(t, t), p) for n, t, p in kmods] == bmods


@pytest.mark.parametrize("krause_name", sorted(vt.TWINS))
def test_full_size_param_counts_differ_only_by_sigma(krause_name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        kmodel = timm.create_model(krause_name)
        bmodel = timm.create_model(vt.TWINS[krause_name])
    diff = _param_count(kmodel) - _param_count(bmodel)
    if "swin" in krause_name:
        assert diff == 3 * 2 + 6 * 2 + 12 * 6 + 24 * 2  # one sigma per head in every block
    else:
        assert diff == 12  # one sigma per layer


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_full_size_configs_match_spec():
    kvit = _meta("kvit_small_patch4_32")
    assert (kvit.embed_dim, len(kvit.blocks), kvit.blocks[0].attn.num_heads) == (384, 12, 6)
    assert kvit.blocks[0].mlp.fc1.out_features == 1536
    assert kvit.top_ks == [2, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4]
    assert kvit.blocks[0].attn.grid == (8, 8) and kvit.blocks[0].attn.metric == "manhattan"
    assert kvit.blocks[0].attn.radius == 1
    assert kvit.blocks[5].drop_path1.drop_prob == pytest.approx(0.1 * 5 / 11)
    assert kvit.blocks[-1].drop_path2.drop_prob == pytest.approx(0.1)
    s16 = _meta("kvit_small_patch16_224")
    assert s16.grid == (14, 14) and s16.top_ks[0] == 8 and s16.top_ks[-1] == 16
    assert s16.blocks[0].attn.metric == "chebyshev" and s16.blocks[0].attn.radius == 2
    b16 = _meta("kvit_base_patch16_224")
    assert (b16.embed_dim, b16.blocks[0].attn.num_heads, b16.blocks[0].mlp.fc1.out_features) == (768, 12, 3072)
    kswin = _meta("kswin_tiny_patch4_window4_32")
    assert kswin.feature_maps == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [st[-1].attn.num_heads for st in kswin.stages] == [3, 6, 12, 24]
    assert [st[-1].mlp.fc1.in_features for st in kswin.stages] == [96, 192, 384, 768]
    # sigma initial values (independent of width, so checked on small models)
    for name, want in (("kvit_small_patch4_32", 2.5), ("kvit_small_patch16_224", 4.5), ("kvit_base_patch16_224", 8.0)):
        sig = sigma_per_layer(timm.create_model(name, **SMALL[name]))
        assert sig == pytest.approx([want] * len(sig))
    sig = sigma_per_layer(timm.create_model("kswin_tiny_patch4_window4_32", **SMALL["kswin_tiny_patch4_window4_32"]))
    assert len(sig) == 6 and sig[0] == pytest.approx([4.0]) and sig[-1] == pytest.approx([4.0] * 4)


def test_baselines_equal_timm_reference_models():
    """Our ViT-S and Swin-T baselines compute exactly what timm's own ViT and Swin compute."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10,
                            depth=2, embed_dim=64, num_heads=2).eval()
    ours = timm.create_model("vit_small_patch4_32", depth=2, embed_dim=64, num_heads=2).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)

    # Swin-T at 32x32 with window 4: timm shrinks the window of the 2x2 and 1x1 maps too.
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, num_classes=10,
                            embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    ours = timm.create_model("swin_tiny_patch4_window4_32", embed_dim=16, depths=(2, 1, 2, 1),
                             num_heads=(1, 2, 2, 4)).eval()
    ref_params, our_params = list(ref.parameters()), list(ours.parameters())
    assert [p.shape for p in ref_params] == [p.shape for p in our_params]
    with torch.no_grad():
        for a, b in zip(ref_params, our_params):
            b.copy_(a)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    ref_windows = [(b.window_size, b.shift_size) for layer in ref.layers for b in layer.blocks]
    our_windows = [((b.window_size,) * 2, (b.shift_size,) * 2) for st in ours.stages for b in st
                   if hasattr(b, "window_size")]
    assert our_windows == [(tuple(w), tuple(s)) for w, s in ref_windows]


def test_swin_late_stages_handled_like_baseline():
    k = timm.create_model("kswin_tiny_patch4_window4_32", **SMALL["kswin_tiny_patch4_window4_32"])
    b = timm.create_model("swin_tiny_patch4_window4_32", **SMALL["swin_tiny_patch4_window4_32"])
    kw = [(blk.window_size, blk.shift_size, blk.attn.window_size) for st in k.stages for blk in st if hasattr(blk, "attn")]
    bw = [(blk.window_size, blk.shift_size, blk.attn.window_size) for st in b.stages for blk in st if hasattr(blk, "attn")]
    assert kw == bw
    assert kw == [(4, 0, (4, 4)), (4, 2, (4, 4)), (4, 0, (4, 4)), (2, 0, (2, 2)), (2, 0, (2, 2)), (1, 0, (1, 1))]
    assert all(isinstance(blk.attn, WindowKrauseAttention) for st in k.stages for blk in st if hasattr(blk, "attn"))
    assert not any(isinstance(blk.attn, WindowKrauseAttention) for st in b.stages for blk in st if hasattr(blk, "attn"))
    assert all(isinstance(blk.attn, WindowAttention) for st in b.stages for blk in st if hasattr(blk, "attn"))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_norm_placement_applies_to_both_twins(placement):
    for name in ("kvit_small_patch4_32", "vit_small_patch4_32"):
        torch.manual_seed(0)
        model = vt.create(name, norm_placement=placement, **SMALL[name])
        assert all(blk.norm_placement == placement for blk in model.blocks)
        assert isinstance(model.norm, torch.nn.Identity) == (placement == "post")
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
    # post-norm changes the function: a block's output is layer-normalised
    torch.manual_seed(0)
    model = vt.create("kvit-s", norm_placement="post", **SMALL["kvit_small_patch4_32"]).eval()
    h = model.blocks[0](model._embed(torch.randn(2, 3, 32, 32)))
    if placement == "post":
        torch.testing.assert_close(h.mean(-1), torch.zeros(2, 65), atol=1e-5, rtol=0)


def test_attention_maps_respect_neighbourhood_and_top_k():
    torch.manual_seed(0)
    model = vt.create("kvit-s", **SMALL["kvit_small_patch4_32"]).eval()
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    assert len(maps) == 3
    for layer, probs in enumerate(maps):
        assert probs.shape == (2, 2, 65, 65)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 65))
        nonzero = (probs > 0).sum(-1)
        assert int(nonzero.max()) <= model.top_ks[layer]
        # patch (row 3, col 3) = token 1 + 3*8 + 3: only itself, its 4 neighbours and CLS
        allowed = {0, 28, 20, 36, 27, 29}
        assert set(torch.nonzero(probs[:, :, 28].sum((0, 1))).flatten().tolist()) <= allowed
    base = vt.create("vit-s", **SMALL["vit_small_patch4_32"]).eval()
    bmaps = base.attention_maps(torch.randn(2, 3, 32, 32))
    assert (bmaps[0] > 0).all()  # softmax attends everywhere


def test_paper_aliases_and_timm_overrides():
    m = vt.create("KViT-S-16", embed_dim=32, depth=2, num_heads=2, img_size=64)
    assert isinstance(m, vt.VisionTransformer) and m.grid == (4, 4)
    assert m.pretrained_cfg["input_size"] == (3, 64, 64)
    m = timm.create_model("kvit_small_patch4_32", num_classes=10, img_size=28, in_chans=1, embed_dim=32, depth=2,
                          num_heads=2, sigma=1.5, top_k=3, per_head_sigma=True)
    assert m.grid == (7, 7) and m.top_ks == [3, 6]
    assert m.blocks[0].attn.log_sigma.shape == (2,)
    assert m.pretrained_cfg["input_size"] == (1, 28, 28) and len(m.pretrained_cfg["mean"]) == 1
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    m = vt.create("kvit-s", top_k_schedule="constant", **SMALL["kvit_small_patch4_32"])
    assert m.top_ks == [2, 2, 2]
    assert isinstance(vt.create("vit-s", **SMALL["vit_small_patch4_32"]).blocks[0].attn, StandardAttention)
    assert isinstance(vt.create("kvit-s", **SMALL["vit_small_patch4_32"]).blocks[0].attn, LocalKrauseAttention2d)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("kvit_small_patch4_32", dict(img_size=30), "not divisible by patch_size"),
        ("swin_tiny_patch4_window4_32", dict(img_size=30), "not divisible by patch_size"),
        ("swin_tiny_patch4_window4_32", dict(img_size=48), "cannot be halved"),
        ("kvit_small_patch4_32", dict(top_k=0), "top_k"),
        ("kvit_small_patch4_32", dict(sigma=-1.0), "sigma"),
        ("kvit_small_patch4_32", dict(sigma=float("nan")), "sigma"),
        ("kswin_tiny_patch4_window4_32", dict(sigma=0.0), "sigma"),
        ("kvit_small_patch4_32", dict(metric="euclid"), "metric"),
        ("kvit_small_patch4_32", dict(norm_placement="sandwich"), "norm_placement"),
        ("kvit_small_patch4_32", dict(embed_dim=30, num_heads=4), "num_heads"),
        ("kvit_small_patch4_32", dict(drop_path_rate=1.5), "drop_path_rate"),
        ("kvit_small_patch4_32", dict(no_such_argument=1), "no_such_argument"),
    ],
)
def test_bad_model_arguments_raise_one_line_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        timm.create_model(name, **kwargs)
    assert "\n" not in str(info.value)


def test_no_pretrained_weights_and_unknown_names():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("kvit_small_patch4_32", pretrained=True)
    with pytest.raises(ValueError, match="unknown model"):
        vt.create("kvit-xl")
    model = vt.create("kvit-s", **SMALL["kvit_small_patch4_32"])
    with pytest.raises(ValueError, match="input must be"):
        model(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("name", ["kvit_small_patch4_32", "kswin_tiny_patch4_window4_32"])
def test_attn_impl_reaches_every_krause_layer(name):
    model = vt.create(name, attn_impl="reference", **SMALL[name])
    impls = [m.impl for m in model.modules() if isinstance(m, (LocalKrauseAttention2d, WindowKrauseAttention))]
    assert impls and set(impls) == {"reference"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="^attn_impl must be one of"):
        vt.create(name, attn_impl="cuda", **SMALL[name])
