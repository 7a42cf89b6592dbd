"""Regenerates every figure of the top-level README into images/.

    python -m images.make_all                 # all figures (small configs on embedded data)
    python -m images.make_all --only dynamics,benchmark
    python -m images.make_all --quick --out_dir /tmp/gallery   # smallest configs (tests)
    bash scripts/make_figures.sh              # the same through the project's venv

Each gallery entry names the files it writes and a maker, ``"module:function"``, resolved
when it runs: an entry whose module or function does not exist yet is reported as "not yet
available" (with the reason), never skipped silently. A family adds its figure with one
``GalleryEntry`` below and a maker ``f(out_dir, work_dir, quick) -> note`` in its own
package (see ``images/makers.py`` for the contract). ``images/gallery.json`` records what
was made, by which command, and what is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGES = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GalleryEntry:
    name: str
    maker: str                 # "package.module:function"
    files: tuple[str, ...]     # written into the output folder
    caption: str               # one line: what the figure shows
    command: str               # the family command behind it


REGISTRY: tuple[GalleryEntry, ...] = (
    GalleryEntry(
        "dynamics", "images.makers:dynamics",
        ("dynamics_circle.gif", "dynamics_sphere.gif", "dynamics_snapshots.png", "dynamics_clusters_vs_time.png",
         "dynamics_phase_diagram.png", "dynamics_beta_sweep.png"),
        "200 particles under standard (softmax) vs Krause attention dynamics on the circle and the sphere; "
        "clusters over time; final clusters over sigma x top-k and over beta",
        "python -m krause.dynamics animate / sweep"),
    GalleryEntry(
        "vision_attention", "images.makers:vision_attention",
        ("vision_attention.png", "vision_curves.png", "vision_sigma.png"),
        "ViT vs KViT trained briefly on the embedded MNIST digits: head-averaged attention of the CLS token and "
        "two patches per layer, train/test curves, sigma per layer",
        "python -m vision_transformers.demo --epochs 4"),
    GalleryEntry(
        "completions", "images.makers:completions",
        ("ar_completions.png", "ar_samples.png"),
        "a small KARM trained for 300 steps on the embedded MNIST digits: top halves completed 4 times each, "
        "and unconditional samples",
        "python -m autoregressive_transformers.train / generate / complete"),
    GalleryEntry(
        "benchmark", "images.makers:benchmark",
        ("benchmark_causal.png",),
        "causal Krause attention vs its dense reference and SDPA: forward + backward time and peak memory "
        "against sequence length",
        "python -m benchmarks.attention_scaling"),
    GalleryEntry(
        "attention_sinks", "lora_llms.gallery:attention_sinks",
        ("attention_sinks.png",),
        "attention on token 0 per layer, standard vs Krause LLM",
        "python -m lora_llms.sinks analyze / plot"),
    GalleryEntry(
        "lm_curves", "language_models_100m.gallery:lm_curves",
        ("lm_curves.png",),
        "validation loss of the from-scratch language models, standard vs Krause",
        "python -m language_models_100m.train"),
)


def resolve(entry: GalleryEntry):
    """The maker function, or a one-line reason why it is not available yet."""
    module_name, _, func_name = entry.maker.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None, f"module {module_name} does not exist yet"
        raise
    fn = getattr(module, func_name, None)
    if fn is None:
        return None, f"{module_name} has no function {func_name} yet"
    return fn, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m images.make_all", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out_dir", default=str(IMAGES), help="where the figures go (default: this images/ folder)")
    p.add_argument("--work_dir", default=None, help="scratch runs (default: a temporary folder, removed after)")
    p.add_argument("--only", default=None, help="comma-separated entry names (default: all)")
    p.add_argument("--quick", action="store_true", help="smallest configs: checks the pipeline, figures not meant to be read")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--list", action="store_true", help="print the registry and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = [e.name for e in REGISTRY]
    if args.list:
        for e in REGISTRY:
            fn, why = resolve(e)
            print(f"{e.name:<18} {'available' if fn else 'not yet available: ' + why:<60} {', '.join(e.files)}")
        return 0
    selected = names if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in selected if s not in names]
    if unknown or not selected:
        print(f"error: --only: unknown entries {unknown or selected}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"error: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.work_dir).expanduser().resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gallery_"))
    manifest_path = out_dir / "gallery.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    entries = manifest.get("entries", {})
    failed = []
    try:
        for entry in REGISTRY:
            if entry.name not in selected:
                continue
            record = {**asdict(entry), "quick": args.quick}
            fn, why = resolve(entry)
            if fn is None:
                record.update(status="not yet available", reason=why)
                print(f"[{entry.name}] not yet available: {why}", flush=True)
            else:
                print(f"[{entry.name}] making {', '.join(entry.files)} ...", flush=True)
                t0 = time.perf_counter()
                try:
                    work = scratch / entry.name
                    work.mkdir(parents=True, exist_ok=True)
                    note = fn(out_dir, work, args.quick)
                    missing = [f for f in entry.files if not (out_dir / f).is_file()]
                    if missing:
                        raise FileNotFoundError(f"maker did not write {', '.join(missing)}")
                    record.update(status="made", note=note, seconds=round(time.perf_counter() - t0, 1))
                    print(f"[{entry.name}] made in {record['seconds']} s{': ' + note if note else ''}", flush=True)
                except Exception as e:  # one entry failing must not hide the others; reported and counted
                    traceback.print_exc()
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    record.update(status="failed", reason=f"{type(e).__name__}: {first}")
                    failed.append(entry.name)
            entries[entry.name] = record
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    manifest = {"command": "python -m images.make_all" + (" --quick" if args.quick else ""),
                "entries": {n: entries[n] for n in names if n in entries}}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print("\nsummary:")
    for n in selected:
        r = entries[n]
        detail = ", ".join(r["files"]) if r["status"] == "made" else r.get("reason", "")
        print(f"  {n:<18} {r['status']:<18} {detail}")
    print(f"manifest: {manifest_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
