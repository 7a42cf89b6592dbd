"""Training-time monitor: per-layer sigma, attention-sink mass and cluster count of the
token representations, from a model and one fixed batch, into the metrics JSON lines.

    monitor = TrainingMonitor(model, batch, every=200)        # batch: what model(batch) takes
    ...in the loop: monitor.maybe_log(step, metrics_logger)   # no-op except every 200 steps
    plot_monitor("run/metrics.jsonl", "run/figures/monitor.png")

The three measurements (``measure(model, batch)``):

- ``sigma``: ``krause.training.sigma_per_layer`` (mean over heads), one value per Krause layer;
- ``sink_mass``: per attention layer, the LLM family's sink metric (``lora_llms.sinks``): the
  mean weight that queries 1..T-1 put on token 0, over batch and heads. For a gated layer
  the effective weights ``g0 A_std + g1 A_krause``. Weights come from the layer's
  ``attention_weights(x)`` when it has one (the ``krause.nn`` contract), else from its
  q/k projections (``q_proj``/``k_proj`` with ``log_sigma`` for Krause, ``kind`` /
  ``window`` / ``top_k`` for the softmax baselines); ``None`` for a layer it cannot read;
- ``clusters``: per block, the number of single-linkage clusters of the token
  representations at angle < ``tol`` (``krause.dynamics.count_clusters``, the particle
  dynamics' metric), averaged over the first ``max_sequences`` sequences; 1 = consensus.

The model runs in eval mode under ``no_grad`` and goes back to its previous mode. Wiring
into a family loop is one call per logging step (left to the shared training runner).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .sigma import sigma_per_layer

__all__ = ["measure", "sink_mass", "attention_layers", "block_layers", "layer_attention_weights",
           "TrainingMonitor", "plot_monitor", "MONITOR_KEYS"]

MONITOR_KEYS = ("monitor_sigma", "monitor_sink_mass", "monitor_clusters")
DEFAULT_TOL = 0.2  # radians: trained representations are never within the dynamics' 0.01 of each other


def sink_mass(weights: torch.Tensor) -> float:
    """Mean weight on key 0 over batch, heads and queries 1..T-1 of (B, H, T, T) weights."""
    if weights.dim() != 4 or weights.shape[2] < 2:
        raise ValueError(f"weights must be (B, H, T >= 2, T), got {tuple(weights.shape)}")
    return float(weights.detach()[:, :, 1:, 0].float().mean())


def _heads(module: nn.Module, x: torch.Tensor, proj: nn.Linear, num_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    y = proj(x)
    return y.view(b, t, num_heads, y.shape[-1] // num_heads).transpose(1, 2)


def _projected_qk(module: nn.Module, x: torch.Tensor):
    h = int(getattr(module, "num_heads"))
    hkv = int(getattr(module, "num_kv_heads", h) or h)
    q = _heads(module, x, module.q_proj, h)
    k = _heads(module, x, module.k_proj, hkv)
    return q, k.repeat_interleave(h // hkv, dim=1)


def _softmax_weights(q, k, window: int | None = None, top_k: int | None = None) -> torch.Tensor:
    t = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    pos = torch.arange(t, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if top_k is not None:
        best = scores.topk(min(top_k, t), dim=-1).indices
        keep = torch.zeros_like(allowed.expand_as(scores)).scatter(-1, best, True) & allowed
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _krause_weights(module: nn.Module, q, k) -> torch.Tensor:
    from ..dense import causal_candidates
    from ..nn import krause_attention_probs

    window = int(getattr(module, "window"))
    top_k = int(getattr(module, "top_k"))
    candidates = causal_candidates(q.shape[2], k.shape[2], window, device=q.device)
    return krause_attention_probs(q, k, module.log_sigma, candidates, top_k)


def _is_gated(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("standard", "krause", "gate"))


def _is_projection_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj")) and \
        hasattr(module, "num_heads")


def _readable(module: nn.Module) -> bool:
    return callable(getattr(module, "attention_weights", None)) or _is_gated(module) or _is_projection_attention(module)


def layer_attention_weights(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense causal (B, H, T, T) weights of one attention layer for its input x (B, T, d)."""
    if _is_gated(module):
        a_std = layer_attention_weights(module.standard, x)
        a_krause = layer_attention_weights(module.krause, x)
        out_std, out_krause = module.standard(x), module.krause(x)
        gate = torch.softmax(module.gate(torch.cat([out_std, out_krause], dim=-1)).float(), dim=-1)
        g0, g1 = gate[..., 0][:, None, :, None], gate[..., 1][:, None, :, None]  # per query, shared by heads
        return g0 * a_std + g1 * a_krause
    if callable(getattr(module, "attention_weights", None)):
        return module.attention_weights(x).float()
    if not _is_projection_attention(module):
        raise ValueError(f"module: cannot read attention weights of {type(module).__name__}")
    q, k = _projected_qk(module, x)
    if isinstance(getattr(module, "log_sigma", None), torch.Tensor):
        return _krause_weights(module, q, k)
    kind = getattr(module, "kind", None)
    window = getattr(module, "window", None) if kind in (None, "sliding_window") else None
    top_k = getattr(module, "top_k", None) if kind in (None, "topk") else None
    if kind is None and window is not None and top_k is not None:
        raise ValueError(f"module: {type(module).__name__} has both window and top_k and no kind")
    return _softmax_weights(q, k, window, top_k)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose attention weights can be read, in module order.

    Only modules named like an attention layer (``attn``, ``attention``, ``self_attn``) or
    providing ``attention_weights`` count, so that e.g. an MLP with q_proj-like names does not."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        leaf = name.rsplit(".", 1)[-1]
        named_like = leaf in ("attn", "attention", "self_attn") or callable(getattr(module, "attention_weights", None))
        if name and named_like and _readable(module):
            found.append((name, module))
    return found


