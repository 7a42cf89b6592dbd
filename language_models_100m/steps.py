"""The language models' part of a training run: the next-token step and batches (``LMHooks``, the
hooks of krause.training's loop), validation / test scoring, the FLOP count behind MFU, and the
``hf/`` export that evaluate reads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from krause.training.accumulation import BatchPlan
from krause.training.checkpointer import seal_directory
from krause.training.distributed import all_reduce_sum, is_main_process
from krause.training.errors import one_line
from krause.training.loop import TrainHooks

from .presets import build_model
from .shards import TokenStream, WindowSampler


def train_flops_per_token(model, block: int, device) -> float:
    """FLOPs of one forward + backward per token, counted by FlopCounterMode (Krause ops count
    their sparse cost: krause/flops.py). Longformer and routing run as a dense masked SDPA: its
    counted T² cost is replaced by the pairs they attend (krause.flops.longformer_pairs /
    routing_pairs), so their MFU is in model FLOPs like the Krause op's."""
    from torch.utils.flop_counter import FlopCounterMode

    from krause import flops

    cfg = model.config
    example = torch.zeros(1, block, dtype=torch.long, device=device)
    saved = [(p, p.grad) for p in model.parameters()]
    with FlopCounterMode(display=False) as counter:
        model(example, use_cache=False).logits.float().sum().backward()
    for p, g in saved:
        p.grad = g
    counts = counter.get_flop_counts()["Global"]
    total = sum(counts.values())
    sdpa = sum(v for op, v in counts.items() if "scaled_dot_product" in str(op))
    pairs = {"longformer": lambda: flops.longformer_pairs(block, cfg.attn_window, cfg.attn_global_tokens),
             "routing": lambda: flops.routing_pairs(block, cfg.attn_num_clusters)}.get(cfg.attention)
    if pairs is not None and sdpa:  # every SDPA call of these models is the baseline's own
        total += cfg.n_layer * cfg.n_head * sum(flops.softmax_pairs_flops(pairs(), cfg.n_embd // cfg.n_head)) - sdpa
    return total / block


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


def export_hf(model, cfg, manifest: dict, out: Path, log) -> None:
    """save_pretrained of the trained weights (gathered from any DDP / FSDP2 wrapping, collective)
    and, when it can be loaded here, the build's tokenizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return
    plain = build_model(cfg)
    plain.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
    plain.save_pretrained(out)
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        spec = manifest.get("tokenizer", "gpt2")
        if Path(spec).is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=spec, eos_token=manifest.get("eos_token", "<|endoftext|>"))
        else:
            tok = AutoTokenizer.from_pretrained(spec)
        tok.save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - the model is exported either way
        log.warning(f"tokenizer {manifest.get('tokenizer')!r} not saved with the model ({one_line(e)}); "
                    "pass --tokenizer to evaluate")
    seal_directory(out)  # sizes and CRC-32s that evaluate checks before loading


class LMHooks(TrainHooks):
    """The family's part of krause.training's loop: batches from the token stream, the
    next-token loss, validation, and the records."""

    def __init__(self, ctx, *, sampler: WindowSampler, val_stream: TokenStream, plan: BatchPlan, block: int, args,
                 autocast):
        self.model, self.sampler, self.val_stream, self.plan, self.block = ctx.train_model, sampler, val_stream, plan, block
        self.args, self.env, self.autocast, self.metrics, self.log = args, ctx.env, autocast, ctx.metrics, ctx.log

    def batches(self, epoch, start):
        """Step s reads windows s * global_batch .. + global_batch - 1; this rank takes its slice."""
        per_rank, rank = self.plan.per_rank, self.env.rank
        step = start
        while True:
            first = step * self.plan.global_batch + rank * per_rank
            xy = torch.as_tensor(self.sampler.windows(first, per_rank), device=self.env.device)
            yield list(xy.split(self.plan.micro_batch))
            step += 1

    def train_step(self, micro):
        with self.autocast():
            logits = self.model(micro[:, :-1], use_cache=False).logits
        targets = micro[:, 1:]
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        return loss_sum, targets.numel()

    def after_step(self, state, result):
        state.extra["next_window"] = state.batch_in_epoch * self.plan.global_batch  # the stream position
        import os
        import signal

        if self.args.kill_at_step == state.step:  # tests: die without any cleanup
            os.kill(os.getpid(), signal.SIGKILL)
        if self.args.sigint_at_step == state.step:  # tests: Ctrl-C, a graceful stop
            os.kill(os.getpid(), signal.SIGINT)

    def evaluate(self, state):
        return validation(self.model, self.val_stream, self.block, self.args.val_tokens,
                          self.args.eval_batch or self.plan.micro_batch, self.env.rank, self.env.world_size,
                          self.env.device, self.autocast)

    def selection_metric(self, result):
        return result.get("val_loss")

    def step_record(self, state, window):
        record = dict(window, tokens_per_step=self.plan.global_batch * self.block, tokens_seen=state.tokens_seen,
                      next_window=state.extra["next_window"])
        self.log.info(f"step {state.step}: loss {window['train_loss']:.4f}, {window.get('tokens_per_s', 0):,.0f} "
                      f"tokens/s" + (f", MFU {window['mfu']:.1%}" if "mfu" in window else ""))
        return record

    def on_eval(self, state, record, is_best, where):
        if "val_loss" in record:
            self.metrics.log(record, step=state.step, tokens_seen=state.tokens_seen, best=is_best)
            self.log.info(f"{where}: val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f}"
                          + (" (best)" if is_best else ""))

    def on_stop(self, state, reason):
        self.metrics.log(step=state.step, event=f"stopped: {reason}")
        self.log.info(f"stopped ({reason}) at step {state.step}, checkpoint saved; rerun with --resume")

    def on_diverged(self, state, message):
        self.metrics.log(step=state.step, event="diverged: non-finite loss")
        self.log.error(message)
