"""Train a Krause language model on a ``build_fwe10bt`` token sample, under torchrun.

    torchrun --nproc_per_node 8 -m language_models_100m.train --config 100m --attention gated \\
        --data_dir /data/fwe10bt --out_dir runs/100m_gated
    python -m language_models_100m.train --config tiny --data_dir d --out_dir runs/t --max_steps 20  # one process

Recipe defaults (the paper's): AdamW (0.9, 0.95), weight decay 0.1 (none on norms,
biases, embeddings, log_sigma), lr 6e-4 with a linear warmup over 5% of the steps then
cosine to 0.1x, global batch 512 sequences x 1024 tokens = 524,288 tokens per optimizer
step, 10B tokens, grad-clip 1.0, bf16 autocast on GPU, validation every 500 steps.

Tokens per step are ``global_batch x block_size``, whatever the number of processes and
micro-batches: each process runs ``global_batch / (micro_batch x world)`` accumulation
micro-steps (refused when that does not divide). The log states the figure and counts the
tokens actually consumed. The training stream is the train shards in order, read through
memory maps as consecutive windows (``shards.WindowSampler``); the next window index is
saved in the checkpoint, so a resumed run continues the exact stream.

The run directory gets config.json, metrics.jsonl (train loss, lr, tokens/s, MFU, val
loss / perplexity), checkpoints/last.pt (and best.pt by val loss), figures/ and, at the
end, hf/ (save_pretrained + tokenizer) for ``language_models_100m.evaluate``. SIGTERM /
SIGUSR1 save last.pt and exit 0; rerun with --resume. Resuming a checkpoint of another
config or attention type is refused with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from krause.training.checkpoint import CheckpointManager, read_checkpoint
from krause.training.config import RUNTIME_KEYS, config_diff, config_fingerprint
from krause.training.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    cleanup,
    init_distributed,
    is_main_process,
    per_rank_batch_size,
    unwrap_model,
    wrap_ddp,
)
from krause.training.metrics import MetricsLogger, close_logging, setup_logging
from krause.training.optim import build_adamw
from krause.training.plotting import plot_curves
from krause.training.preemption import PreemptionHandler
from krause.training.run_dir import prepare_run_dir
from krause.training.schedule import warmup_cosine_scheduler, warmup_steps
from krause.training.seed import seed_everything

from .model import ATTENTIONS
from .presets import PRESETS, build_model, model_config
from .shards import TokenStream, WindowSampler, split_shards

# Settings that do not change what is computed per optimizer step: a run may resume with others.
IGNORED_KEYS = set(RUNTIME_KEYS) | {"micro_batch", "compile", "log_every", "save_every", "no_progress",
                                    "peak_tflops", "kill_at_step", "eval_batch"}


class UsageError(ValueError):
    """A bad argument: one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m language_models_100m.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", default="100m", choices=sorted(PRESETS))
    g.add_argument("--attention", default="gated", choices=ATTENTIONS)
    g.add_argument("--block_size", type=int, default=None, help="tokens per sequence (default: the model's positions)")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--vocab_size", type=int, default=None, help="default: the build's vocabulary (may be padded up)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True, help="build_fwe10bt output (train/val shards, manifest.json)")
    g.add_argument("--val_tokens", type=int, default=10_485_760, help="validation tokens per evaluation (cap)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global_batch", type=int, default=512, help="sequences per optimizer step, all processes")
    g.add_argument("--micro_batch", type=int, default=16, help="sequences per forward on one process")
    g.add_argument("--max_tokens", type=float, default=10e9, help="training tokens (sets the number of steps)")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides --max_tokens)")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--min_lr_ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad_clip", type=float, default=1.0, help="0: off")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--out_dir", required=True)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_every", type=int, default=500, help="validation every N steps (and at the end)")
    g.add_argument("--eval_batch", type=int, default=None, help="validation sequences per forward (default micro)")
    g.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (0: at evaluations)")
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: known GPUs)")
    g.add_argument("--no_progress", action="store_true")
    g.add_argument("--kill_at_step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("global_batch", "micro_batch", "val_tokens", "log_every", "eval_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("block_size", "max_steps", "eval_batch", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.save_every < 0:
        raise UsageError(f"--save_every must be >= 0, got {args.save_every}")
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.weight_decay < 0 or args.grad_clip < 0:
        raise UsageError("--lr must be > 0, --weight_decay and --grad_clip >= 0")
    if not 0 <= args.warmup < 1 or not 0 <= args.min_lr_ratio <= 1 or not 0 <= args.dropout < 1:
        raise UsageError("--warmup and --dropout must be in [0, 1), --min_lr_ratio in [0, 1]")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    return args


def read_manifest(data_dir) -> dict:
    path = Path(data_dir).expanduser() / "manifest.json"
    if not path.is_file():
        raise UsageError(f"--data_dir {data_dir}: no manifest.json (run language_models_100m.build_fwe10bt)")
    return json.loads(path.read_text())


def check_resumable(out_dir, config: dict) -> None:
    """Refuses, before anything is touched, a checkpoint of another model, attention or recipe."""
    last = Path(out_dir).expanduser().resolve() / "checkpoints" / "last.pt"
    if not last.is_file():
        return
    saved = read_checkpoint(last).get("config") or {}
    if config_fingerprint(saved, ignore=IGNORED_KEYS) != config_fingerprint(config, ignore=IGNORED_KEYS):
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(saved, config, ignore=IGNORED_KEYS)[:6])
        raise UsageError(f"--resume: {last} was written with another config ({diff}); use a new --out_dir")


def train_flops_per_token(model, block: int, device) -> float | None:
    """FLOPs of one forward + backward per token, counted by FlopCounterMode (Krause ops count
    their sparse cost: krause/flops.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, block, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, use_cache=False).logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / block


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in peaks.items() if k in name), None)


@torch.no_grad()
def validation(model, stream: TokenStream, block: int, max_tokens: int, batch: int, rank: int, world: int,
               device, autocast) -> dict:
    """Mean next-token loss over the first max_tokens of val in block windows, split over ranks."""
    n_windows = max(1, min(len(stream) - 1, max_tokens) // block)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = list(range(rank, n_windows, world))
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch):
        rows = np.stack([stream.read(w * block, block + 1) for w in mine[i:i + batch]])
        xy = torch.as_tensor(rows, device=device)
        with autocast():
            logits = model(xy[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum").double()
        count += xy[:, 1:].numel()
    model.train(was_training)
    total, count = all_reduce_sum(total), all_reduce_sum(count)
    loss = (total / count).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count.item())}


def export_hf(model, manifest: dict, out: Path, log) -> None:
    """save_pretrained of the model and, when it can be loaded here, the build's tokenizer."""
    model.save_pretrained(out)
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        spec = manifest.get("tokenizer", "gpt2")
        if Path(spec).is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=spec, eos_token=manifest.get("eos_token", "<|endoftext|>"))
        else:
            tok = AutoTokenizer.from_pretrained(spec)
        tok.save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - the model is exported either way
        log.warning(f"tokenizer {manifest.get('tokenizer')!r} not saved with the model ({e}); "
                    "pass --tokenizer to evaluate")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = None if args.device == "auto" else args.device
    env = init_distributed(device)
    finished = False
    try:
        code = _train(args, env)
        finished = True
        return code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        finished = True
        return 2
    finally:
        close_logging()
        cleanup(synchronize=finished)


