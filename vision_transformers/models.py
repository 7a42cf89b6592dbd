"""ViT / KViT and Swin / KSwin, registered with timm's model registry.

Every Krause model has a baseline twin built by the *same* code: same block, same norm
placement, same initialisation, same drop-path schedule; only the attention module
differs (``krause.nn.StandardAttention`` vs ``krause.nn.LocalKrauseAttention2d`` for ViT,
``krause.nn.WindowAttention`` vs ``krause.nn.WindowKrauseAttention`` for Swin). The
Krause modules add exactly one parameter, ``log_sigma``, and draw no random numbers at
construction, so a twin pair built from one seed holds identical values in every shared
parameter (``tests/test_vision_models.py`` checks both).

Registered names (``timm.create_model(name, num_classes=...)``):

==========================================  ====================  =============================
Krause model                                baseline twin         paper name, setting
==========================================  ====================  =============================
``kvit_small_patch4_32``                    ``vit_small_patch4_32``       KViT-S / ViT-S, CIFAR 32/4
``kswin_tiny_patch4_window4_32``            ``swin_tiny_patch4_window4_32``  KSwin-T / Swin-T, CIFAR
``kvit_small_patch16_224``                  ``vit_small_patch16_224_twin``   KViT-S-16 / ViT-S-16, ImageNet
``kvit_base_patch16_224``                   ``vit_base_patch16_224_twin``    KViT-B-16 / ViT-B-16, ImageNet
==========================================  ====================  =============================

The ImageNet baselines carry a ``_twin`` suffix because timm already owns
``vit_small_patch16_224``; ours is the same architecture built by this module so that it
differs from its Krause twin in attention only. Short paper-style aliases
(``"kvit-s"``, ``"vit-s-16"``, ``"kswin-t"``, ...) are accepted by ``create`` and by the
training entry point.

Norm placement. ``norm_placement="pre"`` (default) is the standard pre-norm ViT block
``x + attn(norm(x))``. ``"post"`` is the block of the paper's KViT release,
``norm(x + attn(x))`` (and the final norm is then an identity, since every block already
ends in one). The first release used post-norm for KViT and pre-norm for ViT, so its
comparison confounded norm placement with attention; here the option applies to both
twins alike.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model
from torch import nn

from krause.dispatch import IMPLS
from krause.nn import (
    KrauseConfig,
    LocalKrauseAttention2d,
    WindowKrauseAttention,
    build_attention,
    shifted_window_mask,
    topk_schedule,
    window_partition,
    window_reverse,
)

__all__ = [
    "VisionTransformer",
    "SwinTransformer",
    "MODEL_DEFAULTS",
    "TWINS",
    "ALIASES",
    "resolve_model_name",
    "create",
    "is_krause",
    "sigma_per_layer",
]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

ATTENTIONS = ("standard", "krause")
NORM_PLACEMENTS = ("pre", "post")
TOPK_SCHEDULES = ("linear", "constant")


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_sigma(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {value!r}")
    return float(value)


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return tuple(_check_int(name, v) for v in value)


def _linear_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates growing linearly from 0 (first block) to ``rate`` (last)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _init_linear_and_norm(module: nn.Module) -> None:
    """timm's ViT/Swin init: truncated-normal(0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# =========================================================================== ViT / KViT
_vit_norm = partial(nn.LayerNorm, eps=1e-6)  # timm's ViT norm


