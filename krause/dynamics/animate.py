"""Figures of the particle dynamics: side-by-side GIFs, snapshot panels, cluster curves,
phase diagrams. matplotlib's object API on the Agg canvas (no display, no pyplot state);
GIFs through matplotlib's PillowWriter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["frame_indices", "animate_pair", "plot_snapshots", "plot_clusters_vs_time", "plot_phase_diagram",
           "plot_beta_sweep", "describe"]


def _save(fig, out_path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def describe(cfg) -> str:
    """Short label of a configuration, e.g. 'standard, beta=1' or 'Krause, sigma=0.3, top_k=16'."""
    if cfg.attention == "standard":
        return f"standard softmax, β={cfg.beta:g}"
    r = "" if cfg.radius is None else f", r={cfg.radius:g}"
    return f"Krause, σ={cfg.sigma:g}, top-k={cfg.top_k}{r}"


def frame_indices(num_recorded: int, frames: int) -> list[int]:
    """At most ``frames`` recorded states, spaced quadratically in time (the clusters form early)."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    if num_recorded <= frames:
        return list(range(num_recorded))
    return sorted({round((i / (frames - 1)) ** 2 * (num_recorded - 1)) for i in range(frames)})


def _clusters(c: int) -> str:
    return f"{c} cluster" if c == 1 else f"{c} clusters"


def _colours(x0: np.ndarray) -> np.ndarray:
    """One colour per particle from its initial position, so one can follow who joins whom."""
    from matplotlib import colormaps

    angle = np.arctan2(x0[:, 1], x0[:, 0])
    return colormaps["hsv"]((angle + math.pi) / (2 * math.pi))


def _make_axes(fig, position, d: int):
    if d == 2:
        ax = fig.add_subplot(*position)
        t = np.linspace(0, 2 * math.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="0.8", lw=0.8, zorder=0)
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        return ax
    if d == 3:
        ax = fig.add_subplot(*position, projection="3d")
        u, v = np.mgrid[0:2 * math.pi:24j, 0:math.pi:12j]
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.3)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_zlim(-1, 1)
        ax.set_box_aspect((1, 1, 1), zoom=1.35)
        ax.set_axis_off()
        ax.view_init(elev=20, azim=35)
        return ax
    raise ValueError(f"d must be 2 or 3 to draw, got {d}")


def _scatter(ax, pts: np.ndarray, colours, size: float):
    if pts.shape[1] == 2:
        return ax.scatter(pts[:, 0], pts[:, 1], s=size, c=colours, edgecolors="none")
    return ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=size, c=colours, edgecolors="none", depthshade=True)


def _move(artist, pts: np.ndarray) -> None:
    if pts.shape[1] == 2:
        artist.set_offsets(pts)
    else:
        artist._offsets3d = (pts[:, 0], pts[:, 1], pts[:, 2])


def _check_pair(trajs) -> int:
    if len(trajs) < 1 or any(not t.positions for t in trajs):
        raise ValueError("trajectories must keep their positions (simulate(..., keep_positions=True))")
    d = trajs[0].config.d
    if d not in (2, 3):
        raise ValueError(f"d must be 2 or 3 to animate, got {d}")
    return d


def animate_pair(trajs: Sequence, out_path, frames: int = 60, fps: int = 12, dpi: int = 90,
                 hold_s: float = 1.5) -> Path:
    """One GIF with the trajectories side by side (e.g. standard | Krause), same recorded times;
    the last frame is held ``hold_s`` seconds before the loop restarts."""
    from matplotlib.animation import PillowWriter

    d = _check_pair(trajs)
    n_rec = min(len(t.positions) for t in trajs)
    idx = frame_indices(n_rec, frames)
    fig = _figure(figsize=(3.6 * len(trajs), 3.9))
    axes, artists = [], []
    colours = _colours(trajs[0].positions[0].numpy())
    size = 14 if trajs[0].config.n <= 500 else 4
    for i, traj in enumerate(trajs):
        ax = _make_axes(fig, (1, len(trajs), i + 1), d)
        axes.append(ax)
        artists.append(_scatter(ax, traj.positions[0].numpy(), colours, size))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, wspace=0.05)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(out), dpi):
        for j in idx:
            for ax, art, traj in zip(axes, artists, trajs):
                _move(art, traj.positions[j].numpy())
                ax.set_title(f"{describe(traj.config)}\nt = {traj.times[j]:.1f}: {_clusters(traj.cluster_counts[j])}",
                             fontsize=9)
            writer.grab_frame()
        for _ in range(round(hold_s * fps)):
            writer.grab_frame()
    return out


