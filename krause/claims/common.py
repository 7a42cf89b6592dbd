"""What every claim shares: its result record, the verdict rule, tables, JSON and figures.

A claim module defines ``NAME``, ``TITLE``, ``COMPARISON`` (what is held equal and what
differs), ``EXPECTATION`` (the paper's statement), ``RULE`` (the agree/disagree test, in
words, fixed in code before any run) and ``run(ctx) -> ClaimResult``; it raises
:class:`MissingPrerequisite` when something it needs (a compiler, a corpus, a file of the
checkout) is not there, which skips that claim alone.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from krause.training.atomic import atomic_file

AGREE, DISAGREE, SKIPPED = "agree", "disagree", "skipped"


class MissingPrerequisite(RuntimeError):
    """Something a claim needs is missing; the message says what (the claim is skipped)."""


@dataclass
class Context:
    """Where a claim writes and how big it runs."""

    out_dir: Path          # this claim's own folder (created)
    root: Path             # the run's folder (claims may read a sibling claim's outputs)
    tiny: bool = False     # CI size: checks the pipeline, not the numbers
    progress: bool = False

    def sibling(self, name: str) -> Path:
        return self.root / name


@dataclass
class ClaimResult:
    name: str
    title: str
    comparison: str
    expectation: str
    rule: str
    verdict: str                      # agree / disagree / skipped
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)   # the numbers the verdict reads
    seeds: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)    # everything else worth keeping
    figure: str | None = None
    reason: str | None = None         # why skipped
    tiny: bool = False
    seconds: float = 0.0
    machine: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(condition: bool) -> str:
    return AGREE if condition else DISAGREE


def result(module, verdict_value: str, **fields) -> ClaimResult:
    """A ClaimResult carrying the module's fixed statement (name, comparison, expectation, rule)."""
    return ClaimResult(name=module.NAME, title=module.TITLE, comparison=module.COMPARISON,
                       expectation=module.EXPECTATION, rule=module.RULE, verdict=verdict_value, **fields)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:{fmt}} ± {s:{fmt}}"


def machine() -> str:
    import torch

    from ..training.throughput import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(res: ClaimResult) -> str:
    """The text a claim prints: statement, table, verdict."""
    lines = [f"== claim {res.name}: {res.title}{' (--tiny: checks the pipeline, not the numbers)' if res.tiny else ''}"]
    if res.verdict == SKIPPED:
        lines.append(f"skipped: {res.reason}")
        return "\n".join(lines)
    lines += [f"comparison:  {res.comparison}", f"paper:       {res.expectation}", f"rule:        {res.rule}",
              f"seeds:       {res.seeds}", f"machine:     {res.machine}", ""]
    if res.headers:
        lines += [format_table(res.headers, res.rows), ""]
    measured = ", ".join(f"{k} = {_short(v)}" for k, v in res.measured.items())
    lines.append(f"measured:    {measured}")
    lines.append(f"verdict:     this run {'AGREES with' if res.verdict == AGREE else 'DISAGREES with'} the paper"
                 + (" (--tiny: a pipeline check, not evidence)" if res.tiny else ""))
    if res.figure:
        lines.append(f"figure:      {res.figure}")
    lines.append(f"time:        {res.seconds:.1f} s")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(v: Any):
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def new_figure(ncols: int = 1, width: float = 6.5, height: float = 4.2):
    """(figure, axes) on matplotlib's object API (no pyplot state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)

