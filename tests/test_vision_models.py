"""ViT/KViT and Swin/KSwin on timm's own models: registry, twins differing only in attention,
timm's model contract (features, intermediates, heads, fx, dynamic size, compile),
pretrained stock checkpoints loaded into the Krause models, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from timm.layers import Attention
from timm.models import get_model_input_config, get_notrace_functions, get_notrace_modules
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
from timm.models.vision_transformer import Block, VisionTransformer

import vision_transformers as vt
from krause.nn.swin import WindowKrauseAttention
from krause.nn.vision import LocalKrauseAttention2d
from vision_transformers import analysis
from vision_transformers.models import KrauseVisionTransformer, PostNormBlock, sigma_per_layer

# Tiny widths: each registered model keeps its structure (patching, neighbourhood, window
# handling, stages) but is small enough to build and run in well under a second; the
# ImageNet ones run at 64x64 (a 4x4 grid) to stay fast.
SMALL = {
    "vit_small_patch4_32": dict(embed_dim=32, depth=3, num_heads=2),
    "kvit_small_patch4_32": dict(embed_dim=32, depth=3, num_heads=2),
    "vit_small_patch16_224_twin": dict(embed_dim=32, depth=3, num_heads=2, img_size=64),
    "kvit_small_patch16_224": dict(embed_dim=32, depth=3, num_heads=2, img_size=64),
    "vit_base_patch16_224_twin": dict(embed_dim=48, depth=3, num_heads=3, img_size=64),
    "kvit_base_patch16_224": dict(embed_dim=48, depth=3, num_heads=3, img_size=64),
    "swin_tiny_patch4_window4_32": dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    "kswin_tiny_patch4_window4_32": dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)),
}
NAMES = sorted(SMALL)
VIT_NAMES = [n for n in NAMES if "swin" not in n]


def _small(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**SMALL[name], **kwargs})


def _images(model, batch=2, seed=0):
    c, h, w = get_model_input_config(model)["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


def _sigma_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("log_sigma"))


# ----------------------------------------------------------------------------- registry, twins
def test_all_models_are_registered_with_timm_as_its_own_classes():
    assert set(SMALL) == set(vt.MODEL_DEFAULTS)
    for name in vt.MODEL_DEFAULTS:
        assert timm.is_model(name), name
        model = _small(name)
        if name in vt.TWINS:
            assert isinstance(model, SwinTransformer if "swin" in name else KrauseVisionTransformer)
        else:  # the baselines are timm's stock classes
            assert type(model) is (SwinTransformer if "swin" in name else VisionTransformer)
    for krause_name, base_name in vt.TWINS.items():
        assert krause_name.startswith("k") and base_name in vt.MODEL_DEFAULTS


@pytest.mark.parametrize("name, input_size", [
    ("kvit_small_patch4_32", (3, 32, 32)), ("vit_small_patch4_32", (3, 32, 32)),
    ("kswin_tiny_patch4_window4_32", (3, 32, 32)), ("kvit_small_patch16_224", (3, 224, 224)),
    ("vit_base_patch16_224_twin", (3, 224, 224)),
])
def test_pretrained_cfg_declares_the_input_size(name, input_size):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert cfg["input_size"] == input_size and cfg["architecture"] == name
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.pretrained_cfg["input_size"] == input_size
    assert get_model_input_config(model)["input_size"] == input_size
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == input_size and len(data["mean"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_backward_small(name):
    model = _small(name, num_classes=7)
    out = model(_images(model))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
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
    kmodel, bmodel = _small(krause_name, seed=123), _small(vt.TWINS[krause_name], seed=123)
    ks, bs = kmodel.state_dict(), bmodel.state_dict()
    extra = set(ks) - set(bs)
    assert extra and all(k.endswith("attn.log_sigma") for k in extra)
    assert set(bs) <= set(ks)
    for key, value in bs.items():
        assert torch.equal(ks[key], value), key
    assert _param_count(kmodel) - _param_count(bmodel) == _sigma_count(kmodel)
    # outside the attention modules: the same modules, types and drop-path rates
    def outside(model):
        return [(n, type(m).__name__, getattr(m, "drop_prob", None)) for n, m in model.named_modules()
                if ".attn" not in n and n]
    assert outside(kmodel) == outside(bmodel)
    kattn = [type(m) for n, m in kmodel.named_modules() if n.endswith(".attn")]
    battn = [type(m) for n, m in bmodel.named_modules() if n.endswith(".attn")]
    swin = "swin" in krause_name
    assert set(kattn) == {WindowKrauseAttention if swin else LocalKrauseAttention2d}
    assert set(battn) == {TimmWindowAttention if swin else Attention} and len(kattn) == len(battn)


@pytest.mark.parametrize("krause_name", sorted(vt.TWINS))
def test_full_size_param_counts_differ_exactly_by_the_sigmas(krause_name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        kmodel = timm.create_model(krause_name)
        bmodel = timm.create_model(vt.TWINS[krause_name])
    diff = _param_count(kmodel) - _param_count(bmodel)
    assert diff == _sigma_count(kmodel)
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
    assert [b.attn.top_k for b in kvit.blocks] == kvit.top_ks
    assert kvit.blocks[0].attn.grid == (8, 8) and kvit.blocks[0].attn.metric == "manhattan"
    assert kvit.blocks[0].attn.radius == 1
    assert kvit.blocks[5].drop_path1.drop_prob == pytest.approx(0.1 * 5 / 11)
    assert kvit.blocks[-1].drop_path2.drop_prob == pytest.approx(0.1)
    s16 = _meta("kvit_small_patch16_224")
    assert s16.patch_grid.value == (14, 14) and s16.top_ks[0] == 8 and s16.top_ks[-1] == 16
    assert s16.blocks[0].attn.metric == "chebyshev" and s16.blocks[0].attn.radius == 2
    b16 = _meta("kvit_base_patch16_224")
    assert (b16.embed_dim, b16.blocks[0].attn.num_heads, b16.blocks[0].mlp.fc1.out_features) == (768, 12, 3072)
    kswin = _meta("kswin_tiny_patch4_window4_32")
    assert [st.output_resolution for st in kswin.layers] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [st.blocks[-1].attn.num_heads for st in kswin.layers] == [3, 6, 12, 24]
    assert [st.blocks[-1].mlp.fc1.in_features for st in kswin.layers] == [96, 192, 384, 768]
    # sigma initial values (independent of width, so checked on small models)
    for name, want in (("kvit_small_patch4_32", 2.5), ("kvit_small_patch16_224", 4.5), ("kvit_base_patch16_224", 8.0)):
        sig = sigma_per_layer(_small(name))
        assert sig == pytest.approx([want] * len(sig))
    sig = sigma_per_layer(_small("kswin_tiny_patch4_window4_32"))
    assert len(sig) == 6 and sig[0] == pytest.approx([4.0]) and sig[-1] == pytest.approx([4.0] * 4)


def test_baselines_are_stock_timm_models_exactly():
    """A twin with copied weights computes exactly what timm's own ViT / Swin computes."""
    ref = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10,
                            depth=2, embed_dim=64, num_heads=2).eval()
    ours = timm.create_model("vit_small_patch4_32", depth=2, embed_dim=64, num_heads=2).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), ref(x))
    # Swin-T at 32x32 with window 4: the windows of the 2x2 and 1x1 maps shrink to the map
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, num_classes=10,
                            embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    ours = _small("swin_tiny_patch4_window4_32").eval()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours(x), ref(x))


