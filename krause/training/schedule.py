"""Per-step learning-rate schedule: linear warmup, then cosine decay to a floor.

The factor applied to each parameter group's base LR at optimizer step `s`
(0-based; `LambdaLR` evaluates it before the first step with s = 0):

    s <  warmup:  (s + 1) / warmup                       never 0, reaches 1 at s = warmup - 1
    s >= warmup:  r + (1 - r) * (1 + cos(pi * p)) / 2,   p = min(1, (s - warmup) / (total - warmup))

where r = min_lr_ratio (the floor as a fraction of the base LR: 0.1 for
language_models_100m, 1e-6 for autoregressive_transformers, 0 for a plain
cosine). Call `scheduler.step()` once per optimizer step, not per epoch.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "warmup_cosine_scheduler", "warmup_steps"]


class WarmupCosine:
    """The LR factor as a picklable callable (so LambdaLR can checkpoint it)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = 1.0 if decay_steps <= 0 else min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def __repr__(self) -> str:
        return f"WarmupCosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio})"


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR applying `WarmupCosine` to every parameter group; step it once per optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio))


def warmup_steps(
    total_steps: int,
    *,
    fraction: float | None = None,
    epochs: float | None = None,
    steps_per_epoch: int | None = None,
) -> int:
    """Warmup length in steps from a fraction of training (e.g. 0.05) or a number of epochs (e.g. 10)."""
    if (fraction is None) == (epochs is None):
        raise ValueError("give exactly one of fraction or epochs")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"warmup fraction must be in [0, 1], got {fraction}")
        return min(total_steps, int(round(fraction * total_steps)))
    if steps_per_epoch is None or steps_per_epoch < 1:
        raise ValueError("warmup in epochs needs steps_per_epoch >= 1")
    if epochs < 0:
        raise ValueError(f"warmup epochs must be >= 0, got {epochs}")
    return min(total_steps, int(round(epochs * steps_per_epoch)))
