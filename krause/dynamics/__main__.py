"""Standard vs Krause attention dynamics of particles on the unit sphere.

    python -m krause.dynamics animate                  # GIFs, snapshots, JSON (circle + sphere) in runs/dynamics/animate
    python -m krause.dynamics measure --attention krause --n 10000 --d 3 --steps 100 --out_dir runs/dyn10k
    python -m krause.dynamics sweep --attention krause --sigmas 0.1,0.3,1 --top_ks 4,16,64 --out_dir runs/sweep
    python -m krause.dynamics sweep --attention standard --betas 0.5,1,4,16 --out_dir runs/sweep

Integrator: explicit Euler on the tangent projection of the attention output, then
renormalisation onto the sphere (step ``--dt``, horizon ``--steps * --dt``). Clusters:
single linkage on angular distance below ``--tol`` radians. Every command writes JSON
and figures into ``--out_dir`` (default ``runs/dynamics/COMMAND``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .animate import animate_pair, describe, plot_beta_sweep, plot_clusters_vs_time, plot_phase_diagram, plot_snapshots
from .measure import summarise, sweep
from .particles import DynamicsConfig, simulate, validate

DEFAULTS = DynamicsConfig()


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def _radius(text: str):
    return None if text.lower() in ("none", "inf") else float(text)


def _common(p: argparse.ArgumentParser, steps: int = DEFAULTS.steps) -> None:
    p.add_argument("--out_dir", default=None, help="where the JSON and figures go (default: runs/dynamics/COMMAND)")
    p.add_argument("--n", type=int, default=DEFAULTS.n, help="particles (>= 2)")
    p.add_argument("--steps", type=int, default=steps, help="Euler steps (>= 1)")
    p.add_argument("--dt", type=float, default=DEFAULTS.dt, help="Euler step size")
    p.add_argument("--beta", type=float, default=DEFAULTS.beta, help="standard attention: inverse temperature (>= 0)")
    p.add_argument("--sigma", type=float, default=DEFAULTS.sigma, help="Krause: RBF width (> 0)")
    p.add_argument("--top_k", type=int, default=DEFAULTS.top_k, help="Krause: nearest particles kept (>= 1)")
    p.add_argument("--radius", type=_radius, default=DEFAULTS.radius,
                   help="Krause: bounded-confidence radius, chord distance (default: none, every particle)")
    p.add_argument("--weight_scale", type=float, default=DEFAULTS.weight_scale,
                   help="0: identity Q, K, V; else fixed I + scale * Gaussian / sqrt(d)")
    p.add_argument("--tol", type=float, default=DEFAULTS.tol, help="clustering tolerance (angle, radians)")
    p.add_argument("--record_every", type=int, default=DEFAULTS.record_every, help="measure every this many steps")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initial positions")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krause.dynamics", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("animate", help="standard vs Krause side by side: GIFs, snapshot panels, JSON")
    _common(a)
    a.add_argument("--dims", type=_csv(int), default=[2, 3], help="2 (circle) and/or 3 (sphere)")
    a.add_argument("--frames", type=int, default=60, help="GIF frames (spaced quadratically in time)")
    a.add_argument("--fps", type=int, default=12)
    a.set_defaults(record_every=2)
    m = sub.add_parser("measure", help="one run, any dimension, measurements only (no positions kept)")
    _common(m)
    m.add_argument("--attention", choices=["standard", "krause"], default="krause")
    m.add_argument("--d", type=int, default=3, help="dimension of the ambient space (sphere S^{d-1}), >= 2")
    s = sub.add_parser("sweep", help="final clusters / consensus over beta (standard) or sigma x top_k x radius")
    _common(s, steps=500)
    s.add_argument("--attention", choices=["standard", "krause"], default="krause")
    s.add_argument("--d", type=int, default=2, help="dimension of the ambient space, >= 2")
    s.add_argument("--betas", type=_csv(float), default=[0.25, 1, 4, 16, 64])
    s.add_argument("--sigmas", type=_csv(float), default=[0.1, 0.3, 1.0])
    s.add_argument("--top_ks", type=_csv(int), default=[2, 4, 8, 16, 32, 64])
    s.add_argument("--radii", type=_csv(_radius), default=[None])
    return p


def _base(args, attention: str, d: int) -> DynamicsConfig:
    return validate(DynamicsConfig(attention=attention, n=args.n, d=d, steps=args.steps, dt=args.dt, beta=args.beta,
                                   sigma=args.sigma, top_k=args.top_k, radius=args.radius,
                                   weight_scale=args.weight_scale, seed=args.seed, tol=args.tol,
                                   record_every=args.record_every, device=args.device))


def _line(label: str, s: dict) -> str:
    sizes = s["final_cluster_sizes"]
    shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
    return (f"{label:<40} clusters {s['cluster_counts'][0]:>5} -> {s['final_clusters']:<4} consensus "
            f"{s['consensus']:<24} sizes [{shown}]  ({s['seconds']:.1f} s)")


def _write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def cmd_animate(args, out: Path) -> list[Path]:
    for d in args.dims:
        if d not in (2, 3):
            raise ValueError(f"--dims: animation needs d in {{2, 3}}, got {d}")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2, got {args.frames}")
    if args.fps < 1:
        raise ValueError(f"--fps must be >= 1, got {args.fps}")
    t0 = time.perf_counter()
    written, summaries, rows, runs = [], {}, [], {}
    for d in args.dims:
        shape = "circle" if d == 2 else "sphere"
        pair = [simulate(_base(args, att, d)) for att in ("standard", "krause")]
        for traj in pair:
            label = f"{describe(traj.config)} ({shape})"
            summaries[label] = summarise(traj)
            print(_line(label, summaries[label]), flush=True)
        rows += pair
        runs[shape] = pair
        written.append(animate_pair(pair, out / f"dynamics_{shape}.gif", frames=args.frames, fps=args.fps))
    written.append(plot_snapshots(rows, out / "dynamics_snapshots.png"))
    written.append(plot_clusters_vs_time(summaries, out / "clusters_vs_time.png",
                                         title=f"clusters over time, N={args.n}"))
    payload = {"command": "animate", "runs": summaries, "seconds_total": time.perf_counter() - t0,
               "files": [p.name for p in written]}
    written.append(_write_json(out / "dynamics.json", payload))
    print(f"total {payload['seconds_total']:.1f} s")
    return written


def cmd_measure(args, out: Path) -> list[Path]:
    traj = simulate(_base(args, args.attention, args.d), keep_positions=False)
    s = summarise(traj)
    label = f"{describe(traj.config)} (N={args.n}, d={args.d})"
    print(_line(label, s))
    return [_write_json(out / "measure.json", s),
            plot_clusters_vs_time({label: s}, out / "clusters_vs_time.png", title=f"clusters over time, {label}")]


def cmd_sweep(args, out: Path) -> list[Path]:
    base = _base(args, args.attention, args.d)
    if args.attention == "standard":
        axes = {"beta": args.betas}
    else:
        axes = {"sigma": args.sigmas, "top_k": args.top_ks, "radius": args.radii}
    for name, values in axes.items():
        for v in values:
            validate(replace(base, **{name: v}))

    def progress(i, total, point, s):
        print(_line(f"[{i}/{total}] " + ", ".join(f"{k}={v}" for k, v in point.items()), s), flush=True)

    records = sweep(base, progress=progress, **axes)
    written = [_write_json(out / f"sweep_{args.attention}.json",
                           {"command": "sweep", "axes": axes, "records": records})]
    curves = {", ".join(f"{k}={v}" for k, v in r["point"].items()): r for r in records}
    if args.attention == "standard":
        written.append(plot_beta_sweep(records, out / "beta_sweep.png"))
    else:
        first_radius = [r for r in records if r["point"]["radius"] == args.radii[0]]
        written.append(plot_phase_diagram(first_radius, out / "phase_diagram.png"))
    written.append(plot_clusters_vs_time(curves, out / f"sweep_{args.attention}_clusters_vs_time.png",
                                         title=f"{args.attention} attention sweep, N={args.n}, d={args.d}"))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.out_dir or Path("runs") / "dynamics" / args.command).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        written = {"animate": cmd_animate, "measure": cmd_measure, "sweep": cmd_sweep}[args.command](args, out)
    except ValueError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