def test_swin_late_stages_handled_like_baseline():
    k, b = _small("kswin_tiny_patch4_window4_32"), _small("swin_tiny_patch4_window4_32")

    def windows(model):
        return [(blk.window_size, blk.shift_size, tuple(blk.attn.window_size)) for st in model.layers for blk in st.blocks]
    assert windows(k) == windows(b)
    assert windows(k) == [((4, 4), (0, 0), (4, 4)), ((4, 4), (2, 2), (4, 4)), ((4, 4), (0, 0), (4, 4)),
                          ((2, 2), (0, 0), (2, 2)), ((2, 2), (0, 0), (2, 2)), ((1, 1), (0, 0), (1, 1))]


def test_krause_window_attention_equals_the_formula_inside_timm_swin():
    """A KSwin block's attention computes the RBF logits + bias + shift mask of its own windows."""
    model = _small("kswin_tiny_patch4_window4_32").eval()
    blk = model.layers[0].blocks[1]  # shifted windows
    assert blk.attn_mask is not None
    x = torch.randn(2 * 4, 16, 16)
    probs = blk.attn.attention_weights(x, mask=blk.attn_mask)
    q, k, _ = blk.attn.qkv(x).reshape(8, 16, 3, 1, 16).permute(2, 0, 3, 1, 4).unbind(0)
    dist = ((q[..., :, None, :] - k[..., None, :, :]) / 4).pow(2).sum(-1)
    logits = -dist / (2 * 4.0**2) + blk.attn.relative_position_bias()[None] + blk.attn_mask.repeat(2, 1, 1)[:, None]
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_norm_placement_applies_to_both_twins(placement):
    for name in ("kvit_small_patch4_32", "vit_small_patch4_32"):
        model = vt.create(name, norm_placement=placement, **SMALL[name])
        assert all(type(blk) is (PostNormBlock if placement == "post" else Block) for blk in model.blocks)
        assert isinstance(model.norm, torch.nn.Identity) == (placement == "post")
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # post-norm changes the function: a block's output is layer-normalised
    model = vt.create("kvit-s", norm_placement=placement, **SMALL["kvit_small_patch4_32"]).eval()
    tokens = model._pos_embed(model.patch_embed(torch.randn(2, 3, 32, 32)))
    mean = model.blocks[0](tokens).mean(-1)
    assert torch.allclose(mean, torch.zeros(2, 65), atol=1e-5) == (placement == "post")