def block_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the longest ModuleList of same-class modules."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and \
                len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _mean_clusters(hidden: torch.Tensor, tol: float, max_sequences: int) -> float:
    from ..dynamics.measure import count_clusters

    if hidden.dim() != 3:
        raise ValueError(f"block output must be (B, T, d), got {tuple(hidden.shape)}")
    seqs = hidden[:max_sequences].detach().float()
    return sum(count_clusters(s, tol) for s in seqs) / seqs.shape[0]


def _mean_sigma(values: list) -> list[float]:
    return [sum(v) / len(v) if isinstance(v, list) else float(v) for v in values]


@torch.no_grad()
def measure(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None,
            tol: float = DEFAULT_TOL, max_sequences: int = 4) -> dict:
    """{"sigma", "sink_mass", "clusters", "attention_layers", "tol"} of one forward of ``batch``.

    ``forward(model, batch)`` runs the model (default ``model(batch)``)."""
    if not (isinstance(tol, (int, float)) and 0 < tol <= math.pi):
        raise ValueError(f"tol must be an angle in (0, pi], got {tol!r}")
    if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
        raise ValueError(f"max_sequences must be an integer >= 1, got {max_sequences!r}")
    attn = attention_layers(model)
    blocks = block_layers(model)
    sinks: list[float | None] = [None] * len(attn)
    clusters: list[float | None] = [None] * len(blocks)
    handles = []

    def attn_hook(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] >= 2:
                try:
                    sinks[i] = sink_mass(layer_attention_weights(module, x))
                except (ValueError, AttributeError, RuntimeError):
                    sinks[i] = None  # a layer this reader does not understand: reported as unknown
        return hook

    def block_hook(i):
        def hook(module, args, output):
            h = _first_tensor(output)
            if h is not None and h.dim() == 3:
                clusters[i] = _mean_clusters(h, tol, max_sequences)
        return hook

    was_training = model.training
    model.eval()
    try:
        handles += [m.register_forward_pre_hook(attn_hook(i), with_kwargs=True) for i, (_, m) in enumerate(attn)]
        handles += [m.register_forward_hook(block_hook(i)) for i, m in enumerate(blocks)]
        (forward or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"sigma": _mean_sigma(sigma_per_layer(model)), "sink_mass": sinks, "clusters": clusters,
            "attention_layers": [name for name, _ in attn], "tol": tol}


class TrainingMonitor:
    """Measures a fixed batch every ``every`` steps and logs ``monitor_*`` keys to a MetricsLogger."""

    def __init__(self, model: nn.Module, batch: Any, every: int = 100, forward=None, tol: float = DEFAULT_TOL,
                 max_sequences: int = 4):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.model, self.batch, self.every, self.forward = model, batch, every, forward
        self.tol, self.max_sequences = tol, max_sequences

    def record(self) -> dict:
        m = measure(self.model, self.batch, self.forward, self.tol, self.max_sequences)
        return {"monitor_sigma": m["sigma"], "monitor_sink_mass": m["sink_mass"], "monitor_clusters": m["clusters"]}

    def maybe_log(self, step: int, metrics) -> dict | None:
        """At steps divisible by ``every``: measures and logs (``metrics.log(step=..., **record)``)."""
        if step % self.every:
            return None
        record = self.record()
        metrics.log(step=step, **record)
        return record


def plot_monitor(source: str | os.PathLike | list, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Three panels over steps (sigma, sink mass, clusters per layer) from monitor records."""
    from matplotlib.figure import Figure

    from .metrics import read_metrics

    records = read_metrics(source) if isinstance(source, (str, os.PathLike)) else list(source)
    records = [r for r in records if any(k in r for k in MONITOR_KEYS)]
    if not records:
        raise ValueError("source: no monitor records (keys monitor_sigma / monitor_sink_mass / monitor_clusters)")
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    labels = {"monitor_sigma": "sigma (mean over heads)", "monitor_sink_mass": "sink mass (weight on token 0)",
              "monitor_clusters": "clusters of token representations"}
    for ax, key in zip(axes, MONITOR_KEYS):
        rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list)]
        width = max((len(v) for _, v in rows), default=0)
        for i in range(width):
            pts = [(s, v[i]) for s, v in rows if i < len(v) and isinstance(v[i], (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"layer {i}")
        ax.set_title(labels[key], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if width:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
