"""Comparison table of ``lora_llms.evaluate`` results: one row per task metric, one column per model.

    python -m lora_llms.report results/base.json results/lora.json results/krause.json --out results/comparison

writes ``comparison.md`` and ``comparison.csv`` (scores in percent, lm-eval's metric names).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from krause.training.entry import OneLineParser, entry_point
from krause.training.errors import UsageError


def _metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's "metric,filter" entries of one task, numbers only, stderr and aliases dropped."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[key] = float(value)
    return out


def collect(paths) -> tuple[list[str], list[tuple[str, str]], dict]:
    """(labels, [(task, metric)], {(task, metric): {label: value}})."""
    labels, rows, table = [], [], {}
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except ValueError as e:
            raise ValueError(f"results: {path} is not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
            raise ValueError(f"results: {path} is not a lora_llms.evaluate result (no 'results' table)")
        label = record.get("label") or Path(path).stem
        if label in labels:
            raise ValueError(f"results: label {label!r} appears twice ({path})")
        labels.append(label)
        for task, res in record["results"].items():
            for metric, value in _metrics(res).items():
                key = (task, metric)
                if key not in table:
                    rows.append(key)
                    table[key] = {}
                table[key][label] = value
    return labels, rows, table


def write_tables(paths, out_prefix) -> tuple[Path, Path]:
    labels, rows, table = collect(paths)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    fmt = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    md = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for task, metric in rows:
        md.append(f"| {task} | {metric} | " + " | ".join(fmt(table[(task, metric)].get(l)) for l in labels) + " |")
    md_path = out_prefix.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    csv_path = out_prefix.with_suffix(".csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "metric", *labels])
        for task, metric in rows:
            writer.writerow([task, metric, *(fmt(table[(task, metric)].get(l)) for l in labels)])
    return md_path, csv_path


@entry_point
def main(argv=None) -> int:
    p = OneLineParser(prog="python -m lora_llms.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by lora_llms.evaluate")
    p.add_argument("--out", required=True, help="output path prefix (.md and .csv are added)")
    args = p.parse_args(argv)
    missing = [r for r in args.results if not Path(r).is_file()]
    if missing:
        raise UsageError(f"results: no such file(s) {missing}")
    md, csv_path = write_tables(args.results, args.out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
