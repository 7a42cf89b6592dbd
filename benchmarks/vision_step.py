"""Train-step time, peak memory and FLOPs per image: KViT vs its ViT twin, side by side.

    python -m benchmarks.vision_step                    # CPU: ViT-S/KViT-S at CIFAR (N=65) and ImageNet (N=197) shapes
    python -m benchmarks.vision_step --quick            # smoke run, well under a minute
    python -m benchmarks.vision_step --device cuda      # GPU, larger batches; add --amp bf16
    python -m benchmarks.vision_step --out results/vision_step.json

Cases (full-size models from the registry, random data):
  CIFAR     vit_small_patch4_32 vs kvit_small_patch4_32: 32x32 images, 4x4 patches, N = 65 tokens
  ImageNet  vit_small_patch16_224_twin vs kvit_small_patch16_224: 224x224, 16x16 patches, N = 197

A train step is what the training loop runs: forward, soft-target cross-entropy, backward,
grad-clip and an AdamW step. Steps are timed in interleaved rounds (ViT, KViT, ViT, ...;
median of the rounds), so a slow phase of a shared machine hits both models alike; the
ratio KViT / ViT is the number to read. Peak memory (tensor bytes above what was live
before the step) is measured in a separate, untimed step (benchmarks/_timing.py says how).
FLOPs per image come from FlopCounterMode with the krause package's sparse Krause formulas:
forward, forward + backward, and the part spent in attention itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


from benchmarks import _timing as T

from vision_transformers import analysis
from vision_transformers.models import create

SHAPES = {
    "cifar": dict(label="CIFAR 32/4 (N=65)", vit="vit_small_patch4_32", kvit="kvit_small_patch4_32"),
    "imagenet": dict(label="ImageNet 224/16 (N=197)", vit="vit_small_patch16_224_twin", kvit="kvit_small_patch16_224"),
}
BATCH = {  # (cpu, cuda) batch per shape; --quick uses the first of each halved
    "cifar": (32, 256),
    "imagenet": (8, 128),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default="cifar,imagenet", help="comma-separated subset of: " + ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="batch size for every shape (default per shape/device)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 2)")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--quick", action="store_true", help="small batches, 2 rounds: a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON output path (default: results/vision_step[_quick].json)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--depth", type=int, default=None, help="override the ViT depth (a smoke run of the plumbing)")
    return p.parse_args(argv)


def make_step(model, x, y, amp: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if amp == "bf16" else None

    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = torch.sum(-y * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def bench_shape(name: str, args, device: torch.device) -> dict:
    spec = SHAPES[name]
    batch = args.batch or BATCH[name][device.type == "cuda"]
    if args.quick and args.batch is None:
        batch = max(2, BATCH[name][0] // 4)
    repeats = args.repeats or (2 if args.quick else 7)
    torch.manual_seed(0)
    models, steps, flops = {}, {}, {}
    for kind in ("vit", "kvit"):
        torch.manual_seed(0)  # twins: identical shared weights
        models[kind] = create(spec[kind], **({"depth": args.depth} if args.depth else {})).to(device).train()
        flops[kind] = analysis.flops_per_image(models[kind], device, backward=True)
    c, h, w = models["vit"].pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w, device=device)
    y = torch.softmax(torch.randn(batch, models["vit"].num_classes, device=device), -1)
    for kind, model in models.items():
        steps[kind] = make_step(model, x, y, args.amp)
    timing = T.time_interleaved(steps, device=device, repeats=repeats, warmup=1)
    n_tokens = 1 + models["vit"].patch_embed.num_patches
    out = {"shape": name, "label": spec["label"], "tokens": n_tokens, "batch": batch, "repeats": repeats, "models": {}}
    for kind in ("vit", "kvit"):
        t = timing[kind]["median_s"]
        out["models"][kind] = {
            "name": spec[kind],
            "params": analysis.count_params(models[kind]),
            "step_s": t,
            "step_times_s": timing[kind]["times_s"],
            "img_per_s": batch / t,
            **{f"{k}_per_image": v for k, v in flops[kind].items()},
        }
    return out, steps


def add_memory(out: dict, steps: dict, device: torch.device) -> dict:
    """Each model's peak step memory (after every shape's timing: a CPU measurement changes the
    allocator for the rest of the process) and the KViT / ViT ratios."""
    for kind, step in steps.items():
        out["models"][kind]["peak_bytes"] = T.peak_memory(step, device)
    v, k = out["models"]["vit"], out["models"]["kvit"]
    out["ratios"] = {
        "step_time": k["step_s"] / v["step_s"],
        "peak_memory": k["peak_bytes"] / v["peak_bytes"] if v["peak_bytes"] else None,
        "flops": k["flops_per_image"] / v["flops_per_image"],
        "attention_flops": k["attention_flops_per_image"] / v["attention_flops_per_image"],
    }
    return out


def render(results: list[dict], markdown: bool) -> str:
    headers = ["shape", "model", "batch", "step", "img/s", "peak mem", "GFLOPs/img fwd", "GFLOPs/img train",
               "attn MFLOPs/img", "params"]
    rows = []
    for r in results:
        for kind in ("vit", "kvit"):
            m = r["models"][kind]
            rows.append([r["label"], m["name"], r["batch"], T.fmt_time(m["step_s"]), f"{m['img_per_s']:.1f}",
                         T.fmt_bytes(m["peak_bytes"]), f"{m['flops_per_image'] / 1e9:.3f}",
                         f"{m['train_flops_per_image'] / 1e9:.3f}", f"{m['attention_flops_per_image'] / 1e6:.2f}",
                         f"{m['params'] / 1e6:.2f}M"])
        q = r["ratios"]
        rows.append([r["label"], "KViT / ViT", "", T.fmt_ratio(q["step_time"]), "", T.fmt_ratio(q["peak_memory"]),
                     T.fmt_ratio(q["flops"]), "", T.fmt_ratio(q["attention_flops"]), ""])
    return T.table(headers, rows, markdown=markdown)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("vision_step: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        print(f"vision_step: --shapes must be a subset of {list(SHAPES)}, got {args.shapes!r}", file=sys.stderr)
        return 2
    info = T.machine_info(device)
    print(f"machine: {T.describe_machine(info)}")
    t0 = time.time()
    timed = []
    for name in names:
        timed.append(bench_shape(name, args, device))
        print(f"  {SHAPES[name]['label']}: timed ({time.time() - t0:.0f} s)", flush=True)
    results = [add_memory(out, steps, device) for out, steps in timed]
    del timed
    print()
    print(render(results, args.markdown))
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                                   "vision_step_quick.json" if args.quick else "vision_step.json")
    T.write_json(out, {"machine": info, "memory_method": T.MEMORY_METHOD.get(device.type), "amp": args.amp,
                       "quick": args.quick, "results": results})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
