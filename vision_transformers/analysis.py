"""Parameters, FLOPs per image, and the figures of the vision family.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``. Importing ``krause``
registers the sparse FLOP formulas of the Krause ops (so KViT is counted at its real
sparse cost, not at the cost of whatever kernel computes it) and the CPU SDPA formula
torch lacks (so the ViT baseline is counted on CPU too). FlopCounterMode counts a
multiply-add as 2 FLOPs; papers that quote "FLOPs" from fvcore/thop usually mean
multiply-adds, i.e. half our number (the paper's 1.43G for ViT-S on CIFAR is 2.84 GFLOPs
here). Both are reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import krause  # noqa: F401  (registers the Krause and CPU-SDPA FLOP formulas)
from krause.nn.vision import stock_attention_weights
from krause.training.plotting import integer_ticks

from .models import sigma_per_layer

__all__ = [
    "count_params",
    "flops_per_image",
    "has_attention_maps",
    "patch_grid",
    "attention_maps",
    "plot_sigma",
    "plot_attention_maps",
    "plot_run_curves",
    "attention_rows",
]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model is built for now (timm's input config: its traits over pretrained_cfg)."""
    from timm.models import get_model_input_config

    return tuple(get_model_input_config(model)["input_size"])


def flops_per_image(model: nn.Module, device: torch.device | str | None = None, backward: bool = False) -> dict:
    """FLOPs of one image through ``model`` (eval mode), counted by FlopCounterMode.

    Returns {"flops": forward FLOPs, "macs": flops / 2, "attention_flops": the part spent in
    the attention itself (the Krause op, SDPA, or the score / weighting matmuls of window
    attention; the qkv and output projections are not included), and, with ``backward``,
    "train_flops": forward + backward}.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(1, *_input_shape(model), device=device)
    try:
        counter = FlopCounterMode(display=False, depth=None)
        with counter, torch.no_grad():
            model(x)
        total = counter.get_total_flops()
        attention = 0
        for name, ops in counter.get_flop_counts().items():
            # the attention modules of every block, without their Linear projections (addmm / mm)
            if name.endswith(".attn"):
                attention += sum(v for op, v in ops.items() if str(op).split(".")[1] not in ("addmm", "mm"))
        out = {"flops": int(total), "macs": int(total) // 2, "attention_flops": int(attention)}
        if backward:
            counter = FlopCounterMode(display=False)
            with counter:
                model(x).sum().backward()
            out["train_flops"] = int(counter.get_total_flops())
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- figures
def _figure(*args, **kwargs):
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:  # figures built with layout="constrained" keep it
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_run_curves(runs: dict[str, Sequence[dict]], out_path, title: str | None = None) -> Path:
    """Accuracy and loss per epoch, train and test, for one or several runs (label -> records)."""
    fig = _figure(figsize=(11, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for label, records in runs.items():
        ep = [r for r in records if "test_acc1" in r]
        if not ep:
            continue
        x = [r["epoch"] for r in ep]
        line = ax_acc.plot(x, [100 * r["test_acc1"] for r in ep], marker="o", ms=3, label=f"{label} test")[0]
        if all("train_acc" in r for r in ep):
            ax_acc.plot(x, [100 * r["train_acc"] for r in ep], ls="--", color=line.get_color(), label=f"{label} train")
        ax_loss.plot(x, [r["test_loss"] for r in ep], marker="o", ms=3, color=line.get_color(),
                     label=f"{label} test (plain cross-entropy)")
        if all("train_loss" in r for r in ep):
            ax_loss.plot(x, [r["train_loss"] for r in ep], ls="--", color=line.get_color(),
                         label=f"{label} train (training objective)")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    # the train loss is the objective (label smoothing, mixup/cutmix when on), so it can sit above the test CE
    ax_loss.set(xlabel="epoch", ylabel="loss (nats per image)",
                title="loss (train: label-smoothed / mixed targets; test: plain CE)")
    for ax in (ax_acc, ax_loss):
        integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_sigma(records: Sequence[dict], out_path, title: str | None = None) -> Path:
    """sigma of every layer over training (per-head sigma averaged over heads)."""
    ep = [r for r in records if isinstance(r.get("sigma"), list) and r["sigma"]]
    if not ep:
        raise ValueError("no sigma values in these records (not a Krause run?)")
    fig = _figure(figsize=(6.5, 4))
    ax = fig.subplots()
    depth = len(ep[0]["sigma"])
    cmap = __import__("matplotlib").colormaps["viridis"]
    for layer in range(depth):
        ys = [(sum(s) / len(s)) if isinstance(s := r["sigma"][layer], list) else s for r in ep]
        ax.plot([r["epoch"] for r in ep], ys, color=cmap(layer / max(depth - 1, 1)), label=f"layer {layer}")
    ax.set(xlabel="epoch", ylabel="sigma (distance scale)", title=title or "sigma per layer")
    integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if depth > 6 else 1)
    return _save(fig, out_path)


# --------------------------------------------------------------------------- attention maps
def has_attention_maps(model: nn.Module) -> bool:
    """ViT-like models (a CLS token and global or 2-D local attention over one patch grid)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def patch_grid(model: nn.Module, images: torch.Tensor | None = None) -> tuple[int, int]:
    """(rows, cols) of the patch grid for these images (default: the size the model is built for)."""
    size = tuple(images.shape[-2:]) if images is not None else _input_shape(model)[1:]
    return tuple(int(v) for v in model.patch_embed.dynamic_feat_size(size))


