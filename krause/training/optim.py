"""AdamW with the usual weight-decay exemptions.

No weight decay on: every parameter with at most one dimension (biases, LayerNorm /
RMSNorm weights, per-head or per-layer log_sigma, gate biases), and any parameter
whose name contains one of `NO_DECAY_KEYWORDS` (position embeddings, class /
distillation tokens, Swin's relative position bias table, and `log_sigma` in any
shape), plus whatever the model lists in a timm-style `no_weight_decay()` method.
The first public release decayed log_sigma, pulling sigma towards 1; that was a defect.
Frozen parameters (requires_grad=False, e.g. a LoRA base model) are left out.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from .distributed import unwrap_model

__all__ = ["NO_DECAY_KEYWORDS", "param_groups", "build_adamw"]

NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "log_sigma",
    "pos_embed",
    "pos_emb",
    "position_embedding",
    "absolute_pos_embed",
    "cls_token",
    "dist_token",
    "relative_position_bias_table",
    "norm",
    "bias",
)


def _model_no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    if not callable(fn):
        return set()
    names = fn()
    return set(names or ())


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_keywords: Iterable[str] = NO_DECAY_KEYWORDS,
    extra_no_decay: Iterable[str] = (),
    decay_all: bool = False,
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups, [decay, no_decay]; each also carries "param_names" for inspection.

    A name matches a keyword when the keyword occurs in any dot-separated component of
    the parameter's name (so "norm" covers "norm1.weight" and "ln_f"-style names are
    covered by the one-dimension rule). decay_all: no exemptions (a first release that decayed
    every parameter; its preset reproduces it).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    model = unwrap_model(model)
    keywords = tuple(no_decay_keywords) + tuple(extra_no_decay)
    listed = _model_no_decay_names(model)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        exempt = not decay_all and (
            p.ndim <= 1
            or name in listed
            or any(part in listed for part in parts)
            or any(k in part for k in keywords for part in parts)
        )
        (no_decay if exempt else decay).append(p)
        (no_decay_names if exempt else decay_names).append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names},
    ]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    **param_group_kwargs: Any,
) -> torch.optim.AdamW:
    """torch.optim.AdamW over `param_groups(model, weight_decay)`; fused on CUDA unless told otherwise."""
    groups = param_groups(model, weight_decay, **param_group_kwargs)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
