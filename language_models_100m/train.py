"""Train a Krause language model on a ``build_fwe10bt`` token sample, under torchrun.

    torchrun --nproc_per_node 8 -m language_models_100m.train --config 100m --attention gated \\
        --data_dir /data/fwe10bt --out_dir runs/100m_gated
    python -m language_models_100m.train --config tiny --data_dir d --out_dir runs/t --max_steps 20  # one process

Recipe defaults (the paper's): AdamW (0.9, 0.95), weight decay 0.1 (none on norms,
biases, embeddings, log_sigma), lr 6e-4 with a linear warmup over 5% of the steps then
cosine to 0.1x, global batch 512 sequences x 1024 tokens = 524,288 tokens per optimizer
step, 10B tokens, grad-clip 1.0, bf16 autocast on GPU, validation every 500 steps.
``--preset paper``: the first release's 499,712 tokens per step and decay on everything
(flags and checks: ``cli.py``; the step, validation and export: ``steps.py``).

Tokens per step are ``global_batch x block_size``, whatever the number of processes and
micro-batches: each process runs ``global_batch / (micro_batch x world)`` accumulation
micro-steps (refused when that does not divide). The log states the figure and counts the
tokens actually consumed. The training stream is the train shards in order, read through
memory maps as consecutive windows (``shards.WindowSampler``); the next window index is
saved in the checkpoint, so a resumed run continues the exact stream.

The run directory gets config.json, metrics.jsonl (train loss, lr, tokens/s, MFU, val
loss / perplexity), checkpoints/ (krause.training's DCP step directories, the best by val
loss in best/), figures/ and, at the end, hf/ (save_pretrained + tokenizer) for ``language_models_100m.evaluate``. SIGTERM /
SIGUSR1 save a step checkpoint and exit 0; rerun with --resume. Resuming a checkpoint of another
config or attention type is refused with one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from krause.training.accumulation import BatchPlan
from krause.training.config import RUNTIME_KEYS, without_defaults
from krause.training.distributed import get_world_size, is_main_process
from krause.training.entry import entry_point
from krause.training.errors import UsageError
from krause.training.loop import LoopSettings
from krause.training.plotting import plot_curves
from krause.training.recipe import OptimSpec, Recipe, run_recipe
from krause.training.throughput import known_peak_flops

from .cli import (build_parser, check_attn_impl, check_block, check_saved_config, parse_args,  # noqa: F401
                  read_manifest, resolve_device)
from .presets import build_model, model_config
from .shards import TokenStream, WindowSampler, split_shards
from .steps import LMHooks, export_hf, train_flops_per_token, validation

# Settings that do not change what is computed per optimizer step: a run may resume with others.
IGNORED_KEYS = set(RUNTIME_KEYS) | {"micro_batch", "compile", "log_every", "save_every", "no_progress",
                                    "peak_tflops", "kill_at_step", "sigterm_at_step", "sigint_at_step", "eval_batch",
                                    "dist", "attn_impl", "krause_impl", "recipe_preset"}


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resume:
        check_saved_config(args.out_dir)
    manifest = read_manifest(args.data_dir)
    vocab = args.vocab_size or manifest["vocab_size"]
    if vocab < manifest["vocab_size"]:
        raise UsageError(f"--vocab_size {vocab} is smaller than the build's vocabulary {manifest['vocab_size']}")
    device = resolve_device(args.device)
    world = get_world_size()
    attn = {k: v for k in ("attn_global_tokens", "attn_num_clusters") if (v := getattr(args, k)) is not None}
    try:
        cfg = model_config(args.config, args.attention, dropout=args.dropout, vocab_size=vocab,
                           eos_token_id=manifest.get("eos_id"), bos_token_id=manifest.get("eos_id"),
                           krause_impl=args.attn_impl, **attn)
        plan = BatchPlan.from_global(args.global_batch, args.micro_batch, world, name="--global_batch",
                                     micro_name="--micro_batch")
    except ValueError as e:
        raise UsageError(str(e)) from None
    block = args.block_size or cfg.n_positions
    check_block(cfg, block)
    check_attn_impl(args.attn_impl, cfg, device)
    tokens_per_step = args.global_batch * block
    total_steps = args.max_steps or max(1, int(args.max_tokens // tokens_per_step))

    config = {k: v for k, v in vars(args).items() if k not in ("config", "attention", "dropout", "vocab_size",
                                                                  "attn_global_tokens", "attn_num_clusters")}
    config = without_defaults(config, {"decay_all": False})  # a flag added later: runs begun before it resume
    config.update(model=cfg.to_diff_dict() | {"attention": cfg.attention}, preset=args.config, block=block,
                  total_steps=total_steps, tokens_per_step=tokens_per_step)
    train_stream = TokenStream(split_shards(args.data_dir, "train"))
    val_stream = TokenStream(split_shards(args.data_dir, "val"))
    test_shards = sorted(Path(args.data_dir).expanduser().glob("*_test_*.bin"))  # builds before the test split: none
    test_stream = TokenStream(test_shards) if test_shards else None
    for stream in (train_stream, val_stream, test_stream):  # a bad id stops here, not at the embedding
        if stream is not None:
            stream.check_vocab(vocab)
    sampler = WindowSampler(train_stream, block)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if args.dist == "fsdp" or not use_bf16:
        autocast = contextlib.nullcontext  # FSDP2 casts parameters itself
    else:
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def start(ctx):
        flops = ctx.flops_per_sample / block
        ctx.log.info(f"{args.config}/{cfg.attention}: {ctx.n_params:,} parameters; {world} process(es) x "
                     f"{plan.accum_steps} micro-batch(es) x {plan.micro_batch} sequences x {block} tokens = "
                     f"{tokens_per_step:,} tokens per step (global batch {args.global_batch}); {total_steps} steps = "
                     f"{total_steps * tokens_per_step:,} tokens; {flops / 1e6:.2f} MFLOPs/token; {args.dist}, "
                     f"{'bf16' if use_bf16 else 'fp32'} on {device}")
        if ctx.resumed is None:
            ctx.metrics.log(step=0, params=ctx.n_params, world_size=world, accum_steps=plan.accum_steps,
                            micro_batch=plan.micro_batch, global_batch=args.global_batch, block_size=block,
                            tokens_per_step=tokens_per_step, total_steps=total_steps, flops_per_token=flops)

    def finish(ctx):
        test = {}
        if test_stream is not None and len(test_stream) > block:  # the first release's end-of-training score
            test = {k.replace("val_", "test_"): v for k, v in validation(
                ctx.train_model, test_stream, block, args.val_tokens, args.eval_batch or plan.micro_batch,
                ctx.env.rank, world, ctx.env.device, autocast).items()}
            ctx.metrics.log(test, step=ctx.state.step, tokens_seen=ctx.state.tokens_seen)
        export_hf(ctx.model, cfg, manifest, ctx.run.root / "hf", ctx.log)
        if is_main_process():
            plot_curves(ctx.run.metrics_path, ctx.run.figures_dir / "loss.png", x="step",
                        panels={"loss": ["train_loss", "val_loss"], "lr": ["lr"]})
            scored = (f"test loss {test['test_loss']:.4f}, ppl {test['test_ppl']:.2f} ({test['test_tokens']:,} "
                      "tokens); " if test else "no test split to score; ")
            ctx.log.info(f"done: {ctx.state.step} steps, {ctx.state.tokens_seen:,} tokens; {scored}model in "
                         f"{ctx.run.root / 'hf'}")

    return run_recipe(Recipe(
        name="language_models_100m", args=args, config=config, ignore=IGNORED_KEYS, build_model=lambda: build_model(cfg),
        make_hooks=lambda ctx: LMHooks(ctx, sampler=sampler, val_stream=val_stream, plan=plan, block=block, args=args,
                                       autocast=autocast),
        settings=LoopSettings(total_steps=total_steps, steps_per_epoch=total_steps, log_every=args.log_every,
                              eval_every=args.eval_every, save_every=args.save_every, grad_clip=args.grad_clip,
                              samples_per_step=args.global_batch, tokens_per_sample=block,
                              preempt_at_step=args.sigterm_at_step),
        optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                        betas=(args.beta1, args.beta2), decay_all=args.decay_all),
        dist=args.dist, fsdp_blocks="transformer.h", bf16=use_bf16, compile=args.compile,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else known_peak_flops(device),
        flops_per_sample=lambda model: train_flops_per_token(model, block, device) * block,
        on_start=start, on_finish=finish), None if args.device == "auto" else args.device)


if __name__ == "__main__":
    raise SystemExit(main())
