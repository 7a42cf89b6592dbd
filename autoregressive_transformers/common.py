"""Pieces shared by the train / generate / complete entry points: devices, precision,
bits per dimension over a whole data set, loading a trained model, image grids and
one-line errors."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from krause.training.errors import CheckpointError
from krause.training.checkpointer import find_checkpoint, load_model_weights
from krause.training.data import eval_shard
from krause.training.distributed import all_reduce_sum, get_rank, get_world_size
from krause.training.errors import UsageError, one_line
from krause.training.metrics import progress_bar

from .config import PRECISIONS, ModelConfig, check_run_config
from .model import PixelTransformer


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but CUDA is not available")
    return torch.device(name)


def check_attn_impl(cfg: ModelConfig, device: torch.device, flag: str = "--attn_impl") -> None:
    """The one check of every entry point, before anything is written: the Krause op's implementation
    `cfg.attn_impl` can run on `device` (e.g. triton needs CUDA); else one line naming `flag`."""
    if cfg.attn_impl == "auto":
        return
    from krause.dispatch import choose_impl

    try:
        choose_impl("causal", device, cfg.attn_impl, window=cfg.window)
    except ValueError as e:
        raise UsageError(f"{flag} {cfg.attn_impl}: {one_line(e)}; pass --attn_impl auto") from None


def autocast(device: torch.device, precision: str):
    """bf16 autocast, or a no-op for fp32. The loss and Krause distances stay fp32 either way."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def nll_sums(logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Per-image NLL in nats, summed over dimensions: (B,), float64."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), pixels.long(), reduction="none")
    return nll.double().sum(1)


@torch.no_grad()
def evaluate_bpd(model, pixels: torch.Tensor, batch_size: int, device: torch.device, precision: str = "fp32",
                 progress: bool = True, desc: str = "eval") -> dict:
    """Bits per dimension of ``model`` on every image of ``pixels`` (N, T) (the first pixel left out
    when the model does not model it: ``first_pixel="uniform"``, the first release's).

    Each rank scores its own images (``eval_shard``: every image exactly once over all
    ranks, no padding), the NLL sums and dimension counts are summed across ranks, then
    divided: the result is the mean over the whole set, identical to a single process.
    ``model`` must be the plain module (not DDP), so ranks with fewer batches never wait
    on a collective inside forward.
    """
    was_training = model.training
    model.eval()
    first = model.cfg.first_scored  # 1 for the first release's unmodelled first pixel
    idx = eval_shard(len(pixels), get_rank(), get_world_size())
    total = torch.zeros((), dtype=torch.float64)
    bar = progress_bar(range(0, len(idx), batch_size), enabled=progress, desc=desc, leave=False)
    for s in bar:
        x = pixels[idx[s:s + batch_size]].to(device, non_blocking=True).long()
        with autocast(device, precision):
            logits = model(x)
        total += nll_sums(logits[:, first:], x[:, first:]).sum().cpu()
    model.train(was_training)
    nll_sum = float(all_reduce_sum(total))
    images = int(all_reduce_sum(int(idx.numel())))
    dims = images * (pixels.shape[1] - first)
    return {"nll_nats": nll_sum / dims, "bpd": nll_sum / (dims * math.log(2.0)), "num_images": images}


# --------------------------------------------------------------------------- trained runs
def checkpoint_path(run_dir: str | Path | None, which: str = "best") -> Path:
    """``which`` is best, last (the latest step), a step directory or an exported .pt file."""
    try:
        return find_checkpoint(run_dir, which)
    except ValueError as e:
        raise UsageError(str(e)) from None


def checkpoint_name(which: str, path: Path) -> str:
    """best / last, or the checkpoint's own name (for output file names)."""
    return which if which in ("best", "last") else path.stem


def run_root(run_dir, checkpoint: Path) -> Path:
    """Where outputs go by default: the run directory, else the folder of the checkpoint."""
    return Path(run_dir).expanduser().resolve() if run_dir is not None else checkpoint.parent


def load_trained(run_dir: str | Path | None, which: str = "best", device: torch.device | str = "cpu",
                 attn_impl: str | None = None):
    """(model in eval mode, run config dict, checkpoint path) from a training run.

    attn_impl: run the Krause op with another implementation than the one trained with."""
    if run_dir is None and which in ("best", "last"):
        raise UsageError("give --run_dir (a training run directory) or --checkpoint PATH")
    path = checkpoint_path(run_dir, which)
    from krause.training.checkpointer import checkpoint_meta

    config = checkpoint_meta(path).get("config") or {}
    if "model" not in config or not isinstance(config["model"], dict):
        raise UsageError(f"checkpoint {path} has no pixel-model config (not written by autoregressive_transformers.train)")
    check_run_config(config, f"checkpoint {path}")
    fields = dict(config["model"])
    if attn_impl is not None:
        fields["attn_impl"] = attn_impl
    cfg = ModelConfig.from_dict(fields)
    check_attn_impl(cfg, torch.device(device), "--attn_impl" if attn_impl is not None else "the run's attn_impl")
    model = PixelTransformer(cfg)
    try:
        load_model_weights(model, path)
    except CheckpointError as e:
        raise UsageError(f"checkpoint {path} does not fit its own model config: {one_line(e)[:300]}") from None
    return model.to(device).eval(), config, path


def check_outputs(out_dir: Path, names: list[str], overwrite: bool, flag: str = "--out_dir") -> None:
    """Before any work: `out_dir` must be (or become) a directory, and the named files must not
    exist unless --overwrite (results are never silently replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{flag} {out_dir} exists and is not a directory")
    taken = [n for n in names if (out_dir / n).exists()]
    if taken and not overwrite:
        raise UsageError(f"{out_dir / taken[0]} already exists; pass --overwrite to replace it or --tag NAME "
                         "for new file names")


def check_output_file(path: Path, overwrite: bool, flag: str = "--out") -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another {flag}")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: {path.parent} is not a directory")


# --------------------------------------------------------------------------- images
def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 grid."""
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 4, title: str | None = None) -> None:
    """Writes a uint8 (H, W, 1 or 3) array as a PNG, each pixel a scale x scale block; with
    ``title``, as a figure with that title above the image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if title is None:
        plt.imsave(str(path), img)
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(max(img.shape[1], 300) / dpi, (img.shape[0] + 40) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, img.shape[0] / (img.shape[0] + 40)))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=8, y=0.99, va="top")
    fig.savefig(str(path), dpi=dpi)


# --------------------------------------------------------------------------- errors
def run_main(main, argv=None) -> int:
    """Runs ``main(argv)``; a bad-input error prints ``error: <one line>`` and exits 2
    (krause.training.entry's contract, for callers holding an undecorated main)."""
    from krause.training.entry import run_one_line

    return run_one_line(main, argv)
