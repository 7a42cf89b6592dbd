"""ViT / KViT and Swin / KSwin: timm's own models, with Krause attention in the Krause ones.

Every baseline is timm's stock ``VisionTransformer`` or ``SwinTransformer``. Its Krause
twin is the same timm class built from the same arguments, with the attention module of
every block replaced by the core's Krause module around that block's own projections
built by its registered name (``krause.nn.registry.adapt_attention`` with ``"vision_krause"``
or ``"swin_krause"``; no module class is named here): same blocks, norms, initialisation, drop-path schedule and parameter names, plus one
``log_sigma`` per layer (KViT) or per head (KSwin). A pair built from one seed holds
identical values in every shared parameter, and the parameter counts differ by exactly the
sigmas (``tests/test_vision_models.py`` checks both).

Registered names (``timm.create_model(name, ...)``; import ``vision_transformers`` first):

==================================  ================================  ===============================
Krause model                        baseline twin                     paper name, setting
==================================  ================================  ===============================
``kvit_small_patch4_32``            ``vit_small_patch4_32``           KViT-S / ViT-S, CIFAR 32/4
``kswin_tiny_patch4_window4_32``    ``swin_tiny_patch4_window4_32``   KSwin-T / Swin-T, CIFAR
``kvit_small_patch16_224``          ``vit_small_patch16_224_twin``    KViT-S-16 / ViT-S-16, ImageNet
``kvit_base_patch16_224``           ``vit_base_patch16_224_twin``     KViT-B-16 / ViT-B-16, ImageNet
==================================  ================================  ===============================

The ImageNet baselines carry a ``_twin`` suffix because timm already owns
``vit_small_patch16_224`` (with timm's defaults, e.g. no drop-path); ours use this
family's recipe values. Paper-style aliases (``"kvit-s"``, ``"vit-s-16"``,
``"kswin-t"``, ...) are accepted by ``create`` and by the training entry point.

The 2-D neighbourhood of KViT follows the patch grid of each input: ``KrauseVisionTransformer``
writes the grid into the ``PatchGrid`` its layers share right after patch embedding, so
``dynamic_img_size=True`` and ``set_input_size`` move the neighbourhood with the image.

Pretrained weights: a stock timm ViT / Swin checkpoint loads into the Krause model of the
same shape, sigma left at its initial value, e.g.
``timm.create_model("kvit_small_patch16_224", pretrained=True,
pretrained_cfg_overlay=dict(file="vit_s16.pth"))`` (positions and patch embedding are
resampled by timm's own filters when the grid differs).

Norm placement. ``norm_placement="pre"`` (default) is timm's pre-norm block
``x + attn(norm(x))``. ``"post"`` is the block of the paper's KViT release,
``norm(x + attn(x))``, given to timm through its ``block_fn`` argument (timm's own
``ResPostBlock`` normalises the branch, ``x + norm(attn(x))``, a different block); the
final norm is then off, since every block already ends in one. It applies to both twins.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import timm
import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, is_scriptable
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_checkpoint_filter
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter
from torch import nn

from krause.nn.config import KrauseConfig, check_sigma
from krause.nn.registry import adapt_attention, attention_class
from krause.nn.vision import PatchGrid, topk_schedule

__all__ = [
    "VisionTransformer",
    "SwinTransformer",
    "KrauseVisionTransformer",
    "PostNormBlock",
    "MODEL_DEFAULTS",
    "TWINS",
    "ALIASES",
    "resolve_model_name",
    "create",
    "is_krause",
    "krause_layers",
    "sigma_per_layer",
    "check_pretrained_file",
]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

NORM_PLACEMENTS = ("pre", "post")
TOPK_SCHEDULES = ("linear", "constant")
KVIT_KNOBS = ("sigma", "top_k", "top_k_schedule", "radius", "metric", "per_head_sigma", "attn_impl")
KSWIN_KNOBS = ("sigma", "per_head_sigma", "attn_impl")


# =========================================================================== ViT / KViT
class PostNormBlock(Block):
    """timm's ViT ``Block`` with the norms after the residual sums, ``norm(x + f(x))``
    (the paper's KViT release block); same modules, names and initialisation as ``Block``."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))))
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))


class KrauseVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose blocks attend with the registered ``vision_krause`` module.

    Built as the stock model from ``**kwargs`` (so its twin is ``VisionTransformer(**kwargs)``),
    then every block's ``Attention`` is replaced by the Krause module around its projections.
    The only other difference is ``_pos_embed``, which first records the patch grid of the
    input in ``patch_grid`` (shared by all layers): the neighbourhood follows the input.

    Krause arguments:
        sigma: initial sigma of every layer (> 0), stored as ``log_sigma``.
        top_k: base k; layer l keeps ``topk_schedule(top_k, depth)[l]`` keys (k .. 2k,
            linear) or ``top_k`` everywhere with ``top_k_schedule="constant"``.
        radius, metric: the 2-D neighbourhood (manhattan r=1: 4-neighbours; chebyshev
            r=2: 5x5 block), plus the token itself and the prefix (CLS) tokens.
        per_head_sigma: one sigma per head instead of one per layer.
        attn_impl: implementation of the Krause op (``krause.dispatch.IMPLS``).
    """

    def __init__(self, *, sigma: float = 2.5, top_k: int = 2, top_k_schedule: str = "linear", radius: int = 1,
                 metric: str = "manhattan", per_head_sigma: bool = False, attn_impl: str = "auto", **kwargs):
        _check_choice("top_k_schedule", top_k_schedule, TOPK_SCHEDULES)
        config = KrauseConfig(top_k=top_k, sigma=check_sigma(sigma), radius=radius, metric=metric, per_head_sigma=per_head_sigma,
                              impl=attn_impl)
        if kwargs.get("patch_drop_rate", 0.0) > 0:
            raise ValueError("patch_drop_rate: Krause attention needs the whole patch grid; use 0")
        super().__init__(**kwargs)
        self.patch_grid = PatchGrid(tuple(self.patch_embed.grid_size))
        depth = len(self.blocks)
        self.top_ks = topk_schedule(top_k, depth) if top_k_schedule == "linear" else [top_k] * depth
        for blk, k in zip(self.blocks, self.top_ks):
            blk.attn = adapt_attention("vision_krause", blk.attn, self.patch_grid, krause=config.replace(top_k=k),
                                       num_prefix_tokens=self.num_prefix_tokens)
        self.krause_config = config

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x is (B, rows, cols, C) with dynamic_img_size, else the fixed grid's flattened tokens
        self.patch_grid.value = (x.shape[1], x.shape[2]) if self.dynamic_img_size else self.patch_embed.grid_size
        return super()._pos_embed(x)


# =========================================================================== Swin / KSwin
def krause_swin(*, sigma: float = 4.0, per_head_sigma: bool = True, attn_impl: str = "auto",
                **kwargs) -> SwinTransformer:
    """timm's ``SwinTransformer(**kwargs)`` with every block's window attention replaced by
    registered ``swin_krause`` module around its parameters (sigma per head by default)."""
    config = attention_class("swin_krause").preset.replace(sigma=check_sigma(sigma), per_head_sigma=per_head_sigma,
                                                           impl=attn_impl)
    model = SwinTransformer(**kwargs)
    for stage in model.layers:
        for blk in stage.blocks:
            blk.attn = adapt_attention("swin_krause", blk.attn, krause=config)
    return model


# =========================================================================== checks
def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    return tuple(value)


def _check_arguments(cfg: dict, swin: bool) -> None:
    """One-line ValueErrors for what timm would only assert on (or accept silently)."""
    img, patch = _pair("img_size", cfg["img_size"]), _pair("patch_size", cfg["patch_size"])
    if not cfg.get("dynamic_img_pad", False):
        for side, i, p in zip(("height", "width"), img, patch):
            if i % p:
                raise ValueError(f"img_size: image {side} {i} is not divisible by patch_size {p}")
    for name, value in cfg.items():
        if name.endswith("_rate") and "drop" in name and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    heads = cfg["num_heads"] if swin else (cfg["num_heads"],)
    dims = [cfg["embed_dim"] * 2 ** i for i in range(len(heads))] if swin else [cfg["embed_dim"]]
    if swin and len(cfg["depths"]) != len(heads):
        raise ValueError(f"depths and num_heads must have one entry per stage, got {cfg['depths']} and {heads}")
    for dim, h in zip(dims, heads):
        if not (isinstance(h, int) and h >= 1) or dim % h:
            raise ValueError(f"num_heads: width {dim} is not divisible by {h} heads")


def checked_images(x: torch.Tensor, in_chans: int, img_size, patch_size, strict: bool, pad: bool) -> torch.Tensor:
    """x unchanged, after checking that the model can take these images (an fx leaf: traced
    models keep the check as one call)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"x: expected (B, {in_chans}, H, W) images, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if strict and (h, w) != tuple(img_size):
        raise ValueError(f"x: images are {h}x{w} but the model takes {img_size[0]}x{img_size[1]}; build it with "
                         f"dynamic_img_size=True or call set_input_size for other sizes")
    if not pad and (h % patch_size[0] or w % patch_size[1]):
        raise ValueError(f"x: image size {h}x{w} is not a multiple of the patch size {patch_size[0]}x{patch_size[1]}")
    return x


