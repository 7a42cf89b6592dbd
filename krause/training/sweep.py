"""Collect a job-array sweep into one table and one plot.

    python -m krause.training.sweep runs/karm_sweep [--metric test_bpd ...] [--out DIR]

A sweep template (e.g. `autoregressive_transformers/launch/sweep.sh`) trains element i of
the grid into `<sweep dir>/<name=value,name=value,...>/`. This reads every such run dir's
`metrics.jsonl`, takes the last logged value of each metric (default: every scalar whose
name starts with `test_`, `val_` or `eval_`) and the last step, and writes
`sweep.md` (printed too), `sweep.csv` and `sweep.png` (each metric against the first
setting, one line per combination of the others) into the sweep dir, or --out.
A run dir without metrics yet (pending or just started) is listed with empty cells.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .metrics import read_metrics

__all__ = ["parse_element", "collect", "format_table", "plot_sweep", "main"]

DEFAULT_PREFIXES = ("test_", "val_", "eval_")


def parse_element(name: str) -> dict[str, str] | None:
    """`sigma=2.5,window=64` -> {"sigma": "2.5", "window": "64"}; None for any other folder name."""
    settings = {}
    for part in name.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            return None
        settings[key] = value
    return settings


def _sort_key(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect(sweep_dir: str | Path, metrics: Sequence[str] | None = None) -> tuple[list[str], list[str], list[dict]]:
    """(setting names, metric names, rows): one row per element, sorted by its settings. Each row
    holds the settings, `step` (the last logged step, None without metrics) and the metrics."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep_dir: no such folder {sweep_dir}")
    elements = [(d, parse_element(d.name)) for d in sorted(sweep_dir.iterdir()) if d.is_dir()]
    elements = [(d, s) for d, s in elements if s is not None]
    if not elements:
        raise ValueError(f"sweep_dir: {sweep_dir} holds no run dirs named like sigma=2.5,window=64")
    names = list(elements[0][1])
    for d, s in elements:
        if list(s) != names:
            raise ValueError(f"sweep_dir: {d.name} sets {','.join(s)}, the others {','.join(names)}")
    rows, seen = [], []
    for d, settings in elements:
        last: dict[str, Any] = {}
        path = d / "metrics.jsonl"
        for record in read_metrics(path) if path.is_file() else []:
            for key, value in record.items():
                if _is_scalar(value):
                    last[key] = value
        wanted = metrics or [k for k in last if k.startswith(DEFAULT_PREFIXES)]
        seen += [k for k in wanted if k not in seen]
        rows.append({**settings, "step": last.get("step"), **{k: last[k] for k in wanted if k in last}})
    rows.sort(key=lambda r: [_sort_key(r[n]) for n in names])
    return names, list(metrics or seen), rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(names: Sequence[str], metric_names: Sequence[str], rows: Sequence[dict]) -> str:
    """A markdown table: the settings, the last step and the metrics."""
    header = [*names, "step", *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(h)) for h in header) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(names: Sequence[str], metric_names: Sequence[str], rows: Sequence[dict], path: str | Path) -> None:
    """One panel per metric against the first setting; one line per combination of the others."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = max(len(metric_names), 1)
    fig = Figure(figsize=(4.5 * panels, 3.5))
    FigureCanvasAgg(fig)
    x_name, others = names[0], names[1:]
    for i, metric in enumerate(metric_names or ["(no metrics)"]):
        ax = fig.add_subplot(1, panels, i + 1)
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            if row.get(metric) is not None:
                groups.setdefault(tuple(row[n] for n in others), []).append(row)
        for key, members in groups.items():
            members = sorted(members, key=lambda r: _sort_key(r[x_name]))
            xs = [r[x_name] for r in members]
            numeric = all(_sort_key(x)[0] == 0 for x in xs)
            label = ",".join(f"{n}={v}" for n, v in zip(others, key)) or None
            ax.plot([float(x) for x in xs] if numeric else xs, [r[metric] for r in members], marker="o", label=label)
        ax.set_xlabel(x_name)
        ax.set_title(metric)
        if others and groups:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m krause.training.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="the folder holding the array's run dirs")
    parser.add_argument("--metric", action="append", default=None,
                        help="a metric to tabulate (repeatable; default: every test_/val_/eval_ scalar)")
    parser.add_argument("--out", default=None, help="where sweep.md/.csv/.png go (default: the sweep dir)")
    args = parser.parse_args(argv)
    try:
        names, metric_names, rows = collect(args.sweep_dir, args.metric)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(names, metric_names, rows)
    (out / "sweep.md").write_text(table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*names, "step", *metric_names], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (out / "sweep.csv").write_text(buffer.getvalue())
    plot_sweep(names, metric_names, rows, out / "sweep.png")
    print(table, end="")
    print(f"{len(rows)} runs; wrote {out / 'sweep.md'}, sweep.csv, sweep.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