# ----------------------------------------------------------------------------- attention maps (hooks)
def test_attention_maps_respect_neighbourhood_and_top_k():
    model = _small("kvit_small_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    maps = analysis.attention_maps(model, x)
    assert all(not blk.attn._forward_hooks for blk in model.blocks)  # the hooks are gone again
    assert torch.equal(model(x), before)
    assert len(maps) == 3
    for layer, probs in enumerate(maps):
        assert probs.shape == (2, 2, 65, 65)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 65))
        assert int((probs > 0).sum(-1).max()) <= model.top_ks[layer]
        # patch (row 3, col 3) = token 1 + 3*8 + 3: only itself, its 4 neighbours and CLS
        assert set(torch.nonzero(probs[:, :, 28].sum((0, 1))).flatten().tolist()) <= {0, 28, 20, 36, 27, 29}
    base = _small("vit_small_patch4_32").eval()
    bmaps = analysis.attention_maps(base, x)
    assert (bmaps[0] > 0).all()  # softmax attends everywhere
    # the hook's weights are what timm's Attention computes: its output from them is the block's
    attn, tokens = base.blocks[0].attn, base.blocks[0].norm1(base._pos_embed(base.patch_embed(x)))
    v = attn.qkv(tokens).reshape(2, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((bmaps[0] @ v).transpose(1, 2).reshape(2, 65, 32))
    torch.testing.assert_close(out, attn(tokens), rtol=1e-4, atol=1e-5)


def test_dynamic_img_size_moves_the_krause_grid_with_the_input():
    model = _small("kvit_small_patch4_32", dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 48, 32)  # a 12 x 8 grid, not square
    assert model(x).shape == (1, 10)
    assert model.patch_grid.value == (12, 8)
    probs = analysis.attention_maps(model, x)[0]
    assert probs.shape == (1, 2, 97, 97)
    q = 1 + 5 * 8 + 0  # patch (row 5, col 0): neighbours up, down, right (left is off the grid)
    assert set(torch.nonzero(probs[0, :, q].sum(0)).flatten().tolist()) <= {0, q, q - 8, q + 8, q + 1}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10) and model.patch_grid.value == (8, 8)
    # set_input_size moves a fixed-size model's grid too
    fixed = _small("kvit_small_patch4_32")
    fixed.set_input_size(img_size=(16, 24))
    assert fixed(torch.randn(1, 3, 16, 24)).shape == (1, 10) and fixed.patch_grid.value == (4, 6)


