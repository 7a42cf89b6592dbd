"""Figures from metrics JSON lines.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`) and
rendered by the Agg canvas: no display, no pyplot global state, safe in
notebooks and threads.

- `plot_curves`: loss and accuracy-like curves (train and test) of one run.
- `plot_series`: any set of keys over steps, e.g. sigma per layer; list-valued
  metrics (sigma logged as one list per step) give one line per index.
- `plot_comparison`: the same keys for several runs side by side (one panel per key).
- `plot_run`: the standard figures of a run directory into <run>/figures/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import read_metrics

__all__ = ["plot_curves", "plot_series", "plot_comparison", "plot_run", "default_curve_keys"]

Records = Sequence[Mapping[str, Any]]
_RESERVED = {"step", "epoch", "time"}


def _records(source: str | os.PathLike | Records) -> list[Mapping[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            p = p / "metrics.jsonl"
        return read_metrics(p)
    return list(source)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric_keys(records: Records) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _RESERVED and _is_number(v):
                keys.setdefault(k, None)
    return list(keys)


def _xy(records: Records, key: str, x: str) -> tuple[list[Any], list[float]]:
    xs, ys = [], []
    for r in records:
        if x in r and _is_number(r.get(key)):
            xs.append(r[x])
            ys.append(float(r[key]))
    return xs, ys


def default_curve_keys(records: Records) -> dict[str, list[str]]:
    """Panels for `plot_curves`: {"loss": [...loss keys], "accuracy": [...acc/bpd/ppl keys], "lr": [...]}."""
    panels: dict[str, list[str]] = {"loss": [], "accuracy": [], "lr": []}
    for k in _numeric_keys(records):
        low = k.lower()
        if "loss" in low:
            panels["loss"].append(k)
        elif any(t in low for t in ("acc", "top1", "top5", "bpd", "ppl", "perplexity")):
            panels["accuracy"].append(k)
        elif low == "lr" or low.endswith("/lr") or low.startswith("lr"):
            panels["lr"].append(k)
    return {name: keys for name, keys in panels.items() if keys}


def _save(fig: Figure, out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def integer_ticks(ax, axis: str = "x") -> None:
    """Whole-number ticks on `axis` when every plotted value there is whole (steps, epochs, layers)."""
    values = [v for line in ax.get_lines() for v in (line.get_xdata() if axis == "x" else line.get_ydata())]
    if values and all(float(v).is_integer() for v in values):
        getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def plot_curves(
    source: str | os.PathLike | Records,
    out_path: str | os.PathLike,
    panels: Mapping[str, Sequence[str]] | None = None,
    x: str = "step",
    title: str | None = None,
) -> Path:
    """One panel per group of keys (default: loss / accuracy-like / lr), one line per key."""
    records = _records(source)
    panels = dict(panels) if panels is not None else default_curve_keys(records)
    if not panels:
        raise ValueError("no numeric metrics to plot")
    fig = Figure(figsize=(5 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            xs, ys = _xy(records, key, x)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_xlabel(x)
        ax.set_title(name)
        integer_ticks(ax)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_series(
    source: str | os.PathLike | Records,
    out_path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    pattern: str | None = None,
    x: str = "step",
    title: str | None = None,
    ylabel: str | None = None,
) -> Path:
    """Lines for the given keys, or for every key matching the regex `pattern`.

    A list-valued key (e.g. {"sigma": [2.5, 2.4, ...]} per record) gives one line per index.
    """
    records = _records(source)
    if keys is None:
        if pattern is None:
            raise ValueError("give keys or pattern")
        rx = re.compile(pattern)
        found: dict[str, None] = {}
        for r in records:
            for k in r:
                if k not in _RESERVED and rx.search(k):
                    found.setdefault(k, None)
        keys = list(found)
    keys = list(keys)
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    n_lines = 0
    for key in keys:
        list_xs: list[Any] = []
        list_ys: list[list[float]] = []
        xs, ys = _xy(records, key, x)
        if xs:
            ax.plot(xs, ys, label=key)
            n_lines += 1
        for r in records:
            v = r.get(key)
            if x in r and isinstance(v, list) and v and all(_is_number(e) for e in v):
                list_xs.append(r[x])
                list_ys.append([float(e) for e in v])
        if list_ys:
            width = max(len(v) for v in list_ys)
            for i in range(width):
                pts = [(xv, v[i]) for xv, v in zip(list_xs, list_ys) if i < len(v)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{key}[{i}]")
                n_lines += 1
    if n_lines == 0:
        raise ValueError(f"none of the keys {keys} has numeric values to plot")
    integer_ticks(ax)
    ax.set_xlabel(x)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if n_lines > 8 else 1)
    return _save(fig, out_path)


def plot_comparison(
    runs: Mapping[str, str | os.PathLike | Records],
    keys: Sequence[str],
    out_path: str | os.PathLike,
    x: str = "step",
    title: str | None = None,
) -> Path:
    """Several runs (label -> metrics path / run dir / records) side by side: one panel per key."""
    if not runs:
        raise ValueError("no runs to compare")
    if not keys:
        raise ValueError("no keys to compare")
    loaded = {label: _records(src) for label, src in runs.items()}
    fig = Figure(figsize=(5 * len(keys), 3.8))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, records in loaded.items():
            xs, ys = _xy(records, key, x)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(key)
        ax.set_xlabel(x)
        integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_run(run_dir: str | os.PathLike, x: str = "step", series_patterns: Mapping[str, str] | None = None) -> list[Path]:
    """Standard figures of a run: figures/curves.png, plus one figures/<name>.png per
    {name: regex} in series_patterns (default {"sigma": "sigma"}, when such keys exist)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = [plot_curves(records, run_dir / "figures" / "curves.png", x=x, title=run_dir.name)]
    for name, pat in (series_patterns or {"sigma": "sigma"}).items():
        rx = re.compile(pat)
        if any(rx.search(k) for r in records for k in r if k not in _RESERVED):
            out.append(plot_series(records, run_dir / "figures" / f"{name}.png", pattern=pat, x=x, title=name))
    return out
