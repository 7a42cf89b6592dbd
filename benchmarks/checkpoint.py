"""Checkpoint save / load / verify time and peak host memory of the DCP checkpointer (sync, async).

    python -m benchmarks.checkpoint            # ~100M parameters + AdamW state, 1 and 2 ranks (gloo)
    python -m benchmarks.checkpoint --quick    # ~25M parameters, one repeat

A model of `--blocks` MLP blocks (d -> 4d -> d, ~8 d^2 parameters each) with AdamW state
(two moments: the checkpoint holds ~3x the parameters) is saved and loaded with

- dcp sync:    `Checkpointer.save` / `load` (every rank writes its own shards; `load` verifies
  the sizes and CRC-32s first, each rank a share of the files);
- dcp verify:  `Checkpointer.verify` alone: what the integrity check adds to every load
  (resume and every tool's `load_model_weights` pay it);
- dcp async:   `Checkpointer(async_save=True)`: "blocking" is how long `save` held the
  training loop (the copy to CPU memory); "total" includes the background write.

1 rank: a plain model. 2 ranks: FSDP2 (`apply_fsdp`, sharded state), gloo, one process
per rank on this machine. One checkpointer per kind (its first save is an untimed
warm-up, as the first save of a training run pays one-time costs). Times are medians
over `--repeats`, the slowest rank; peak
host memory is the largest rise of a rank's resident set size (RSS, sampled every 2 ms
by a thread) above its level before the operation, maximum over ranks. RSS counts all
host memory the process touches (staging buffers, serialisation copies), not the page
cache. Target: async blocking time <= 0.3x the sync save time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from benchmarks import _timing as T


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class PeakRSS:
    """Largest RSS rise above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.rise = self.peak - self.base


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import krause.training as kt

    env = kt.init_distributed(device="cpu")
    torch.manual_seed(0)
    model = Net(args.dim, args.blocks)
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        model = kt.apply_fsdp(model, kt.build_mesh("cpu"), blocks="blocks")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.dim)).sum().backward()
    opt.step()  # AdamW moments exist
    opt.zero_grad(set_to_none=True)
    root = Path(out).parent / f"ckpt-{world}"
    results: dict[str, list] = {}

    def measure(name, fn):
        kt.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            extra = fn()
            elapsed = time.perf_counter() - t0
        kt.barrier()
        times = kt.all_gather_object((elapsed, mem.rise, extra))
        results.setdefault(name, []).append(times)

    # one checkpointer per kind, as in training; the first save of each (imports, thread pool,
    # process group for the background writer) is a warm-up and not timed
    app = kt.AppState(model, opt)
    sync = kt.Checkpointer(root / "dcp", keep_latest_k=1)
    asyn = kt.Checkpointer(root / "dcp-async", keep_latest_k=1, async_save=True)
    sync.save(0, app)
    asyn.save(0, app)
    asyn.wait()
    for r in range(1, args.repeats + 1):
        measure("dcp sync save", lambda: sync.save(r, app) and None)
        measure("dcp verify", lambda: sync.verify() and None)
        measure("dcp load", lambda: sync.load(app) and None)

        def async_save():
            info = asyn.save(r, app)
            asyn.wait()
            return info.blocking_s

        measure("dcp async save", async_save)
    asyn.close()
    kt.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        import json

        Path(out).write_text(json.dumps({"params": n_params, "results": results}))
    kt.cleanup(synchronize=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args, tmp: Path) -> dict:
    import json

    out = tmp / f"result-{world}.json"
    mp.start_processes(_worker, args=(world, _free_port(), args, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    raw = json.loads(out.read_text())
    rows = {}
    for name, reps in raw["results"].items():
        slowest = [max(t for t, _, _ in rep) for rep in reps]
        memory = [max(m for _, m, _ in rep) for rep in reps]
        row = {"time_s": statistics.median(slowest), "peak_host_bytes": statistics.median(memory)}
        if name == "dcp async save":
            row["blocking_s"] = statistics.median([max(b for _, _, b in rep) for rep in reps])
        rows[name] = row
    return {"params": raw["params"], "world_size": world, "cases": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~25M parameters, one repeat")
    p.add_argument("--dim", type=int, default=None, help="block width d (default 1024; quick 512)")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    p.add_argument("--worlds", default="1,2", help="rank counts to run, e.g. 1,2")
    p.add_argument("--tmp_dir", default=None, help="where checkpoints are written (default: the system temp dir)")
    p.add_argument("--out", default=None, help="JSON results (default results/checkpoint[_quick].json)")
    args = p.parse_args(argv)
    args.dim = args.dim or (512 if args.quick else 1024)
    args.repeats = args.repeats or (1 if args.quick else 3)
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    if args.dim < 1 or args.blocks < 1 or args.repeats < 1 or not worlds or min(worlds) < 1:
        print("error: --dim, --blocks, --repeats and --worlds must be positive", file=sys.stderr)
        return 2
    out = args.out or f"results/checkpoint{'_quick' if args.quick else ''}.json"
    tmp = Path(tempfile.mkdtemp(prefix="krause-ckpt-bench-", dir=args.tmp_dir))
    try:
        runs = [run_world(w, args, tmp) for w in worlds]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows, verdicts = [], []
    for run in runs:
        cases = run["cases"]
        for name, c in cases.items():
            rows.append([f"{run['world_size']}", name, T.fmt_time(c["time_s"]),
                         T.fmt_time(c.get("blocking_s", c["time_s"])), T.fmt_bytes(c["peak_host_bytes"])])
        ratio = cases["dcp async save"]["blocking_s"] / cases["dcp sync save"]["time_s"]
        run["async_blocking_over_sync_save"] = ratio
        verdicts.append(f"{run['world_size']} rank(s): async blocking / sync save = {ratio:.2f} "
                        f"({'met' if ratio <= 0.3 else 'missed'}: target <= 0.30)")
    machine = T.machine_info("cpu")
    print(T.describe_machine(machine))
    print(f"{runs[0]['params'] / 1e6:.1f}M parameters + AdamW state, {args.repeats} repeat(s)")
    print(T.table(["ranks", "case", "time", "blocking", "peak host memory"], rows))
    for v in verdicts:
        print(v)
    payload = {"settings": vars(args), "machine": machine, "runs": runs}
    T.write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