# ----------------------------------------------------------------------------- timm's model contract
@pytest.mark.parametrize("name", NAMES)
def test_timm_head_and_feature_contract(name):
    model = _small(name).eval()
    x = _images(model)
    swin = "swin" in name
    feats = model.forward_features(x)
    assert feats.shape[-1] == model.num_features
    assert feats.shape == ((2, 1, 1, model.num_features) if swin else (2, model.patch_embed.num_patches + 1,
                                                                        model.num_features))
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    # set_grad_checkpointing: same output
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), model.forward_head(feats), rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing(False)
    # no weight decay on positions, CLS, relative position tables, sigma, norms, biases (timm's grouping)
    nwd = model.no_weight_decay()
    assert ({n for n, _ in model.named_parameters() if "relative_position_bias_table" in n} if swin
            else {"pos_embed", "cls_token"}) <= nwd
    groups = timm.optim.param_groups_weight_decay(model, 0.05, no_weight_decay_list=nwd)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for n, p in model.named_parameters():
        exempt = n.endswith(("log_sigma", "bias", "relative_position_bias_table", "pos_embed", "cls_token")) or p.ndim <= 1
        assert (id(p) in no_decay) == exempt, n
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size) and model.num_classes == 0
    if swin:  # no pooling either: the NHWC map
        model.reset_classifier(0, "")
        assert model(x).shape == (2, *model.pretrained_cfg["pool_size"], model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_and_forward_intermediates(name):
    model = _small(name).eval()
    x = _images(model, batch=1)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(inter) == len(info.channels())
    for c, r, o in zip(info.channels(), info.reduction(), inter):
        assert o.shape[:2] == (1, c)
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
    features = _small(name, features_only=True).eval()
    outs = features(x)
    fmt = getattr(features, "output_fmt", "NCHW")
    channel_axis = 3 if fmt == "NHWC" else 1
    assert [o.shape[channel_axis] for o in outs] == features.feature_info.channels()
    assert all(o.shape[0] == 1 and torch.isfinite(o).all() for o in outs)


def _fx_model(model, train=False):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_forward_exact_and_backward(name):
    """timm's own fx test: the traced graph equals the model exactly; every parameter gets a gradient."""
    model = _small(name).eval()
    x = _images(model, batch=1)
    with torch.inference_mode():
        out = model(x)
        traced = list(_fx_model(model)(x).values())[0]
    assert torch.equal(traced, out)
    model = _small(name, num_classes=42).train()
    graph = _fx_model(model, train=True)
    out = list(graph(_images(model)).values())[0]
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in graph.parameters())
    assert sum(p.numel() for p in graph.parameters()) == _param_count(model)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_dynamic_img_size_two_sizes_and_fx(name):
    model = _small(name, dynamic_img_size=True).eval()
    patch = model.patch_embed.patch_size[0]
    graph = _fx_model(model)
    for rows, cols in ((4, 4), (6, 3)):
        x = torch.randn(1, 3, rows * patch, cols * patch)
        with torch.inference_mode():
            out = model(x)
            assert torch.equal(list(graph(x).values())[0], out)
        assert out.shape == (1, 10 if "patch4" in name else 1000)
        if name.startswith("k"):
            assert model.patch_grid.value == (rows, cols)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_matches_eager(name):
    torch._dynamo.reset()
    dynamic = "swin" not in name
    model = _small(name, dynamic_img_size=dynamic)
    compiled = torch.compile(model, backend="aot_eager")
    sizes = [None, (1, 3, 48, 32) if "patch4" in name else (1, 3, 96, 64)] if dynamic else [None]
    for size in sizes:
        x = _images(model, batch=1) if size is None else torch.randn(size)
        model.eval()
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    compiled(_images(model)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- pretrained stock checkpoints
def test_stock_timm_vit_checkpoint_loads_into_kvit(tmp_path):
    torch.manual_seed(0)
    stock = timm.create_model("vit_small_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=64)
    path = tmp_path / "vit_s16.pth"
    torch.save(stock.state_dict(), path)
    kvit = timm.create_model("kvit_small_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=64,
                             pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = kvit.state_dict()
    assert set(own) - set(stock.state_dict()) == {"blocks.0.attn.log_sigma", "blocks.1.attn.log_sigma"}
    for key, value in stock.state_dict().items():
        assert torch.equal(own[key], value), key  # every shared weight bit-identical
    assert sigma_per_layer(kvit) == pytest.approx([4.5, 4.5])  # sigma left at its initial value
    # another grid and class count: positions resampled by timm's filter, the head left fresh
    kvit = timm.create_model("kvit_small_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=96, num_classes=7,
                             pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert kvit.pos_embed.shape == (1, 1 + 36, 32) and kvit.head.weight.shape == (7, 32)
    assert torch.equal(kvit.blocks[1].attn.qkv.weight, stock.blocks[1].attn.qkv.weight)
    assert kvit(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_stock_timm_swin_checkpoint_loads_into_kswin(tmp_path):
    torch.manual_seed(0)
    stock = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, num_classes=10,
                              **SMALL["swin_tiny_patch4_window4_32"])
    path = tmp_path / "swin.pth"
    torch.save(stock.state_dict(), path)
    kswin = timm.create_model("kswin_tiny_patch4_window4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL["kswin_tiny_patch4_window4_32"])
    own = kswin.state_dict()
    assert all(k.endswith("attn.log_sigma") for k in set(own) - set(stock.state_dict()))
    for key, value in stock.state_dict().items():
        assert torch.equal(own[key], value), key
    assert sigma_per_layer(kswin)[0] == pytest.approx([4.0])


def test_pretrained_file_of_another_architecture_is_refused(tmp_path):
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                             **SMALL["swin_tiny_patch4_window4_32"])
    torch.save(swin.state_dict(), tmp_path / "swin.pth")
    with pytest.raises(ValueError, match="^pretrained file: the checkpoint does not fit kvit_small_patch4_32") as info:
        timm.create_model("kvit_small_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "swin.pth")),
                          **SMALL["kvit_small_patch4_32"])
    assert "\n" not in str(info.value)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="other shapes for"):
        timm.create_model("kvit_small_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "wide.pth")),
                          **SMALL["kvit_small_patch4_32"])


def test_a_damaged_pretrained_file_is_refused_in_one_line_naming_it(tmp_path):
    """The stock file has no integrity record of ours: torch's zip records carry CRC-32s, a
    safetensors header the sizes; a damaged file never loads silently."""
    from safetensors.torch import save_file

    stock = timm.create_model("vit_small_patch4_32", **SMALL["kvit_small_patch4_32"])
    good = tmp_path / "vit.pth"
    torch.save(stock.state_dict(), good)
    data = good.read_bytes()
    mid = len(data) // 2
    zeroed, truncated, missing = tmp_path / "zeroed.pth", tmp_path / "truncated.pth", tmp_path / "missing.pth"
    zeroed.write_bytes(data[:mid] + b"\0" * 4096 + data[mid + 4096:])
    truncated.write_bytes(data[:mid])
    st = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(st))
    st_cut = tmp_path / "cut.safetensors"
    st_cut.write_bytes(st.read_bytes()[:-100])
    for path, words in ((zeroed, "fails its CRC-32 check"), (truncated, "cannot be read"), (missing, "does not exist"),
                        (st_cut, "does not match its safetensors header")):
        with pytest.raises(ValueError, match=words) as info:
            timm.create_model("kvit_small_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL["kvit_small_patch4_32"])
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    for path in (good, st):  # the intact files load
        kvit = timm.create_model("kvit_small_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **SMALL["kvit_small_patch4_32"])
        assert torch.equal(kvit.blocks[0].attn.qkv.weight, stock.blocks[0].attn.qkv.weight)


def test_the_krause_models_build_their_attention_through_the_registry():
    """No vision code names a Krause module class: the registry's entries are what the models hold."""
    from krause.nn.registry import REGISTRY, adapt_attention

    source = (Path(__file__).resolve().parents[1] / "vision_transformers" / "models.py").read_text()
    for cls in ("LocalKrauseAttention2d", "WindowKrauseAttention", "StandardAttention", "from_attention("):
        assert cls not in source, cls
    kvit = vt.create("kvit_small_patch4_32", **SMALL["kvit_small_patch4_32"])
    kswin = vt.create("kswin_tiny_patch4_window4_32", **SMALL["kswin_tiny_patch4_window4_32"])
    assert all(type(b.attn) is REGISTRY["vision_krause"].cls for b in kvit.blocks)
    assert all(type(b.attn) is REGISTRY["swin_krause"].cls for s in kswin.layers for b in s.blocks)
    with pytest.raises(ValueError, match="cannot be built from an existing module; these can: .*vision_krause"):
        adapt_attention("softmax", kvit.blocks[0].attn)
    with pytest.raises(ValueError, match="is not registered"):
        adapt_attention("kvit", kvit.blocks[0].attn)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        vt.create("kvit_small_patch4_32", sigma=float("nan"), **SMALL["kvit_small_patch4_32"])


# ----------------------------------------------------------------------------- arguments, bad input
def test_paper_aliases_and_timm_overrides():
    m = vt.create("KViT-S-16", embed_dim=32, depth=2, num_heads=2, img_size=64)
    assert isinstance(m, KrauseVisionTransformer) and m.patch_grid.value == (4, 4)
    assert get_model_input_config(m)["input_size"] == (3, 64, 64)
    m = timm.create_model("kvit_small_patch4_32", num_classes=10, img_size=28, in_chans=1, embed_dim=32, depth=2,
                          num_heads=2, sigma=1.5, top_k=3, per_head_sigma=True)
    assert m.patch_grid.value == (7, 7) and m.top_ks == [3, 6]
    assert m.blocks[0].attn.log_sigma.shape == (2,)
    assert get_model_input_config(m)["input_size"] == (1, 28, 28)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    m = vt.create("kvit-s", top_k_schedule="constant", **SMALL["kvit_small_patch4_32"])
    assert m.top_ks == [2, 2, 2]
    assert type(vt.create("vit-s", **SMALL["vit_small_patch4_32"]).blocks[0].attn) is Attention
    assert isinstance(vt.create("kvit-s", **SMALL["vit_small_patch4_32"]).blocks[0].attn, LocalKrauseAttention2d)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("kvit_small_patch4_32", dict(img_size=30), "^img_size: image height 30 is not divisible by patch_size"),
        ("swin_tiny_patch4_window4_32", dict(img_size=30), "^img_size"),
        ("kvit_small_patch4_32", dict(top_k=0), "^top_k"),
        ("kvit_small_patch4_32", dict(sigma=-1.0), "^sigma"),
        ("kvit_small_patch4_32", dict(sigma=float("nan")), "^sigma"),
        ("kswin_tiny_patch4_window4_32", dict(sigma=0.0), "^sigma"),
        ("kvit_small_patch4_32", dict(metric="euclid"), "^metric"),
        ("kvit_small_patch4_32", dict(top_k_schedule="cubic"), "^top_k_schedule"),
        ("kvit_small_patch4_32", dict(norm_placement="sandwich"), "^norm_placement"),
        ("kvit_small_patch4_32", dict(embed_dim=30, num_heads=4), "^num_heads"),
        ("kswin_tiny_patch4_window4_32", dict(embed_dim=16, num_heads=(3, 6, 12, 24)), "^num_heads"),
        ("kvit_small_patch4_32", dict(drop_path_rate=1.5), "^drop_path_rate"),
        ("kvit_small_patch4_32", dict(patch_drop_rate=0.2), "^patch_drop_rate"),
        ("kvit_small_patch4_32", dict(no_such_argument=1), "no_such_argument"),
        ("vit_small_patch4_32", dict(sigma=2.0), "^sigma is a Krause setting"),
        ("swin_tiny_patch4_window4_32", dict(top_k=2), "^top_k"),
        ("kswin_tiny_patch4_window4_32", dict(norm_placement="post"), "^norm_placement applies to ViT"),
    ],
)
def test_bad_model_arguments_raise_one_line_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        timm.create_model(name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["kvit_small_patch4_32", "vit_small_patch4_32", "kswin_tiny_patch4_window4_32"])
def test_bad_images_raise_one_line_errors(name):
    model = _small(name)
    with pytest.raises(ValueError, match="^x: images are 28x28 but the model takes 32x32"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"^x: expected \(B, 3, H, W\) images"):
        model(torch.randn(1, 1, 32, 32))
    if "swin" not in name:
        dynamic = _small(name, dynamic_img_size=True)
        with pytest.raises(ValueError, match="^x: image size 30x32 is not a multiple of the patch size 4x4"):
            dynamic(torch.randn(1, 3, 30, 32))


def test_no_pretrained_weights_without_a_file_and_unknown_names():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for kvit_small_patch4_32"):
        timm.create_model("kvit_small_patch4_32", pretrained=True)
    with pytest.raises(ValueError, match="unknown model"):
        vt.create("kvit-xl")


@pytest.mark.parametrize("name", ["kvit_small_patch4_32", "kswin_tiny_patch4_window4_32"])
def test_attn_impl_reaches_every_krause_layer(name):
    model = vt.create(name, attn_impl="reference", **SMALL[name])
    impls = [m.impl for m in vt.models.krause_layers(model)]
    assert impls and set(impls) == {"reference"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="^impl must be one of"):
        vt.create(name, attn_impl="cuda", **SMALL[name])


def test_krause_attention_refuses_a_mask():
    model = _small("kvit_small_patch4_32")
    tokens = torch.randn(1, 65, 32)
    with pytest.raises(ValueError, match="^attn_mask / is_causal"):
        model.blocks[0].attn(tokens, attn_mask=torch.zeros(65, 65))
    with pytest.raises(ValueError, match="^attn_mask / is_causal"):
        model.blocks[0].attn(tokens, is_causal=True)


def test_set_input_size_resizes_kswin_like_its_twin():
    k, b = _small("kswin_tiny_patch4_window4_32"), _small("swin_tiny_patch4_window4_32")
    b.load_state_dict({n: v for n, v in k.state_dict().items() if not n.endswith("log_sigma")})
    for model in (k, b):
        model.set_input_size(img_size=(64, 64))
    ks, bs = k.state_dict(), b.state_dict()
    assert ks["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (15 * 15, 1)  # window 4 -> 8
    for key, value in bs.items():
        assert torch.equal(ks[key], value), key
    assert [blk.attn.window_size for st in k.layers for blk in st.blocks] == \
        [tuple(blk.attn.window_size) for st in b.layers for blk in st.blocks]
    assert k(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_deepcopy_gives_the_copy_its_own_patch_grid():
    """EMA copies (timm's ModelEma deep-copies the model) must read their own input's grid."""
    import copy

    model = _small("kvit_small_patch4_32", dynamic_img_size=True).eval()
    ema = copy.deepcopy(model)
    assert ema.patch_grid is not model.patch_grid
    assert all(blk.attn.patch_grid is ema.patch_grid for blk in ema.blocks)
    x = torch.randn(1, 3, 48, 32)
    assert torch.equal(ema(x), model(x)) and ema.patch_grid.value == (12, 8)
    model(torch.randn(1, 3, 32, 32))
    assert ema.patch_grid.value == (12, 8) and model.patch_grid.value == (8, 8)


def test_bias_table_resize_without_timm(monkeypatch):
    """krause needs only torch: without timm the window attention resizes its table bicubically."""
    import sys

    from krause.nn.swin import _resize_bias_table

    table = torch.randn(7 * 7, 3)
    with_timm = _resize_bias_table(table, (4, 4), (6, 6))
    monkeypatch.setitem(sys.modules, "timm.layers", None)  # the import inside now fails
    torch.testing.assert_close(_resize_bias_table(table, (4, 4), (4, 4)), table)
    resized = _resize_bias_table(table, (4, 4), (6, 6))
    assert resized.shape == with_timm.shape == (11 * 11, 3)
    torch.testing.assert_close(resized[5 * 11 + 5], table[3 * 7 + 3], rtol=0.1, atol=0.05)  # the centre offset (0, 0)


@pytest.mark.parametrize("name", ["vit_small_patch4_32", "swin_tiny_patch4_window4_32"])
def test_baselines_stay_scriptable_like_stock_timm(name):
    """timm's TorchScript test builds under set_scriptable(True): the baselines script as timm's own do
    (the Krause models do not: their attention runs Python the compiler cannot type)."""
    with timm.set_scriptable(True):
        model = _small(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))
