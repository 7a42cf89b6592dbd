"""sigma = exp(log_sigma) of every Krause layer, for metrics, summaries and figures."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["sigma_per_layer"]


def sigma_per_layer(model: nn.Module) -> list:
    """sigma of every module that owns a `log_sigma`, in module order: a float per layer
    (scalar log_sigma) or a list (one per head); [] for a model without Krause layers."""
    out = []
    for module in model.modules():
        log_sigma = module._parameters.get("log_sigma") if hasattr(module, "_parameters") else None
        if log_sigma is None:
            log_sigma = module._buffers.get("log_sigma") if hasattr(module, "_buffers") else None
        if log_sigma is None:
            continue
        s = log_sigma.detach().float()
        if hasattr(s, "full_tensor"):  # FSDP2 shard
            s = s.full_tensor()
        s = s.exp().cpu()
        out.append(s.item() if s.dim() == 0 else s.tolist())
    return out