def layer_attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) fp32 weights of one attention module for its input x: the module's own
    ``attention_weights`` (the Krause modules) or, for timm's stock ``Attention``, its softmax weights."""
    if hasattr(attn, "attention_weights"):
        return attn.attention_weights(x).float()
    return stock_attention_weights(attn, x)


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights of every block of a ViT/KViT for these images, a list of (B, H, N, N)
    fp32 tensors (rows sum to 1), captured by forward hooks on the attention modules while
    the model runs its ordinary forward (eval mode for the call)."""
    if not has_attention_maps(model):
        raise ValueError(f"model: attention maps need a ViT-like model, got {type(model).__name__}")
    maps: list[torch.Tensor] = []
    hooks = [blk.attn.register_forward_hook(lambda mod, args, out: maps.append(layer_attention_weights(mod, args[0])))
             for blk in model.blocks]
    was = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return maps


def attention_rows(model: nn.Module, images: torch.Tensor, query_tokens: Sequence[int]) -> torch.Tensor:
    """(L, B, Q, rows, cols): head-averaged attention of the given query tokens to the patch grid, per layer."""
    maps = attention_maps(model, images)
    rows, cols = patch_grid(model, images)
    p = model.num_prefix_tokens
    out = torch.stack([m.mean(1)[:, list(query_tokens), p:] for m in maps])
    return out.reshape(len(maps), images.shape[0], len(query_tokens), rows, cols)


def _show_image(ax, img: torch.Tensor, mean, std) -> None:
    x = img.detach().cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention_maps(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    out_path,
    patches: Sequence[tuple[int, int]] | None = None,
    layers: Sequence[int] | None = None,
    mean=(0.5,),
    std=(0.5,),
) -> Path:
    """Attention of the CLS token and of chosen patches, per layer, for several models side by side.

    Rows: for each image, for each query (CLS, then each patch), one row per model; columns:
    the image (with the query patch marked) then the chosen layers. Each map is the
    head-averaged attention of that query to the patch grid (the CLS column left out),
    normalised per panel.
    """
    names = list(models)
    first = models[names[0]]
    rows_g, cols_g = patch_grid(first, images)
    if patches is None:
        patches = [(rows_g // 2, cols_g // 2)]
    depth = len(first.blocks)
    layers = list(range(depth)) if layers is None else list(layers)
    if len(layers) > 6:
        layers = sorted({round(i * (depth - 1) / 5) for i in range(6)})
    queries = [("CLS", 0)] + [(f"patch {r},{c}", first.num_prefix_tokens + r * cols_g + c) for r, c in patches]
    maps = {name: attention_rows(model, images, [q for _, q in queries]) for name, model in models.items()}
    n_rows = images.shape[0] * len(queries) * len(names)
    fig = _figure(figsize=(1.6 * (len(layers) + 1) + 0.9, 1.6 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, len(layers) + 1, squeeze=False)
    row = 0
    for b in range(images.shape[0]):
        for qi, (qname, _) in enumerate(queries):
            for name in names:
                ax = axes[row][0]
                _show_image(ax, images[b], mean, std)
                if qi > 0:
                    r, c = patches[qi - 1]
                    ph, pw = images.shape[-2] / rows_g, images.shape[-1] / cols_g
                    ax.add_patch(__import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
                        (c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=1.2))
                ax.set_ylabel(f"{name}\n{qname}", fontsize=7)
                for j, layer in enumerate(layers):
                    a = maps[name][layer, b, qi]
                    peak = float(a.max()) or 1.0
                    shown = axes[row][j + 1].imshow((a / peak).numpy(), cmap="magma", vmin=0, vmax=1)
                    axes[row][j + 1].text(0.03, 0.97, f"max {peak:.2f}", transform=axes[row][j + 1].transAxes,
                                          ha="left", va="top", fontsize=6, color="white",
                                          bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0))
                    axes[row][j + 1].set_xticks([])
                    axes[row][j + 1].set_yticks([])
                    if row == 0:
                        axes[row][j + 1].set_title(f"layer {layer}", fontsize=8)
                row += 1
    fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=min(1.0, 4.0 / n_rows), pad=0.02,
                 label="attention weight / panel max")
    fig.suptitle("Head-averaged attention weights of one query (CLS, or the patch boxed in red) to the patch grid,\n"
                 "per layer (CLS key left out); each panel scaled to its own maximum, printed in its corner",
                 fontsize=8)
    return _save(fig, out_path)


def sigma_summary(model: nn.Module) -> list:
    """sigma per layer (rounded) for logs; empty for baselines."""
    return [round(s, 4) if not isinstance(s, list) else [round(v, 4) for v in s] for s in sigma_per_layer(model)]


def format_flops(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
