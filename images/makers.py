"""The makers behind the README figures: each runs its own family's code on embedded data.

A maker is ``maker(out_dir: Path, work_dir: Path, quick: bool) -> str | None``: it writes
the files its gallery entry lists into ``out_dir`` (scratch runs go under ``work_dir``) and
may return a one-line note on what it ran (shown in the manifest). ``quick`` means the
smallest configuration that still exercises the real code path (tests), not a figure
anyone should read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"expected figure {src} was not written")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _check(rc, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} exited with status {rc}")


# --------------------------------------------------------------------------- dynamics
def dynamics(out_dir: Path, work_dir: Path, quick: bool) -> str:
    """Standard vs Krause particles on the circle and the sphere (krause.dynamics)."""
    from krause.dynamics.__main__ import main

    anim = ["--n", "24", "--steps", "40", "--frames", "6"] if quick else []
    _check(main(["animate", "--out_dir", str(work_dir), *anim]), "krause.dynamics animate")
    sweep = ["--n", "24", "--steps", "40"] if quick else ["--n", "200", "--steps", "500"]
    _check(main(["sweep", "--attention", "krause", "--out_dir", str(work_dir / "krause_sweep"), *sweep,
                 *(["--sigmas", "0.1,1", "--top_ks", "2,8"] if quick else [])]), "krause.dynamics sweep (Krause)")
    _check(main(["sweep", "--attention", "standard", "--out_dir", str(work_dir / "standard_sweep"), *sweep,
                 *(["--betas", "1,16"] if quick else [])]), "krause.dynamics sweep (standard)")
    for name in ("dynamics_circle.gif", "dynamics_sphere.gif", "dynamics_snapshots.png"):
        _copy(work_dir / name, out_dir / name)
    _copy(work_dir / "clusters_vs_time.png", out_dir / "dynamics_clusters_vs_time.png")
    _copy(work_dir / "krause_sweep" / "phase_diagram.png", out_dir / "dynamics_phase_diagram.png")
    _copy(work_dir / "standard_sweep" / "beta_sweep.png", out_dir / "dynamics_beta_sweep.png")
    seconds = json.loads((work_dir / "dynamics.json").read_text())["seconds_total"]
    return f"animate (simulations + GIFs + snapshots) took {seconds:.1f} s"


# --------------------------------------------------------------------------- vision
def vision_attention(out_dir: Path, work_dir: Path, quick: bool) -> str:
    """KViT vs ViT on the embedded MNIST digits (vision_transformers.demo): attention per layer, curves, sigma."""
    from vision_transformers import demo

    if quick:
        argv = ["--epochs", "1", "--train_subset", "64", "--val_subset", "16", "--embed_dim", "32", "--depth", "2",
                "--num_heads", "2", "--batch_size", "32"]
    else:
        argv = ["--epochs", "4"]
    _check(demo.main(["--out_dir", str(work_dir), "--no_progress", *argv]), "vision_transformers.demo")
    for name in ("attention", "curves", "sigma"):
        _copy(work_dir / "figures" / f"{name}.png", out_dir / f"vision_{name}.png")
    return "vision_transformers.demo " + " ".join(argv)


# --------------------------------------------------------------------------- pixel generation
def completions(out_dir: Path, work_dir: Path, quick: bool) -> str:
    """A small KARM trained briefly on the embedded MNIST digits, then sampled and completed."""
    from autoregressive_transformers import complete, generate, train

    size = (["--dim", "32", "--num_layers", "1", "--num_heads", "2", "--max_steps", "2", "--limit_train", "64",
             "--limit_test", "4"] if quick else
            ["--dim", "64", "--num_layers", "2", "--num_heads", "4", "--max_steps", "300", "--limit_test", "64"])
    run = work_dir / "karm"
    _check(train.main(["--attn", "krause", "--batch_size", "16", "--lr", "3e-3", "--log_every", "25",
                       "--out_dir", str(run), "--overwrite", "--device", "cpu", "--no_progress", *size]),
           "autoregressive_transformers.train")
    n_samples, n_images, per_image = ("2", "2", "2") if quick else ("16", "6", "4")
    _check(generate.main(["--run_dir", str(run), "--checkpoint", "last", "--num_samples", n_samples,
                          "--batch_size", n_samples, "--device", "cpu", "--tag", "gallery", "--no_progress"]),
           "autoregressive_transformers.generate")
    _check(complete.main(["--run_dir", str(run), "--checkpoint", "last", "--num_images", n_images,
                          "--num_samples", per_image, "--device", "cpu", "--tag", "gallery", "--no_progress"]),
           "autoregressive_transformers.complete")
    _copy(run / "completions" / "completion_gallery.png", out_dir / "ar_completions.png")
    _copy(run / "samples" / "samples_gallery.png", out_dir / "ar_samples.png")
    steps = size[size.index("--max_steps") + 1]
    return f"KARM {' '.join(size[:6])}, {steps} training steps"


# --------------------------------------------------------------------------- benchmarks
def _benchmark_source(work_dir: Path, quick: bool) -> tuple[Path, str]:
    """The newest full benchmark JSON in results/, else a fresh quick causal run."""
    for name in ("attention_scaling.json", "attention_scaling_quick.json"):
        path = CHECKOUT / "results" / name
        if path.is_file() and not quick:
            return path, f"from results/{name}"
    import subprocess
    import sys

    out = work_dir / "attention_scaling_quick.json"
    extra = ["--causal-tokens", "128", "256", "--repeats", "1", "--skip-memory"] if quick else []
    cmd = [sys.executable, "-m", "benchmarks.attention_scaling", "--quick", "--only", "causal",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=CHECKOUT, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"benchmarks/attention_scaling.py exited with status {proc.returncode}: {tail[0]}")
    return out, "from a fresh `python -m benchmarks.attention_scaling --quick --only causal` run"


def benchmark(out_dir: Path, work_dir: Path, quick: bool) -> str:
    """Causal Krause attention vs its dense reference and SDPA: time and memory against length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path, source = _benchmark_source(work_dir, quick)
    data = json.loads(path.read_text())
    rows = data.get("causal") or []
    if not rows:
        raise ValueError(f"{path} has no causal rows")
    labels = {"krause": "Krause (linear-time op)", "reference": "dense reference", "sdpa": "SDPA causal (full)",
              "flex": "FlexAttention (window)"}
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    panels = [("median_s", "forward + backward time (s)"), ("peak_bytes", "peak memory (MiB)")]
    for i, (key, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, label in labels.items():
            pts = [(r["T"], r["results"].get(name, {}).get(key)) for r in rows]
            pts = [(t, v / 2**20 if key == "peak_bytes" else v) for t, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=ylabel)
        lengths = [r["T"] for r in rows]
        ax.set_xticks(lengths, [f"{t:,}" for t in lengths])
        ax.minorticks_off()
        ax.xaxis.set_tick_params(which="minor", bottom=False)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    machine = data.get("machine", {})
    r0 = rows[0]
    desc = machine.get("gpu") or f"{machine.get('cpu_model', 'CPU')}, {machine.get('cpu_count', '?')} cores"
    fig.suptitle(f"causal attention, B={r0.get('batch')}, H={r0.get('heads')}, D={r0.get('head_dim')}, "
                 f"W={r0.get('window')}, top_k={r0.get('top_k')} ({'quick run, ' if data.get('quick') else ''}"
                 f"{desc})", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "benchmark_causal.png", dpi=110)
    return source