def _train(args, env) -> int:
    device, rank, world = env.device, env.rank, env.world_size
    manifest = read_manifest(args.data_dir)
    vocab = args.vocab_size or int(manifest["vocab_size"])
    if vocab < int(manifest["vocab_size"]):
        raise UsageError(f"--vocab_size {vocab} is smaller than the build's vocabulary {manifest['vocab_size']}")
    try:
        cfg = model_config(args.config, args.attention, dropout=args.dropout, vocab_size=vocab,
                           eos_token_id=manifest.get("eos_id"), bos_token_id=manifest.get("eos_id"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    block = args.block_size or cfg.n_positions
    if block > cfg.n_positions:
        raise UsageError(f"--block_size {block} is larger than the model's {cfg.n_positions} positions")
    try:
        per_rank = per_rank_batch_size(args.global_batch, world, name="--global_batch")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if per_rank % args.micro_batch:
        raise UsageError(f"--global_batch {args.global_batch} is not divisible by --micro_batch {args.micro_batch} "
                         f"x {world} process(es)")
    accum = per_rank // args.micro_batch
    tokens_per_step = args.global_batch * block
    total_steps = args.max_steps or max(1, int(args.max_tokens // tokens_per_step))

    config = {k: v for k, v in vars(args).items() if k not in ("config", "attention", "dropout", "vocab_size")}
    config.update(model=cfg.to_diff_dict() | {"attention": cfg.attention}, preset=args.config, block=block,
                  total_steps=total_steps, tokens_per_step=tokens_per_step)
    if args.resume:
        check_resumable(args.out_dir, config)
    train_sampler = WindowSampler(TokenStream(split_shards(args.data_dir, "train")), block)
    val_stream = TokenStream(split_shards(args.data_dir, "val"))
    run = prepare_run_dir(args.out_dir, config, resume=args.resume, overwrite=args.overwrite, ignore=IGNORED_KEYS)
    log = setup_logging(run.log_path, name="language_models_100m")

    seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2))
    scheduler = warmup_cosine_scheduler(optimizer, total_steps, warmup_steps(total_steps, fraction=args.warmup),
                                        args.min_lr_ratio)
    ckpt = CheckpointManager(run.checkpoint_dir, config=config, mode="min", config_ignore=IGNORED_KEYS)
    step, next_window = 0, 0
    state = ckpt.load_last(model=model, optimizer=optimizer, scheduler=scheduler) if args.resume else None
    if state is not None:
        step, next_window = state.step, int(state.extra["next_window"])
        log.info(f"resumed from {state.path} at step {step}, train window {next_window}")
    else:
        seed_everything(args.seed, rank)  # per-rank dropout streams
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = train_flops_per_token(model, block, device)
    peak = peak_flops(args, device)
    log.info(f"{args.config}/{cfg.attention}: {n_params:,} parameters; {world} process(es) x {accum} micro-batch(es) "
             f"x {args.micro_batch} sequences x {block} tokens = {tokens_per_step:,} tokens per step "
             f"(global batch {args.global_batch}); {total_steps} steps = {total_steps * tokens_per_step:,} tokens; "
             f"{flops_per_token / 1e6:.1f} MFLOPs/token; {'bf16' if use_bf16 else 'fp32'} on {device}")
    metrics = MetricsLogger(run.metrics_path, resume_step=step if state is not None else None)
    if state is None:
        metrics.log(step=0, params=n_params, world_size=world, accum_steps=accum, micro_batch=args.micro_batch,
                    global_batch=args.global_batch, block_size=block, tokens_per_step=tokens_per_step,
                    total_steps=total_steps, flops_per_token=flops_per_token)

    train_model = wrap_ddp(model, env)
    if args.compile:
        train_model = torch.compile(train_model)
    model.train()

    def save(metric=None):
        return ckpt.save(model=model, optimizer=optimizer, scheduler=scheduler, step=step, metric=metric,
                         extra={"next_window": next_window, "tokens_seen": next_window * block})

    def evaluate_and_save():
        result = validation(model, val_stream, block, args.val_tokens, args.eval_batch or args.micro_batch, rank,
                            world, device, autocast)
        best = save(metric=result["val_loss"])
        metrics.log(step=step, tokens_seen=next_window * block, best=best, **result)
        log.info(f"step {step}: val loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f}{' (best)' * best}")

    preempt = PreemptionHandler().install()
    t0, window_loss, window_steps, last_eval = time.perf_counter(), 0.0, 0, -1
    try:
        while step < total_steps:
            # This rank's slice of the step's global batch, then its micro-batches.
            rows = train_sampler.windows(next_window + rank * per_rank, per_rank)
            xy = torch.as_tensor(rows, device=device)
            step_loss = torch.zeros((), device=device)
            for i in range(accum):
                micro = xy[i * args.micro_batch:(i + 1) * args.micro_batch]
                sync = i == accum - 1 or not hasattr(train_model, "no_sync")
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                    logits = train_model(micro[:, :-1], use_cache=False).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten()) / accum
                loss.backward()
                step_loss += loss.detach()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            next_window += args.global_batch
            window_loss += float(all_reduce_mean(step_loss))
            window_steps += 1
            if step % args.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t0
                tok_s = window_steps * tokens_per_step / elapsed
                record = dict(train_loss=window_loss / window_steps, lr=scheduler.get_last_lr()[0],
                              tokens_per_step=tokens_per_step, tokens_seen=next_window * block,
                              tokens_per_s=tok_s, step_time_s=elapsed / window_steps)
                if peak:
                    record["mfu"] = flops_per_token * tok_s / world / peak
                metrics.log(record, step=step)
                log.info(f"step {step}/{total_steps}: loss {record['train_loss']:.4f}, {tok_s:,.0f} tokens/s"
                         + (f", MFU {record['mfu']:.1%}" if peak else ""))
                t0, window_loss, window_steps = time.perf_counter(), 0.0, 0
            if args.kill_at_step == step:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if step % args.eval_every == 0 or step == total_steps:
                evaluate_and_save()
                last_eval = step
            elif args.save_every and step % args.save_every == 0:
                save()
            if preempt.should_stop() and step < total_steps:
                if last_eval != step and not (args.save_every and step % args.save_every == 0):
                    save()
                metrics.log(step=step, event=f"stopped by {preempt.reason}")
                log.info(f"stop requested ({preempt.reason}): saved step {step}; rerun with --resume")
                return 0
    finally:
        preempt.uninstall()
        metrics.close()
    if is_main_process():
        export_hf(unwrap_model(model), manifest, run.root / "hf", log)
        plot_curves(run.metrics_path, run.figures_dir / "loss.png", x="step",
                    panels={"loss": ["train_loss", "val_loss"], "lr": ["lr"]})
        log.info(f"done: {step} steps, {next_window * block:,} tokens; model in {run.root / 'hf'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
