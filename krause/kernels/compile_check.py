"""Compile every Triton kernel variant the wrappers launch for a CUDA architecture,
ahead of time and without a GPU (Triton ships ptxas), reporting shared memory.

    python -m krause.kernels.compile_check                # sm_90 and sm_80, bf16 and fp32
    python -m krause.kernels.compile_check --arch 90 --dtype bf16

The interpreter runs kernels on CPU but does not compile them, so type errors, globals
that are not constexpr, or tiles too large for shared memory only show up here (or on a
GPU). Needs TRITON_INTERPRET unset in this process. Exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _specs(dtype: str, window: int, head_dim: int, grid, radius: int, num_prefix: int):
    """(label, kernel, pointer types, constexprs) of each launch of the wrappers in ops.py."""
    import triton

    from . import _triton as K
    from . import ops

    t = TRITON_TYPES[dtype]
    prec = "ieee" if dtype == "fp32" else "default"
    bd = ops._pow2(head_dim)
    fwd_ptrs = dict(Q=t, K=t, V=t, QN="*fp32", KN="*fp32", LS="*fp32", KVALID="*i8", O=t, LSE="*fp32", THR="*i64")
    dq_ptrs = {**{k: v for k, v in fwd_ptrs.items() if k != "O"}, "DO": t, "DELTA": "*fp32", "DQ": t, "DCOEF": "*fp32"}
    kv_ptrs = {**{k: v for k, v in dq_ptrs.items() if k not in ("DQ", "DCOEF")}, "DK": t, "DV": t}
    causal = dict(LS_PER_HEAD=True, HAS_VALID=True, GRID=False, CHEB=False, PREC=prec, BLOCK_D=bd)
    full = ops.local2d_blocks(grid, radius, num_prefix)[2]
    grid2d = dict(causal, HAS_VALID=False, GRID=True, CHEB=True)
    specs = []
    for m in tuned_causal_blocks(ops, window):  # every block the autotuners may pick: all must compile
        tile = ops._causal_tile({"W": window}, m)
        specs += [
            (f"causal fwd m{m}", K._fwd_kernel, fwd_ptrs, dict(causal, KMODE=K.CAUSAL_KEYS, BLOCK_M=m, BLOCK_N=tile)),
            (f"causal dq m{m}", K._bwd_dq_kernel, dq_ptrs, dict(causal, KMODE=K.CAUSAL_KEYS, BLOCK_M=m, BLOCK_N=tile)),
            (f"causal dk/dv m{m}", K._bwd_dkdv_kernel, kv_ptrs,
             dict(causal, QMODE=K.CAUSAL_QUERIES, BLOCK_N=m, BLOCK_Q=tile)),
        ]
    for m in tuned_band_blocks(ops, grid[1], radius, num_prefix):
        band = ops._grid_band(grid[1], radius, num_prefix, m)[1]
        specs += [
            (f"2-D fwd m{m}", K._fwd_kernel, fwd_ptrs, dict(grid2d, KMODE=K.GRID_BAND, BLOCK_M=m, BLOCK_N=band)),
            (f"2-D dq m{m}", K._bwd_dq_kernel, dq_ptrs, dict(grid2d, KMODE=K.GRID_BAND, BLOCK_M=m, BLOCK_N=band)),
            (f"2-D dk/dv m{m}", K._bwd_dkdv_kernel, kv_ptrs, dict(grid2d, QMODE=K.GRID_BAND, BLOCK_N=m, BLOCK_Q=band)),
        ]
    return [
        *specs,
        ("2-D prefix fwd", K._fwd_kernel, fwd_ptrs, dict(grid2d, KMODE=K.ALL, BLOCK_M=16, BLOCK_N=full)),
        ("2-D prefix dq", K._bwd_dq_kernel, dq_ptrs, dict(grid2d, KMODE=K.ALL, BLOCK_M=16, BLOCK_N=full)),
        ("2-D prefix dk/dv", K._bwd_dkdv_kernel, kv_ptrs, dict(grid2d, QMODE=K.ALL, BLOCK_N=16, BLOCK_Q=64)),
        ("decode", K._decode_kernel,
         dict(Q=t, K=t, V=t, QN="*fp32", KN="*fp32", LS="*fp32", LENGTHS="*i32", VALID="*i8", O=t),
         dict(LS_PER_HEAD=True, HAS_VALID=True, PREC=prec, BLOCK_M=16, BLOCK_N=ops._pow2(window),
              BLOCK_D=bd)),
    ], triton


def tuned_causal_blocks(ops, window: int) -> list[int]:
    """The blocks the causal kernels' tuners may pick at this window (their tile fits)."""
    return [m for m in ops.TUNED_BLOCKS if ops._causal_tile({"W": window}, m) <= ops.MAX_TILE]


def tuned_band_blocks(ops, cols: int, radius: int, num_prefix: int) -> list[int]:
    """The blocks the 2-D band kernels' tuners may pick for this grid (their tile fits)."""
    return [m for m in ops.TUNED_BLOCKS if ops._grid_band(cols, radius, num_prefix, m)[1] <= ops.MAX_TILE]


def compile_kernel(triton, fn, ptr_types, constexprs, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else ptr_types.get(name, "i32") for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capabilities, e.g. 90 80")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(TRITON_TYPES))
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--grid", type=int, nargs=2, default=[14, 14])
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--num-prefix", type=int, default=1)
    p.add_argument("--only", default=None, help="compile only the kernels whose label contains this")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        print("TRITON_INTERPRET: unset it to compile (the interpreter replaces compiled kernels)", file=sys.stderr)
        return 2
    failures = 0
    for dtype in args.dtype:
        specs, triton = _specs(dtype, args.window, args.head_dim, tuple(args.grid), args.radius, args.num_prefix)
        for arch in args.arch:
            for label, fn, ptrs, consts in specs:
                if args.only and args.only not in label:
                    continue
                start = time.perf_counter()
                try:
                    compiled = compile_kernel(triton, fn, ptrs, consts, arch)
                    print(f"sm_{arch} {dtype:4s} {label:19s} ok   shared {compiled.metadata.shared:6d} B  "
                          f"({time.perf_counter() - start:.1f} s)", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, the others still compile
                    failures += 1
                    print(f"sm_{arch} {dtype:4s} {label:19s} FAILED: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
