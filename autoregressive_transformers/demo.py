"""A few-minute CPU demo on the embedded MNIST digits: train a small KARM, then sample
and complete digits with its window cache.

    python -m autoregressive_transformers.demo --out_dir runs/ar_demo

Steps: ``train`` (a 2-layer, dim-64 KARM for --steps steps; the paper model is the
default of ``train``), ``generate`` (16 samples) and ``complete`` (8 test digits, top
half given, 4 completions each). Everything lands in --out_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

from krause.training.entry import entry_point
from krause.training.ranges import POSITIVE_INT, check_namespace

from . import complete, generate, train
from .common import run_main
from .config import OneLineParser


@entry_point
def main(argv=None) -> int:
    p = OneLineParser(prog="python -m autoregressive_transformers.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--attn", default="krause", help="krause, vanilla or linear")
    p.add_argument("--steps", type=POSITIVE_INT, default=400)
    p.add_argument("--limit_test", type=POSITIVE_INT, default=None,
                   help="score the first N test digits only (default: all 1,000; the evaluations dominate short runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no_progress", action="store_true")
    args = check_namespace(p.parse_args(argv), p)
    out = Path(args.out_dir).expanduser().resolve()
    common = ["--device", args.device] + (["--no_progress"] if args.no_progress else [])
    status = train.main(["--attn", args.attn, "--dim", "64", "--num_layers", "2", "--num_heads", "4",
                         "--batch_size", "16", "--max_steps", str(args.steps), "--lr", "3e-3",
                         "--eval_every", str(max(1, args.steps // 4)), "--log_every", "25",
                         "--out_dir", str(out), "--resume", *common,
                         *(["--limit_test", str(args.limit_test)] if args.limit_test else [])])
    if status:
        return status
    generate.main(["--run_dir", str(out), "--num_samples", "16", "--batch_size", "16", *common])
    complete.main(["--run_dir", str(out), "--num_images", "8", "--num_samples", "4", *common])
    results = json.loads((out / "results.json").read_text())
    print(f"demo done: {results['model']} test bpd {results['test_bpd']:.3f} after {results['steps']} steps; "
          f"see {out}/samples and {out}/completions")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
