"""Train one pixel model (KARM, ARM or LARM) and report bits per dimension on the test set.

    python -m autoregressive_transformers.train --attn krause --out_dir runs/karm_mnist
    torchrun --nproc_per_node 4 -m autoregressive_transformers.train --dataset cifar10 \\
        --data_path /data/cifar10 --attn vanilla --out_dir runs/arm_cifar10 --precision bf16

Recipe defaults (docs/recipes.md): AdamW lr 1e-3, weight decay 0.01 (none on biases,
norms, positions and log_sigma), linear warmup over 5% of the steps then cosine to
lr * 1e-6, 30 epochs, global batch 64 (MNIST) / 8 (CIFAR-10), dropout 0.1, grad clip 1.0;
``--preset paper`` takes the first release's choices where they differ (README). The
global batch is split over the processes; the test BPD covers every test image exactly
once, summed across processes.

The run directory gets config.json, metrics.jsonl (train loss / BPD, lr, tokens/s,
sigma per layer; test BPD), checkpoints/ (krause.training's DCP step directories,
`latest`, and best/ by lowest test BPD), figures/bpd.png and, when training finishes,
results.json. --resume continues from the latest checkpoint (same batches, same RNG
state: the result equals an uninterrupted run, even after kill -9); SIGTERM / SIGUSR1 /
Ctrl-C save and exit cleanly. The run is assembled by krause.training's recipe runner
(run_recipe); the command line is config.py's, the hooks hooks.py's, the figures and
results.json report.py's; this file puts them together.
"""

from __future__ import annotations

from krause.training.accumulation import BatchPlan
from krause.training.distributed import get_world_size
from krause.training.entry import entry_point
from krause.training.loop import LoopSettings
from krause.training.recipe import OptimSpec, Recipe, run_recipe
from krause.training.throughput import known_peak_flops, train_flops_per_sample

from .common import UsageError, check_attn_impl, resolve_device
from .config import IGNORED_KEYS, check_saved_config, run_config, train_model_config
from .config import build_train_parser as build_parser  # noqa: F401  (public names of this entry point)
from .config import parse_train_args as parse_args
from .data import load_pixels
from .hooks import PixelHooks
from .model import PixelTransformer
from .report import plot_figures, sigma_per_layer, write_results  # noqa: F401


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg = train_model_config(args)
    check_attn_impl(cfg, device)
    if args.resume:
        check_saved_config(args.out_dir)
    world = get_world_size()
    plan = BatchPlan.from_global(args.batch_size, args.micro_batch_size, world, name="--batch_size")
    train_px = load_pixels(args.dataset, "train", args.data_path, args.download, args.limit_train)
    test_px = load_pixels(args.dataset, "test", args.data_path, False, args.limit_test)
    steps_per_epoch = len(train_px) // args.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(train_px)} training images")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(device)

    def flops_per_image(model):  # forward + backward (FlopCounterMode; Krause ops count their sparse cost)
        return train_flops_per_sample(model, train_px[:1].to(device).long(),
                                      lambda logits: logits.float().logsumexp(-1).sum()) if peak else None

    def start(ctx):
        ctx.log.info(f"{cfg.name} on {args.dataset}: {ctx.n_params / 1e6:.2f}M parameters, {len(train_px)} train / "
                     f"{len(test_px)} test images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
                     f"{world} process(es) x batch {plan.per_rank} ({plan.accum_steps} micro-batch(es)), "
                     f"device {device}, {args.precision}")
        if ctx.resumed is None:
            ctx.metrics.log(step=0, params=ctx.n_params, world_size=world, total_steps=total_steps)

    eval_batch = args.eval_batch_size or 2 * plan.per_rank
    return run_recipe(Recipe(
        name="autoregressive_transformers", args=args, config=run_config(args, cfg), ignore=IGNORED_KEYS,
        build_model=lambda: PixelTransformer(cfg),
        make_hooks=lambda ctx: PixelHooks(args, cfg, plan, train_px, test_px, ctx, eval_batch, steps_per_epoch),
        settings=LoopSettings(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=args.log_every,
                              eval_every=args.eval_every, save_every=args.save_every, grad_clip=args.grad_clip,
                              samples_per_step=args.batch_size, tokens_per_sample=cfg.seq_len),
        optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                        decay_all=args.decay_all),
        compile=args.compile, keep_latest_k=args.keep_latest_k, peak_flops=peak, flops_per_sample=flops_per_image,
        state_extra={"steps_per_epoch": steps_per_epoch}, on_start=start,
        on_finish=lambda ctx: write_results(ctx, cfg, args.dataset)), device)


if __name__ == "__main__":
    raise SystemExit(main())