def plot_snapshots(rows: Sequence, out_path, fractions: Sequence[float] = (0.0, 0.02, 0.08, 1.0),
                   dpi: int = 110) -> Path:
    """Rows of trajectories (e.g. [standard circle, Krause circle, standard sphere, Krause sphere]),
    each drawn at the recorded states nearest to these fractions of its horizon."""
    rows = list(rows)
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must be in [0, 1], got {fractions}")
    columns = len(fractions)
    fig = _figure(figsize=(2.4 * columns + 1.4, 2.5 * len(rows)))
    for r, traj in enumerate(rows):
        d = _check_pair([traj])
        last = len(traj.positions) - 1
        idx = [round(f * last) for f in fractions]
        colours = _colours(traj.positions[0].numpy())
        for c, j in enumerate(idx):
            ax = _make_axes(fig, (len(rows), len(idx), r * len(idx) + c + 1), d)
            _scatter(ax, traj.positions[j].numpy(), colours, 6 if d == 2 else 9)
            ax.set_title(f"t = {traj.times[j]:.1f}: {_clusters(traj.cluster_counts[j])}", fontsize=8)
            if c == 0:
                shape = "circle" if d == 2 else "sphere"
                fig.text(0.005, 1 - (r + 0.5) / len(rows), f"{describe(traj.config)}\n({shape})", fontsize=8,
                         rotation=90, va="center", ha="left")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.25)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_clusters_vs_time(summaries: dict, out_path, title: str | None = None) -> Path:
    """Cluster count over time, one line per labelled run summary (``measure.summarise`` dicts)."""
    fig = _figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, s in summaries.items():
        ax.plot(s["times"], s["cluster_counts"], label=label)
    ax.set_yscale("log")
    tol = next(iter(summaries.values()))["config"]["tol"] if summaries else float("nan")
    ax.set(xlabel="time t", ylabel=f"clusters (single linkage, angle < {tol:g} rad)",
           title=title or "clusters over time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out_path)


def plot_phase_diagram(records: Sequence[dict], out_path, title: str | None = None) -> Path:
    """Final cluster count over sigma x top_k (a Krause sweep; other swept axes: first value each)."""
    sigmas = sorted({r["point"]["sigma"] for r in records})
    ks = sorted({r["point"]["top_k"] for r in records})
    grid = np.full((len(ks), len(sigmas)), np.nan)
    for r in records:
        i, j = ks.index(r["point"]["top_k"]), sigmas.index(r["point"]["sigma"])
        if np.isnan(grid[i, j]):
            grid[i, j] = r["final_clusters"]
    fig = _figure(figsize=(1.0 * len(sigmas) + 2.6, 0.55 * len(ks) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib.colors import LogNorm

    im = ax.imshow(grid, origin="lower", cmap="viridis", norm=LogNorm(vmin=1, vmax=max(2, np.nanmax(grid))),
                   aspect="auto")
    for i in range(len(ks)):
        for j in range(len(sigmas)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < math.sqrt(np.nanmax(grid)) else "black")
    ax.set_xticks(range(len(sigmas)), [f"{s:g}" for s in sigmas])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set(xlabel="σ", ylabel="top-k")
    cfg = records[0]["config"]
    ax.set_title(title or f"Krause dynamics: clusters at t = {cfg['steps'] * cfg['dt']:g} "
                          f"(N={cfg['n']}, d={cfg['d']})", fontsize=9)
    fig.colorbar(im, ax=ax, label="final clusters")
    return _save(fig, out_path)


def plot_beta_sweep(records: Sequence[dict], out_path, title: str | None = None) -> Path:
    """Standard attention: final clusters and time to consensus against beta (log scale)."""
    records = sorted(records, key=lambda r: r["point"]["beta"])
    betas = [r["point"]["beta"] for r in records]
    cfg = records[0]["config"]
    horizon = cfg["steps"] * cfg["dt"]
    fig = _figure(figsize=(9, 3.4))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xscale = "symlog" if min(betas) == 0 else "log"
    ax.plot(betas, [r["final_clusters"] for r in records], marker="o")
    ax.set(xscale=xscale, xlabel="β", ylabel=f"clusters at t = {horizon:g}", title="final clusters")
    reached = [(b, r["time_to_consensus"]) for b, r in zip(betas, records) if r["time_to_consensus"] is not None]
    if reached:
        ax2.plot(*zip(*reached), marker="s", color="tab:red")
    for b, r in zip(betas, records):
        if r["time_to_consensus"] is None:
            ax2.plot([b], [horizon], marker="x", color="0.4", ms=8)
    ax2.axhline(horizon, color="0.6", lw=0.8, ls="--")
    ax2.text(0.02, 0.97, "x: none within the horizon (dashed)", transform=ax2.transAxes, fontsize=7, va="top",
             color="0.3")
    ax2.set(xscale=xscale, xlabel="β", ylabel="time to consensus", title="time to consensus", ylim=(0, 1.1 * horizon))
    for a in (ax, ax2):
        a.set_xticks(betas, [f"{b:g}" for b in betas])
        a.minorticks_off()
        a.grid(alpha=0.3)
    fig.suptitle(title or f"standard attention over β (N={cfg['n']}, d={cfg['d']}, dt={cfg['dt']:g}): "
                          "large β leaves several metastable clusters", fontsize=9)
    return _save(fig, out_path)
