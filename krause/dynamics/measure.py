"""Clusters, consensus and sweeps of the particle dynamics.

Clustering (stated tolerance ``tol``, radians): single linkage on angular distance, i.e. the
connected components of the graph joining particles ``i, j`` with ``angle(x_i, x_j) < tol``.
Components are found by vectorised min-label propagation with pointer jumping over row
chunks of the thresholded Gram matrix (no Python loop over particles).

Consensus: every particle within ``tol`` of the mean direction (so all pairwise angles are
below ``2 tol`` and the cloud is one cluster); the time to consensus is the first recorded
time at which that holds, or ``None`` ("none within the horizon").
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = [
    "cluster_labels",
    "count_clusters",
    "cluster_sizes",
    "spread",
    "summarise",
    "sweep",
]

CHUNK_ELEMENTS = 1 << 22


def _check_points(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ValueError(f"points must be an (N, d >= 2) tensor, got {getattr(x, 'shape', type(x).__name__)}")


def cluster_labels(x: torch.Tensor, tol: float) -> torch.Tensor:
    """(N,) int64: for each point, the smallest index in its single-linkage cluster at angle < tol."""
    _check_points(x)
    if not (isinstance(tol, (int, float)) and 0 < tol <= math.pi):
        raise ValueError(f"tol must be an angle in (0, pi], got {tol!r}")
    xf = x.double() / x.double().norm(dim=-1, keepdim=True)
    n = xf.shape[0]
    cos_tol = math.cos(tol)
    rows = max(1, CHUNK_ELEMENTS // n)
    labels = torch.arange(n, device=x.device)
    sentinel = torch.tensor(n, device=x.device)
    while True:
        new = labels.clone()
        for s in range(0, n, rows):
            near = (xf[s:s + rows] @ xf.T) > cos_tol  # includes i itself
            new[s:s + rows] = torch.where(near, labels[None, :], sentinel).amin(dim=1)
        while True:  # pointer jumping: a label is a member of the same cluster with a label <= its own
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            return labels
        labels = new


def count_clusters(x: torch.Tensor, tol: float) -> int:
    return int(cluster_labels(x, tol).unique().numel())


def cluster_sizes(x: torch.Tensor, tol: float) -> list[int]:
    """Cluster sizes, largest first."""
    _, counts = cluster_labels(x, tol).unique(return_counts=True)
    return sorted((int(c) for c in counts), reverse=True)


def spread(x: torch.Tensor) -> float:
    """Largest angle (radians) between a point and the normalised mean direction (pi if the mean is 0)."""
    _check_points(x)
    xf = x.double() / x.double().norm(dim=-1, keepdim=True)
    m = xf.mean(0)
    if float(m.norm()) < 1e-12:
        return math.pi
    cos = (xf @ (m / m.norm())).clamp(-1, 1)
    return float(torch.arccos(cos.min()))


def summarise(traj) -> dict:
    """The measurements of one trajectory as a JSON-ready dict."""
    cfg = traj.config
    times = traj.times
    consensus = next((t for t, s in zip(times, traj.spreads) if s < cfg.tol), None)
    return {
        "config": cfg.to_dict(),
        "integrator": "explicit Euler on the tangent projection, then renormalisation",
        "horizon": cfg.steps * cfg.dt,
        "clustering": f"single linkage on angular distance < tol = {cfg.tol:g} rad",
        "times": times,
        "cluster_counts": traj.cluster_counts,
        "spreads": traj.spreads,
        "final_clusters": traj.cluster_counts[-1],
        "final_cluster_sizes": cluster_sizes(traj.final, cfg.tol),
        "time_to_consensus": consensus,
        "consensus": "none within the horizon" if consensus is None else f"t = {consensus:g}",
        "min_clusters_over_run": min(traj.cluster_counts),
        "max_norm_error": traj.max_norm_error,
        "seconds": traj.seconds,
    }


def _grid(base, **axes: Sequence) -> Iterable:
    from dataclasses import replace

    names = list(axes)
    if not names:
        yield {}, base
        return
    import itertools

    for values in itertools.product(*(axes[k] for k in names)):
        point = dict(zip(names, values))
        yield point, replace(base, **point)


def sweep(base, progress=None, **axes: Sequence) -> list[dict]:
    """Runs ``base`` at every point of the grid ``axes`` (e.g. beta=[...] or sigma=[...], top_k=[...]).

    Returns one record per point: the swept values and the measurements (positions not kept).
    """
    from .particles import simulate, validate

    out = []
    points = list(_grid(base, **axes))
    for point, cfg in points:
        validate(cfg)
    for i, (point, cfg) in enumerate(points):
        summary = summarise(simulate(cfg, keep_positions=False))
        summary["point"] = point
        out.append(summary)
        if progress is not None:
            progress(i + 1, len(points), point, summary)
    return out
