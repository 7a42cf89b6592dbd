"""Write the GPU verification record that lets ``impl="auto"`` pick the Triton kernels.

    python -m krause.kernels.verify --out OUT/verification.json --tests-passed 1 [--install]

Measures the kernels' largest error against the dense reference (output and gradients,
fp32, causal with GQA and padding, 2-D with a prefix token) and their fwd+bwd time beside
the engine's, and writes one record: device, CUDA capability, torch / triton / CUDA
versions, max errors, speed, and ``passed`` = the kernel tests passed (--tests-passed, from
scripts/gpu_check.sh) and every error is within tolerance on a CUDA device. ``--install``
adds it to the records ``krause.dispatch`` reads (``dispatch.verification_paths()[0]``),
replacing an earlier record of the same device and Triton version. Run without a GPU
(TRITON_INTERPRET=1, ``--tiny``) it writes a record that never verifies anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

TOLERANCE = 1e-3  # fp32 kernels against the fp32 reference, relative to each tensor's scale


def _errors(fn, leaves, grad_out) -> dict[str, float]:
    """Largest |triton - reference| of the output and each gradient, relative to its scale."""
    results = {}
    for impl in ("triton", "reference"):
        xs = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = fn(*xs, impl)
        grads = torch.autograd.grad(out, xs, grad_out)
        results[impl] = [out.detach(), *grads]
    names = ("out", "dq", "dk", "dv", "dlog_sigma")
    return {n: float((a - b).abs().max() / max(1.0, float(b.abs().max())))
            for n, a, b in zip(names, results["triton"], results["reference"])}


def _time_ms(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(device: str, tiny: bool) -> dict:
    import krause

    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = (1, 2, 1, 24, 8) if tiny else (2, 8, 2, 1024, 64)
    window, top_k = (6, 3) if tiny else (256, 32)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rnd(b, h, t, d), rnd(b, hkv, t, d), rnd(b, hkv, t, d)
    ls = (torch.rand(h, generator=g) * 0.5).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[0, : t // 4] = False

    def causal(q_, k_, v_, ls_, impl):
        return krause.causal_krause_attention(q_, k_, v_, ls_, window, top_k, key_padding_mask=mask, impl=impl)

    grid = (4, 5) if tiny else (14, 14)
    n = 1 + grid[0] * grid[1]
    q2, k2, v2 = rnd(b, h, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)

    def local(q_, k_, v_, ls_, impl):
        return krause.local_krause_attention_2d(q_, k_, v_, ls_, grid, 2, "chebyshev", 8, 1, impl=impl)

    errors = {"causal": _errors(causal, [q, k, v, ls], rnd(b, h, t, d)),
              "local2d": _errors(local, [q2, k2, v2, ls], rnd(b, h, n, d))}
    speed = {"shape": f"causal B={b} H={h} Hkv={hkv} T={t} D={d} W={window} k={top_k}, fwd+bwd, ms"}
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, ls)]
    for impl in ("triton", "fast"):
        speed[impl] = _time_ms(lambda: causal(*leaves, impl).sum().backward(), 1 if tiny else 10)
    return {"max_abs_error": errors, "speed": speed}


def record(tests_passed: bool, tiny: bool) -> dict:
    import triton

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    measured = measure(device, tiny)
    worst = max(e for errs in measured["max_abs_error"].values() for e in errs.values())
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)",
        "capability": list(torch.cuda.get_device_capability()) if on_gpu else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests_passed": tests_passed,
        "tolerance": TOLERANCE,
        "passed": bool(on_gpu and tests_passed and worst <= TOLERANCE),
        **measured,
    }


def install(rec: dict, path: str) -> None:
    """Adds ``rec`` to the records at ``path``, replacing one of the same device and triton."""
    try:
        with open(path) as f:
            records = json.load(f).get("records", [])
    except (OSError, ValueError):
        records = []
    records = [r for r in records if (r.get("device"), r.get("triton")) != (rec["device"], rec["triton"])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from krause.training.atomic import atomic_file

    with atomic_file(path, "w") as f:
        json.dump({"records": [*records, rec]}, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where to write this run's record")
    p.add_argument("--tests-passed", type=int, choices=[0, 1], required=True)
    p.add_argument("--install", action="store_true", help="add the record to the ones krause.dispatch reads")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the interpreter)")
    args = p.parse_args(argv)
    rec = record(bool(args.tests_passed), args.tiny)
    with open(args.out, "w") as f:
        json.dump({"records": [rec]}, f, indent=2)
    if args.install:
        from ..dispatch import verification_paths

        install(rec, verification_paths()[0])
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