torch.fx.wrap("checked_images")


def _image_check(patch_embed: nn.Module, args):
    """Forward pre-hook on patch_embed: images of a size the model cannot take fail here with
    a one-line error instead of timm's assertion."""
    return (checked_images(args[0], patch_embed.proj.in_channels, tuple(patch_embed.img_size),
                           tuple(patch_embed.patch_size), patch_embed.strict_img_size, patch_embed.dynamic_img_pad),
            *args[1:])


# =========================================================================== pretrained weights
def _fit_checkpoint(state_dict: dict, model: nn.Module) -> dict:
    """The checkpoint with the model's initial sigmas added, after checking that every other
    tensor of the model is there with its shape (the classifier and the first conv may
    differ: timm's loader adapts those)."""
    own = model.state_dict()
    adaptable = {"head.weight", "head.bias", "head.fc.weight", "head.fc.bias", "patch_embed.proj.weight"}
    missing = [k for k in own if k not in state_dict and not k.endswith("log_sigma") and k not in adaptable]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and k not in adaptable and tuple(state_dict[k].shape) != tuple(v.shape)]
    extra = [k for k in state_dict if k not in own]
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    for problem, keys in (("lacks", missing), ("has other shapes for", wrong), ("has tensors not in the model:", extra)):
        if keys:
            raise ValueError(f"pretrained file: the checkpoint does not fit {name}: it {problem} "
                             f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    out = dict(state_dict)
    for key, value in own.items():
        if key.endswith("log_sigma") and key not in out:
            out[key] = value.detach().clone()  # sigma starts at the model's initial value
    return out


def check_pretrained_file(path) -> Path:
    """``path`` if it is an intact weights file; otherwise one line naming it. torch's zip
    format is checked against the CRC-32 of every record, a safetensors file against the sizes
    its header declares (a stock file has no other integrity record)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"pretrained file {p} does not exist")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"pretrained file {p} is damaged ({e})") from None
        if bad is not None:
            raise ValueError(f"pretrained file {p} is damaged: its record {bad} fails its CRC-32 check")
    elif p.suffix == ".safetensors":
        with p.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n < p.stat().st_size else None
            except ValueError:
                header = None
        ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
        if header is None or 8 + n + max(ends, default=0) != p.stat().st_size:
            raise ValueError(f"pretrained file {p} is damaged (its size does not match its safetensors header)")
    return p


def _vit_filter(state_dict: dict, model: nn.Module) -> dict:
    return _fit_checkpoint(_vit_checkpoint_filter(state_dict, model), model)


def _swin_filter(state_dict: dict, model: nn.Module) -> dict:
    return _fit_checkpoint(_swin_checkpoint_filter(state_dict, model), model)


# =========================================================================== registry
_VIT_S = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
_VIT_B = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_CIFAR = dict(img_size=32, patch_size=4, num_classes=10, drop_path_rate=0.1)
_IMNET = dict(img_size=224, patch_size=16, num_classes=1000, drop_path_rate=0.1)
_KVIT_CIFAR = dict(sigma=2.5, top_k=2, radius=1, metric="manhattan")
_KVIT_IMNET = dict(top_k=8, radius=2, metric="chebyshev")
_SWIN_T = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
               window_size=4, mlp_ratio=4.0, drop_path_rate=0.1)

#: name -> default constructor arguments (Krause settings included)
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit_small_patch4_32": {**_VIT_S, **_CIFAR},
    "kvit_small_patch4_32": {**_VIT_S, **_CIFAR, **_KVIT_CIFAR},
    "swin_tiny_patch4_window4_32": dict(_SWIN_T),
    "kswin_tiny_patch4_window4_32": {**_SWIN_T, "sigma": 4.0},
    "vit_small_patch16_224_twin": {**_VIT_S, **_IMNET},
    "kvit_small_patch16_224": {**_VIT_S, **_IMNET, **_KVIT_IMNET, "sigma": 4.5},
    "vit_base_patch16_224_twin": {**_VIT_B, **_IMNET},
    # The paper gives sigma 8.0 for KViT-B-16; its release script used 9.0 (pass sigma=9.0 for that).
    "kvit_base_patch16_224": {**_VIT_B, **_IMNET, **_KVIT_IMNET, "sigma": 8.0},
}

#: Krause model -> its baseline twin
TWINS = {
    "kvit_small_patch4_32": "vit_small_patch4_32",
    "kswin_tiny_patch4_window4_32": "swin_tiny_patch4_window4_32",
    "kvit_small_patch16_224": "vit_small_patch16_224_twin",
    "kvit_base_patch16_224": "vit_base_patch16_224_twin",
}

#: paper-style short names
ALIASES = {
    "vit-s": "vit_small_patch4_32",
    "kvit-s": "kvit_small_patch4_32",
    "swin-t": "swin_tiny_patch4_window4_32",
    "kswin-t": "kswin_tiny_patch4_window4_32",
    "vit-s-16": "vit_small_patch16_224_twin",
    "kvit-s-16": "kvit_small_patch16_224",
    "vit-b-16": "vit_base_patch16_224_twin",
    "kvit-b-16": "kvit_base_patch16_224",
}


def _cfg(name: str) -> dict:
    d = MODEL_DEFAULTS[name]
    cifar, swin = d["img_size"] == 32, "swin" in name
    grid = d["img_size"] // d["patch_size"]
    return dict(
        url="", num_classes=d["num_classes"], input_size=(3, d["img_size"], d["img_size"]),
        pool_size=(grid // 2 ** (len(d["depths"]) - 1),) * 2 if swin else None,
        crop_pct=1.0 if cifar else 0.875, interpolation="bicubic", fixed_input_size=swin,
        mean=CIFAR10_MEAN if cifar else IMAGENET_MEAN, std=CIFAR10_STD if cifar else IMAGENET_STD,
        first_conv="patch_embed.proj", classifier="head.fc" if swin else "head", license="apache-2.0",
    )


# timm's register_model reads this module-level table: each name gets its pretrained_cfg
default_cfgs = generate_default_cfgs({name: _cfg(name) for name in MODEL_DEFAULTS})


def resolve_model_name(name: str) -> str:
    """A registered name from a registered name or a paper alias (case-insensitive alias)."""
    if name in MODEL_DEFAULTS:
        return name
    alias = ALIASES.get(str(name).lower())
    if alias is None:
        known = ", ".join(list(MODEL_DEFAULTS) + list(ALIASES))
        raise ValueError(f"model: unknown model {name!r}; choose one of {known}")
    return alias


def _build(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    swin, krause = "swin" in name, name in TWINS
    cfg = {**MODEL_DEFAULTS[name], **kwargs}
    knobs = KSWIN_KNOBS if swin else KVIT_KNOBS
    if not krause:
        given = [k for k in knobs if k in kwargs]
        if given:
            raise ValueError(f"{given[0]} is a Krause setting; {name} is a softmax baseline")
    if swin:
        for key in ("norm_placement",) + tuple(k for k in KVIT_KNOBS if k not in KSWIN_KNOBS):
            if key in cfg:
                raise ValueError(f"{key} applies to ViT/KViT models, not {name}")
    else:
        placement = _check_choice("norm_placement", cfg.pop("norm_placement", "pre"), NORM_PLACEMENTS)
        if placement == "post":
            cfg.update(block_fn=PostNormBlock, final_norm=False)
    _check_arguments(cfg, swin)
    weights_file = (cfg.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    if weights_file:
        check_pretrained_file(weights_file)
    if swin:
        model_cls = krause_swin if krause else SwinTransformer
        feature_cfg = dict(flatten_sequential=True, out_indices=cfg.pop("out_indices", tuple(range(len(cfg["depths"])))))
        filter_fn = _swin_filter
    else:
        model_cls = KrauseVisionTransformer if krause else VisionTransformer
        feature_cfg = dict(out_indices=cfg.pop("out_indices", 3), feature_cls="getter")
        filter_fn = _vit_filter
    try:
        model = build_model_with_cfg(model_cls, name, pretrained, pretrained_filter_fn=filter_fn,
                                     feature_cfg=feature_cfg, **cfg)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if not weights_file:
            raise
        text = " ".join(str(e).split())[:200]
        raise ValueError(f"pretrained file {weights_file} cannot be read ({type(e).__name__}: {text})") from None
    # the model's (or its feature wrapper's) patch embedding checks the images it is given; not
    # for TorchScript (timm's set_scriptable), which cannot compile the hook: timm's asserts apply there
    if not is_scriptable():
        next(m for m in model.modules() if isinstance(m, PatchEmbed)).register_forward_pre_hook(_image_check)
    return model


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model (or paper alias) with overrides, e.g. ``create("kvit-s", embed_dim=64)``."""
    return timm.create_model(resolve_model_name(name), **kwargs)


def krause_layers(model: nn.Module) -> list[nn.Module]:
    """The Krause attention modules of a model, in order."""
    krause = (attention_class("vision_krause"), attention_class("swin_krause"))
    return [m for m in model.modules() if isinstance(m, krause)]


def is_krause(model: nn.Module) -> bool:
    return bool(krause_layers(model))


def sigma_per_layer(model: nn.Module) -> list:
    """sigma of every Krause attention layer in order: a float (per-layer sigma) or a list (per head)."""
    out = []
    for m in krause_layers(model):
        s = m.log_sigma.detach().float().exp().cpu()
        out.append(s.item() if s.dim() == 0 else s.tolist())
    return out


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S for CIFAR-10 (32x32 images, 4x4 patches, 65 tokens): the baseline twin of KViT-S."""
    return _build("vit_small_patch4_32", pretrained, **kwargs)


@register_model
def kvit_small_patch4_32(pretrained: bool = False, **kwargs) -> KrauseVisionTransformer:
    """KViT-S for CIFAR-10: manhattan r=1 neighbourhood, sigma 2.5, top-k 2..4 over the layers."""
    return _build("kvit_small_patch4_32", pretrained, **kwargs)


@register_model
def swin_tiny_patch4_window4_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T for CIFAR-10 (window 4, maps 8-4-2-1): the baseline twin of KSwin-T."""
    return _build("swin_tiny_patch4_window4_32", pretrained, **kwargs)


@register_model
def kswin_tiny_patch4_window4_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """KSwin-T for CIFAR-10: RBF window logits with a learnable sigma per head (init 4.0)."""
    return _build("kswin_tiny_patch4_window4_32", pretrained, **kwargs)


@register_model
def vit_small_patch16_224_twin(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S-16 for ImageNet-1K (197 tokens): the baseline twin of KViT-S-16."""
    return _build("vit_small_patch16_224_twin", pretrained, **kwargs)


@register_model
def kvit_small_patch16_224(pretrained: bool = False, **kwargs) -> KrauseVisionTransformer:
    """KViT-S-16 for ImageNet-1K: chebyshev r=2 (5x5) neighbourhood, sigma 4.5, top-k 8..16."""
    return _build("kvit_small_patch16_224", pretrained, **kwargs)


@register_model
def vit_base_patch16_224_twin(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B-16 for ImageNet-1K: the baseline twin of KViT-B-16."""
    return _build("vit_base_patch16_224_twin", pretrained, **kwargs)


@register_model
def kvit_base_patch16_224(pretrained: bool = False, **kwargs) -> KrauseVisionTransformer:
    """KViT-B-16 for ImageNet-1K: chebyshev r=2, sigma 8.0 (the release script used 9.0), top-k 8..16."""
    return _build("kvit_base_patch16_224", pretrained, **kwargs)
