"""python -m krause.claims: run the paper's claims (see krause/claims/__init__.py)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import CLAIMS
from .common import (SKIPPED, Context, MissingPrerequisite, format_table, markdown_table, machine, report, result,
                     write_json)


def _default_out() -> Path:
    """<checkout>/runs/claims from a source checkout, else ./runs/claims."""
    checkout = Path(__file__).resolve().parents[2]
    base = checkout if (checkout / "pyproject.toml").is_file() and (checkout / "krause").is_dir() else Path.cwd()
    return base / "runs" / "claims"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krause.claims", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--claim", action="append", default=None, metavar="NAME",
                   help=f"run only this claim (repeatable); one of: {', '.join(CLAIMS)}")
    p.add_argument("--tiny", action="store_true", help="CI size: checks the pipeline in seconds, not the numbers")
    p.add_argument("--out_dir", default=str(_default_out()), help="results: <out_dir>/<claim>/result.json + figure")
    p.add_argument("--images_dir", default=None, help="also copy each claim's figure here (e.g. images/claims)")
    p.add_argument("--markdown", default=None, help="also write the claims' tables as markdown to this file")
    p.add_argument("--progress", action="store_true", help="print what each claim is training")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every claim (default: torch's own; 1 helps on an oversubscribed CPU)")
    return p


def select(names: list[str] | None) -> list[str]:
    """The claims to run, in run order; ValueError naming the valid ones for an unknown name."""
    if not names:
        return list(CLAIMS)
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        raise ValueError(f"--claim: unknown claim {', '.join(map(repr, unknown))}; valid claims: {', '.join(CLAIMS)}")
    return [n for n in CLAIMS if n in names]


def run_claim(name: str, root: Path, tiny: bool, progress: bool = False):
    """Runs one claim; a missing prerequisite gives a 'skipped' result saying what is missing."""
    module = CLAIMS[name]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    import torch

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        res = module.run(Context(out_dir=out, root=root, tiny=tiny, progress=progress))
    except MissingPrerequisite as e:
        res = result(module, SKIPPED, reason=str(e))
    finally:
        torch.set_num_threads(threads)  # a family entry point may set its own (the vision demo: 1)
    res.tiny, res.seconds, res.machine = tiny, time.perf_counter() - t0, machine()
    write_json(out / "result.json", res.to_dict())
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = select(args.claim)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.out_dir).expanduser().resolve()
    results, failed = [], []
    for name in names:
        try:
            res = run_claim(name, root, args.tiny, args.progress)
        except Exception as e:  # one claim's failure must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            print(f"== claim {name}: FAILED ({type(e).__name__}: {e})\n", flush=True)
            continue
        results.append(res)
        print(report(res) + "\n", flush=True)
        if args.images_dir and res.figure:
            dest = Path(args.images_dir) / Path(res.figure).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(res.figure, dest)
    summary = [[r.name, r.verdict, r.reason or "; ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in list(r.measured.items())[:3]),
                f"{r.seconds:.0f}"] for r in results] + [[n, "FAILED", "see the traceback above", "-"] for n in failed]
    write_json(root / "summary.json", {"tiny": args.tiny, "machine": machine(), "claims": [r.to_dict() for r in results],
                                       "failed": failed})
    print(format_table(["claim", "verdict", "measured", "seconds"], summary))
    print(f"\nresults: {root}/<claim>/result.json, summary: {root / 'summary.json'}")
    if args.markdown:
        blocks = []
        for r in results:
            blocks.append(f"**{r.name}: {r.title}** ({r.verdict}). {r.comparison}. Paper: {r.expectation}. "
                          f"Rule: {r.rule}. Seeds {r.seeds}.\n")
            if r.headers:
                blocks.append(markdown_table(r.headers, r.rows) + "\n")
        Path(args.markdown).write_text("\n".join(blocks))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
