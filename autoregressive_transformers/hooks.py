"""The pixel model's training hooks (krause.training's TrainHooks): batches, loss, evaluation, records."""

from __future__ import annotations

import math

import torch.nn.functional as F

from krause.training.distributed import is_main_process
from krause.training.loop import TrainHooks
from krause.training.metrics import progress_bar

from .common import autocast, evaluate_bpd
from .data import train_batches
from .report import plot_figures, sigma_per_layer


class PixelHooks(TrainHooks):
    """Next-pixel cross-entropy on this rank's slice of each global batch; test BPD over the whole set."""

    def __init__(self, args, cfg, plan, train_px, test_px, ctx, eval_batch, steps_per_epoch):
        self.args, self.cfg, self.plan, self.train_px, self.test_px = args, cfg, plan, train_px, test_px
        self.eval_batch, self.steps_per_epoch = eval_batch, steps_per_epoch
        self.device, self.rank, self.world = ctx.env.device, ctx.env.rank, ctx.env.world_size
        self.model, self.train_model, self.eval_model = ctx.model, ctx.train_model, ctx.eval_model
        self.metrics, self.log, self.run = ctx.metrics, ctx.log, ctx.run
        self.total_steps = ctx.recipe.settings.total_steps

    def batches(self, epoch, start):
        batches = train_batches(len(self.train_px), self.args.batch_size, epoch, self.args.seed, self.rank, self.world)
        # the steps this epoch runs (the last one may end early at --max_steps); a bar line with rate
        # and ETA at most every 10 s when the output is a file, not a terminal
        steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        bar = progress_bar(total=steps, initial=start, enabled=not self.args.no_progress, unit="step", leave=False,
                           desc=f"epoch {epoch + 1}/{epochs}")
        try:
            for idx in batches[start:steps]:
                x = self.train_px[idx].to(self.device, non_blocking=True).long()
                yield list(x.split(self.plan.micro_batch))
                bar.update(1)
        finally:
            bar.close()

    def train_step(self, x):
        with autocast(self.device, self.args.precision):
            logits = self.train_model(x)
        s = self.cfg.first_scored  # 1: the first release's unmodelled first pixel
        return F.cross_entropy(logits[:, s:].float().transpose(1, 2), x[:, s:], reduction="sum"), x[:, s:].numel()

    def evaluate(self, state):
        return evaluate_bpd(self.eval_model, self.test_px, self.eval_batch, self.device, self.args.precision,
                            not self.args.no_progress, desc=f"test (step {state.step})")

    def selection_metric(self, result):
        return result.get("bpd")

    def step_record(self, state, window):
        record = dict(train_loss=window["train_loss"], train_bpd=window["train_loss"] / math.log(2), lr=window["lr"],
                      steps_per_s=window["steps_per_s"], tokens_per_s=window["tokens_per_s"])
        for key in ("grad_norm", "tflops_per_device", "mfu"):  # grad_norm: only when clipping
            if key in window:
                record[key] = window[key]
        sig = sigma_per_layer(self.model)
        if sig is not None:
            record["sigma"] = sig
        return record

    def on_eval(self, state, record, is_best, where):
        if "bpd" not in record:
            return
        self.metrics.log(step=state.step, epoch=state.epoch + state.batch_in_epoch / self.steps_per_epoch,
                         test_bpd=record["bpd"], test_nll_nats=record["nll_nats"], test_images=record["num_images"],
                         best=is_best)
        if is_main_process():
            plot_figures(self.run, self.cfg)
        label = where if where.startswith("step") else f"{where}, step {state.step}"
        self.log.info(f"{label}: test bpd {record['bpd']:.4f} ({record['num_images']} images)"
                      f"{' (best)' if is_best else ''}")

    def on_diverged(self, state, message):
        self.log.error(message)

    def on_stop(self, state, reason):
        self.metrics.log(step=state.step, event=f"stopped by {reason}")
        self.log.info(f"signal received: saved step {state.step} in {self.run.checkpoint_dir}; rerun with --resume")
