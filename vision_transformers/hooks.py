"""The vision family's part of the training loop: MixUp / CutMix batches, epoch sums of loss and
accuracy, and top-1 / top-5 evaluation over every rank's test shard."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from krause.training import TrainHooks, all_reduce_sum, progress_bar, split_micro_batches
from krause.training.data import reseed

from . import analysis

__all__ = ["VisionHooks", "evaluate", "loss_and_mixing", "autocast"]


def loss_and_mixing(args, num_classes: int):
    """(criterion, mixup_fn or None): timm's Mixup and soft-target CE when mixing is on."""
    if not ((args.mixup > 0 or args.cutmix > 0) and args.mix_prob > 0):
        return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mix_prob,
                     switch_prob=args.cutmix_prob if args.mixup > 0 and args.cutmix > 0 else 0.5,
                     mode="batch", label_smoothing=args.label_smoothing, num_classes=num_classes)
    return SoftTargetCrossEntropy(), mixup_fn


def autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, amp: str, channels_last: bool) -> dict:
    """Loss, top-1 and top-5 accuracy over the whole test set (every rank's shard, summed)."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        sums += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (top[:, 0] == y).sum().double(),
            (top == y[:, None]).any(1).sum().double(),
            y.new_full((), y.numel(), dtype=torch.float64),
        ])
    sums = all_reduce_sum(sums)
    model.train(was)
    loss, top1, top5, n = sums.tolist()
    return {"test_loss": loss / n, "test_acc1": top1 / n, "test_acc5": top5 / n, "test_samples": int(n)}


class VisionHooks(TrainHooks):
    """Image classification: MixUp / CutMix per global batch, epoch sums of loss and accuracy,
    top-1 / top-5 on every rank's test shard summed."""

    def __init__(self, args, env, plan, ctx, data):
        """`ctx`: the recipe's RunContext; `data`: the run's ``Loaders``."""
        self.args, self.env, self.plan = args, env, plan
        self.model, self.fwd, self.eval_fwd = ctx.model, ctx.train_model, ctx.eval_model
        self.metrics, self.log, self.ckpt = ctx.metrics, ctx.log, ctx.checkpointer
        self.lr_fn = lambda: ctx.scheduler.get_last_lr()[0]
        self.train_set, self.sampler, self.loader = data.train_set, data.sampler, data.train
        self.loader_gen, self.val_loader = data.generator, data.val
        self.steps_per_epoch = len(data.train)
        self.criterion, self.mixup_fn = loss_and_mixing(args, data.info.num_classes)
        # this rank's part of the epoch sums since the last sync: loss * n, correct, count
        self.local = torch.zeros(3, dtype=torch.float64, device=env.device)
        self.t_epoch: float | None = time.perf_counter()

    def batches(self, epoch, start):
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=start * self.plan.per_rank)
        reseed(self.loader_gen, self.args.seed, epoch, self.env.rank)
        self.t_epoch = time.perf_counter()
        self.fwd.train()
        bar = progress_bar(self.loader, enabled=not self.args.no_progress,
                           desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False, initial=start,
                           total=self.steps_per_epoch)
        for x, y in bar:
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            target = y
            if self.mixup_fn is not None:
                x, target = self.mixup_fn(x, y)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield split_micro_batches((x, target, y), self.plan.accum_steps)

    def train_step(self, micro):
        x, target, y = micro
        with autocast(self.env.device, self.args.amp):
            logits = self.fwd(x)
            loss = self.criterion(logits.float(), target)
        with torch.no_grad():
            hard = target.argmax(1) if target.dim() == 2 else target
            correct = (logits.argmax(1) == hard).sum().double()
        return loss * y.numel(), y.numel(), correct

    def after_step(self, state, result):
        n = float(result.count) / self.env.world_size  # this rank's share of the global batch
        self.local += torch.stack([result.loss.detach().double().to(self.local.device) * n,
                                   sum(result.outputs).to(self.local.device),
                                   torch.tensor(n, dtype=torch.float64, device=self.local.device)])

    def sync_state(self, state):
        glob = all_reduce_sum(self.local).tolist()
        self.local.zero_()
        state.add(loss=glob[0], correct=glob[1], count=glob[2])
        if self.t_epoch is not None:  # inside an epoch (not between its end and the next one)
            state.add(train_time=time.perf_counter() - self.t_epoch)
            self.t_epoch = time.perf_counter()

    def step_record(self, state, window):
        record = dict(train_loss=window["train_loss"], lr=window["lr"], img_per_s=window["samples_per_s"])
        if "grad_norm" in window:
            record["grad_norm"] = window["grad_norm"]
        for key in ("tflops_per_device", "mfu"):
            if key in window:
                record[key] = window[key]
        return record

    def epoch_record(self, state):
        self.sync_state(state)
        self.t_epoch = None
        acc = state.pop_sums("loss", "correct", "count", "train_time")
        record = dict(train_loss=acc["loss"] / acc["count"], train_acc=acc["correct"] / acc["count"],
                      epoch_time=acc["train_time"], img_per_s=acc["count"] / max(acc["train_time"], 1e-9),
                      lr=self.lr_fn())
        sig = analysis.sigma_summary(self.model)
        if sig:
            record["sigma"] = sig
        return record

    def evaluate(self, state):
        t_eval = time.perf_counter()
        result = evaluate(self.eval_fwd, self.val_loader, self.env.device, self.args.amp, self.args.channels_last)
        result["eval_time"] = time.perf_counter() - t_eval
        return result

    def selection_metric(self, result):
        return result.get("test_acc1")

    def on_eval(self, state, record, is_best, where):
        if not math.isfinite(record.get("train_loss", 0.0)):
            self.log.error("non-finite training loss in epoch %d", state.epoch)
        record["best_acc1"] = self.ckpt.best_metric
        self.metrics.log(step=state.step, epoch=state.epoch, **record)
        sig = record.get("sigma")
        self.log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %s acc1 %s acc5 %s%s | %.0f img/s%s",
                      state.epoch, self.args.epochs, record.get("train_loss", float("nan")),
                      record.get("train_acc", float("nan")), fmt(record.get("test_loss")),
                      fmt(record.get("test_acc1")), fmt(record.get("test_acc5")), " (best)" if is_best else "",
                      record.get("img_per_s", 0.0), f" | sigma {fmt_sigma(sig)}" if sig else "")

    def on_diverged(self, state, message):
        self.log.error(message)

    def on_stop(self, state, reason):
        self.log.info("stop requested (%s): saved step %d in %s, exiting; continue with --resume", reason,
                      state.step, self.ckpt.directory)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def fmt_sigma(sig: list) -> str:
    flat = [sum(s) / len(s) if isinstance(s, list) else s for s in sig]
    return "[" + " ".join(f"{s:.2f}" for s in flat) + "]"