class Block(nn.Module):
    """Transformer block around a given attention module; pre- or post-norm."""

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_placement: str = "pre",
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm_placement = _check_choice("norm_placement", norm_placement, NORM_PLACEMENTS)
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the attention module reads from the block input x."""
        return self.norm1(x) if self.norm_placement == "pre" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_placement == "pre":
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop_path1(self.attn(x)))
        return self.norm2(x + self.drop_path2(self.mlp(x)))


class VisionTransformer(nn.Module):
    """ViT with a CLS token and learned absolute positions; ``attention`` picks the twin.

    Krause-only arguments (ignored by ``attention="standard"``):
        sigma: initial sigma of every layer (> 0), stored as ``log_sigma``.
        top_k: base k; layer l keeps ``topk_schedule(top_k, depth)[l]`` keys
            (k .. 2k, linear) or ``top_k`` everywhere with ``top_k_schedule="constant"``.
        radius, metric: the 2-D neighbourhood (manhattan r=1: 4-neighbours; chebyshev
            r=2: 5x5 block), plus the token itself and the CLS token.
        per_head_sigma: one sigma per head instead of one per layer.
        attn_impl: implementation of the Krause op (``krause.dispatch.IMPLS``).
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size=32,
        patch_size=4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        attention: str = "standard",
        norm_placement: str = "pre",
        sigma: float = 2.5,
        top_k: int = 2,
        top_k_schedule: str = "linear",
        radius: int = 1,
        metric: str = "manhattan",
        per_head_sigma: bool = False,
        global_pool: str = "token",
        attn_impl: str = "auto",
    ):
        super().__init__()
        img_size, patch_size = _pair("img_size", img_size), _pair("patch_size", patch_size)
        for side, (i, p) in zip(("height", "width"), zip(img_size, patch_size)):
            if i % p:
                raise ValueError(f"img_size: image {side} {i} is not divisible by patch_size {p}")
        _check_int("in_chans", in_chans)
        _check_int("num_classes", num_classes, 0)
        _check_int("embed_dim", embed_dim)
        _check_int("depth", depth)
        _check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        for name, p in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            _check_prob(name, p)
        self.attention = _check_choice("attention", attention, ATTENTIONS)
        self.norm_placement = _check_choice("norm_placement", norm_placement, NORM_PLACEMENTS)
        self.global_pool = _check_choice("global_pool", global_pool, ("token", "avg"))
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])

        _check_choice("attn_impl", attn_impl, IMPLS)
        krause = None
        if self.attention == "krause":
            krause = KrauseConfig(top_k=top_k, sigma=sigma, radius=radius, metric=metric,
                                  per_head_sigma=per_head_sigma, impl=attn_impl)
            _check_choice("top_k_schedule", top_k_schedule, TOPK_SCHEDULES)
            self.top_ks = topk_schedule(top_k, depth) if top_k_schedule == "linear" else [top_k] * depth
        else:
            self.top_ks = None
        self.krause_config = dict(sigma=sigma, top_k=top_k, top_k_schedule=top_k_schedule, radius=radius,
                                  metric=metric, per_head_sigma=per_head_sigma, attn_impl=attn_impl)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = _linear_rates(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            attn = build_attention(
                "vision", embed_dim, num_heads, krause=krause.replace(top_k=self.top_ks[i]) if krause else None,
                grid=self.grid, num_prefix_tokens=self.num_prefix_tokens, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                proj_drop=drop_rate,
            )
            blocks.append(Block(embed_dim, attn, mlp_ratio, drop_rate, dpr[i], norm_placement, _vit_norm))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _vit_norm(embed_dim) if norm_placement == "pre" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input must be (B, C, {self.img_size[0]}, {self.img_size[1]}) images, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every layer, a list of (B, H, N, N) fp32 tensors (rows sum to 1)."""
        x = self._embed(x)
        maps = []
        for blk in self.blocks:
            maps.append(blk.attn.attention_weights(blk.attention_input(x)).float())
            x = blk(x)
        return maps

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# =========================================================================== Swin / KSwin
class SwinBlock(nn.Module):
    """Swin block on (B, H, W, C) maps. A map no larger than the window shrinks the window
    to the map and drops the shift (as the Swin baseline does), for both twins alike."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 4,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attention: str = "standard",
        sigma: float = 4.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            window_size, shift_size = min(self.input_resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        h, w = self.input_resolution
        if h % window_size or w % window_size:
            raise ValueError(f"window_size {window_size} does not tile the {h}x{w} feature map")
        self.norm1 = nn.LayerNorm(dim)
        krause = KrauseConfig(sigma=sigma, impl=attn_impl) if attention == "krause" else None
        self.attn = build_attention("window", dim, window_size, num_heads, krause=krause, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        mask = shifted_window_mask(h, w, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift_size
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, ws).reshape(-1, ws * ws, c)
        out = self.attn(windows, self.attn_mask)
        x = window_reverse(out.reshape(-1, ws, ws, c), ws, h, w)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised and projected to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin transformer; ``attention="krause"`` gives KSwin (RBF window logits, sigma per head)."""

    def __init__(
        self,
        img_size=32,
        patch_size=4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        attention: str = "standard",
        sigma: float = 4.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        img_size, patch_size = _pair("img_size", img_size), _pair("patch_size", patch_size)
        for side, (i, p) in zip(("height", "width"), zip(img_size, patch_size)):
            if i % p:
                raise ValueError(f"img_size: image {side} {i} is not divisible by patch_size {p}")
        _check_choice("attn_impl", attn_impl, IMPLS)
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads must have one entry per stage, got {depths} and {num_heads}")
        _check_int("window_size", window_size)
        _check_int("num_classes", num_classes, 0)
        for name, p in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            _check_prob(name, p)
        self.attention = _check_choice("attention", attention, ATTENTIONS)
        if self.attention == "krause":
            _check_sigma(sigma)
        self.img_size, self.patch_size = img_size, patch_size
        self.num_classes = num_classes
        res = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        for i in range(1, len(depths)):
            if res[0] % 2 ** i or res[1] % 2 ** i:
                raise ValueError(
                    f"img_size: the {res[0]}x{res[1]} patch grid cannot be halved {len(depths) - 1} times for "
                    f"{len(depths)} stages"
                )

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC")
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = _linear_rates(drop_path_rate, sum(depths))
        stages, dim, at = [], embed_dim, 0
        self.feature_maps = []
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            layers: list[nn.Module] = []
            if s > 0:
                layers.append(PatchMerging(dim))
                dim, res = dim * 2, [res[0] // 2, res[1] // 2]
            if dim % heads:
                raise ValueError(f"num_heads: stage {s} width {dim} is not divisible by {heads} heads")
            for j in range(depth):
                layers.append(SwinBlock(
                    dim, tuple(res), heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                    drop_rate, attn_drop_rate, dpr[at + j], attention, sigma, attn_impl,
                ))
            at += depth
            self.feature_maps.append(tuple(res))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.embed_dim = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input must be (B, C, {self.img_size[0]}, {self.img_size[1]}) images, got {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        return self.norm(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# =========================================================================== registry
_VIT_S = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
_VIT_B = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_CIFAR = dict(img_size=32, patch_size=4, num_classes=10, drop_path_rate=0.1)
_IMNET = dict(img_size=224, patch_size=16, num_classes=1000, drop_path_rate=0.1)
_KVIT_CIFAR = dict(attention="krause", sigma=2.5, top_k=2, radius=1, metric="manhattan")
_KVIT_IMNET = dict(attention="krause", top_k=8, radius=2, metric="chebyshev")
_SWIN_T = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
               window_size=4, mlp_ratio=4.0, drop_path_rate=0.1)

#: name -> (model class, default constructor arguments, data statistics)
MODEL_DEFAULTS: dict[str, tuple[type, dict[str, Any], tuple]] = {
    "vit_small_patch4_32": (VisionTransformer, {**_VIT_S, **_CIFAR}, (CIFAR10_MEAN, CIFAR10_STD)),
    "kvit_small_patch4_32": (VisionTransformer, {**_VIT_S, **_CIFAR, **_KVIT_CIFAR}, (CIFAR10_MEAN, CIFAR10_STD)),
    "swin_tiny_patch4_window4_32": (SwinTransformer, dict(_SWIN_T), (CIFAR10_MEAN, CIFAR10_STD)),
    "kswin_tiny_patch4_window4_32": (SwinTransformer, {**_SWIN_T, "attention": "krause", "sigma": 4.0},
                                     (CIFAR10_MEAN, CIFAR10_STD)),
    "vit_small_patch16_224_twin": (VisionTransformer, {**_VIT_S, **_IMNET}, (IMAGENET_MEAN, IMAGENET_STD)),
    "kvit_small_patch16_224": (VisionTransformer, {**_VIT_S, **_IMNET, **_KVIT_IMNET, "sigma": 4.5},
                               (IMAGENET_MEAN, IMAGENET_STD)),
    "vit_base_patch16_224_twin": (VisionTransformer, {**_VIT_B, **_IMNET}, (IMAGENET_MEAN, IMAGENET_STD)),
    # The paper gives sigma 8.0 for KViT-B-16; its release script used 9.0 (pass sigma=9.0 for that).
    "kvit_base_patch16_224": (VisionTransformer, {**_VIT_B, **_IMNET, **_KVIT_IMNET, "sigma": 8.0},
                              (IMAGENET_MEAN, IMAGENET_STD)),
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
    # timm's create_model passes its pretrained-config plumbing; these models have no weights to load.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are published for this model; use pretrained=False")
    cls, defaults, (mean, std) = MODEL_DEFAULTS[name]
    cfg = {**defaults, **kwargs}
    try:
        model = cls(**cfg)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}") from None
    img = _pair("img_size", cfg.get("img_size", 224))
    in_chans = cfg.get("in_chans", 3)
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=name, input_size=(in_chans, *img), mean=mean, std=std,
        num_classes=model.num_classes, interpolation="bicubic", crop_pct=0.875 if img[0] >= 160 else 1.0,
        first_conv="patch_embed.proj", classifier="head",
    )
    model.model_name = name
    return model


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model (or paper alias) with overrides, e.g. ``create("kvit-s", embed_dim=64)``."""
    return _build(resolve_model_name(name), **kwargs)


def is_krause(model: nn.Module) -> bool:
    return getattr(model, "attention", None) == "krause"


def sigma_per_layer(model: nn.Module) -> list:
    """sigma of every Krause attention layer in order: a float (per-layer sigma) or a list (per head)."""
    out = []
    for m in model.modules():
        if isinstance(m, (LocalKrauseAttention2d, WindowKrauseAttention)):
            s = m.log_sigma.detach().float().exp().cpu()
            out.append(s.item() if s.dim() == 0 else s.tolist())
    return out


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S for CIFAR-10 (32x32 images, 4x4 patches, 65 tokens): the baseline twin of KViT-S."""
    return _build("vit_small_patch4_32", pretrained, **kwargs)


@register_model
def kvit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
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
def kvit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """KViT-S-16 for ImageNet-1K: chebyshev r=2 (5x5) neighbourhood, sigma 4.5, top-k 8..16."""
    return _build("kvit_small_patch16_224", pretrained, **kwargs)


@register_model
def vit_base_patch16_224_twin(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B-16 for ImageNet-1K: the baseline twin of KViT-B-16."""
    return _build("vit_base_patch16_224_twin", pretrained, **kwargs)


@register_model
def kvit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """KViT-B-16 for ImageNet-1K: chebyshev r=2, sigma 8.0 (the release script used 9.0), top-k 8..16."""
    return _build("kvit_base_patch16_224", pretrained, **kwargs)
