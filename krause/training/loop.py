"""One loop shape for every family: the family writes hooks, the loop does the rest.

    class Hooks(TrainHooks):
        def batches(self, epoch, start): ...     # this rank's micro-batches, one list per optimizer step
        def train_step(self, micro): ...          # forward + loss: (loss_sum, count[, extra])
        def evaluate(self, state): ...            # collective; a dict of metrics
    outcome = TrainLoop(settings, model=ddp_or_fsdp_model, optimizer=opt, scheduler=sched,
                        checkpointer=ckpt, app_state=app, train_state=state, metrics=metrics,
                        hooks=Hooks()).run()      # "finished" | "stopped" | "diverged"

The loop owns: zero_grad, gradient accumulation over the micro-batches with the loss
normalised over the global batch (accumulation.py; no_sync / FSDP2 sync toggles), grad
scaling and clipping, the optimizer and scheduler step, `TrainState` counters, train
logs every `log_every` steps (mean loss over the window, lr, grad norm, throughput and
MFU), evaluation every `eval_every` steps and / or at the end of every
`eval_every_epochs` epochs and at the end, checkpoints (periodic, at evaluations with
the selection metric, on a stop), the graceful stop on SIGTERM / SIGUSR1 / Ctrl-C
(every rank stops at the same step), and a non-finite loss stopping the run: no checkpoint
is written once a loss since the last log (or, without a grad scaler, the last gradient
norm) is non-finite, so the latest checkpoint is the last good one; `hooks.on_diverged`
gets a message that names it, or says there is none and how to start again.
The family's hooks add their own numbers to the records (`step_record`,
`epoch_record`), keep running sums in `state.sums` (`after_step`, synced to every
rank in `sync_state` before a save), and write their eval records (`on_eval`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .accumulation import AccumulationResult, accumulate_gradients
from .preemption import PreemptionHandler
from .throughput import Throughput

__all__ = ["LoopSettings", "TrainHooks", "TrainLoop", "split_micro_batches"]


def split_micro_batches(batch: Any, n: int) -> list[Any]:
    """Split a tensor / tuple / list / dict batch along dim 0 into n equal micro-batches."""
    if n == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % n:
            raise ValueError(f"a batch of {batch.shape[0]} does not split into {n} micro-batches")
        return list(batch.chunk(n))
    if isinstance(batch, (tuple, list)):
        parts = [split_micro_batches(b, n) for b in batch]
        return [type(batch)(p[i] for p in parts) for i in range(n)]
    if isinstance(batch, dict):
        parts = {k: split_micro_batches(v, n) for k, v in batch.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    raise TypeError(f"cannot split a {type(batch).__name__} into micro-batches")


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    steps_per_epoch: int
    log_every: int = 50
    eval_every: int = 0            # also evaluate every N steps (0: only at epoch ends / the end)
    eval_every_epochs: int = 1     # evaluate at the end of every N-th epoch (0: never at epoch ends)
    save_every: int = 0            # also checkpoint every N steps (0: at evaluations and on a stop)
    grad_clip: float = 0.0         # max grad norm (0: off)
    samples_per_step: int = 0      # global batch (for throughput); 0: from the accumulated counts
    tokens_per_sample: int = 0     # tokens per sample for tokens/s (0: not a token model)
    preempt_at_step: int | None = None   # tests: SIGTERM this process after that step
    nonfinite_at_step: int | None = None  # tests: the loss of that step reads NaN (a divergence)

    def __post_init__(self) -> None:
        for name in ("total_steps", "steps_per_epoch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_every_epochs", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class TrainHooks:
    """What a family implements (batches, train_step, evaluate) and may refine (the rest)."""

    def batches(self, epoch: int, start: int) -> Iterable[Sequence[Any]]:
        """This rank's micro-batches of every optimizer step of `epoch`, from global batch `start` on."""
        raise NotImplementedError

    def train_step(self, micro_batch: Any) -> tuple:
        """Forward and loss of one micro-batch: (sum of per-element losses, element count[, extra])."""
        raise NotImplementedError

    def evaluate(self, state) -> dict[str, Any]:
        """Collective evaluation; {} when the family has none."""
        return {}

    def selection_metric(self, result: dict[str, Any]) -> float | None:
        """The number `Checkpointer` keeps the best step by (its `mode` says min or max)."""
        return None

    def after_step(self, state, result: AccumulationResult) -> None:
        """Add to running sums (device tensors are fine: synced in `sync_state`)."""

    def sync_state(self, state) -> None:
        """Before a save: put global (all-rank) running sums into `state.sums` (collective)."""

    def step_record(self, state, window: dict[str, Any]) -> dict[str, Any] | None:
        """The train log record every log_every steps (None: skip); `window` has the loop's numbers."""
        return window

    def epoch_record(self, state) -> dict[str, Any]:
        """Numbers of the epoch that just ended (before its evaluation); resets epoch sums."""
        return {}

    def on_eval(self, state, record: dict[str, Any], is_best: bool, where: str) -> None:
        """Log the evaluation (`record`: epoch_record + evaluate result when at an epoch end)."""

    def on_stop(self, state, reason: str) -> None:
        """After the stop checkpoint was saved."""

    def on_diverged(self, state, message: str) -> None:
        """The loss went non-finite: the run stops without a save. `message` says which checkpoint
        is the last good one, or that there is none, and how to go on (the family logs it)."""
        logging.getLogger("krause.training").error(message)


class _Diverged(Exception):
    """A non-finite loss (or gradient norm) was seen: stop without saving."""


class TrainLoop:
    def __init__(self, settings: LoopSettings, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, checkpointer, app_state, train_state, metrics, hooks: TrainHooks,
                 scaler: Any = None, preempt: PreemptionHandler | None = None,
                 throughput: Throughput | None = None, world_size: int = 1):
        self.s, self.model, self.optimizer, self.scheduler = settings, model, optimizer, scheduler
        self.ckpt, self.app, self.state, self.metrics, self.hooks = checkpointer, app_state, train_state, metrics, hooks
        self.scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        self.preempt = preempt
        self.meter = throughput or Throughput(world_size=world_size)
        self.world_size = world_size
        self.last_eval_step = -1
        self.last_save_step = -1
        self._unchecked_loss = None  # sum of the losses since the last finiteness check (device)
        self._grad_norm = None

    def _check_finite(self) -> None:
        """Raise _Diverged if a loss since the last check, or the last gradient norm (not under a
        grad scaler, whose skipped steps have infinite norms), is non-finite. Syncs the device."""
        bad = self._unchecked_loss is not None and not math.isfinite(float(self._unchecked_loss))
        if self._grad_norm is not None and self.scaler is None and not math.isfinite(float(self._grad_norm)):
            bad = True
        if bad:
            raise _Diverged
        self._unchecked_loss = None

    def _diverged_message(self) -> str:
        step, last = self.state.step, self.ckpt.latest_step()
        if last is None:
            return (f"non-finite training loss by step {step}, before any checkpoint was written: there is nothing "
                    "to resume; fix the settings (e.g. a lower learning rate) and start again without --resume, "
                    "with --overwrite in the same out_dir (or a new out_dir)")
        return (f"non-finite training loss by step {step}; nothing was saved after it, so the last checkpoint, "
                f"step {last} ({self.ckpt.step_dir(last)}), is the last good one: rerun with --resume to continue "
                "from it, or fix the settings and start again with --overwrite")

    # ---------------------------------------------------------------- pieces
    def save(self, metric: float | None = None) -> bool:
        self._check_finite()  # never write a checkpoint after a non-finite loss
        self.hooks.sync_state(self.state)
        # the loss window since the last log line, so a resume mid-window logs the same mean
        loss, n = getattr(self, "_window", (None, 0))
        self.state.extra["log_window"] = [float(loss) if loss is not None else 0.0, n]
        if metric is not None and self.ckpt.is_better(float(metric)):
            self.state.best_metric = float(metric)  # the saved TrainState already knows it
        info = self.ckpt.save(self.state.step, self.app, metric=metric)
        self.state.best_metric = self.ckpt.best_metric
        self.last_save_step = self.state.step
        return info.is_best

    def _evaluate(self, where: str, epoch_record: dict[str, Any] | None = None) -> None:
        record = dict(epoch_record or {})
        result = self.hooks.evaluate(self.state)
        record.update(result)
        metric = self.hooks.selection_metric(result) if result else None
        # Log before saving: a kill between the two then resumes from an earlier step, whose
        # later records are truncated and logged again (a save first could lose this record).
        is_best = metric is not None and self.ckpt.is_better(float(metric))
        if is_best:
            self.state.best_metric = float(metric)
        self.last_eval_step = self.state.step
        self.hooks.on_eval(self.state, record, is_best, where)
        self.save(metric=metric)

    def _optimizer_step(self) -> float | None:
        grad_norm = None
        if self.s.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            grad_norm = norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _stop_requested(self) -> bool:
        return self.preempt is not None and self.preempt.should_stop()

    # ---------------------------------------------------------------- the loop
    def run(self) -> str:
        """"finished", "stopped" (a signal; saved) or "diverged" (a non-finite loss; not saved)."""
        try:
            return self._run()
        except _Diverged:
            self.hooks.on_diverged(self.state, self._diverged_message())
            return "diverged"

    def _run(self) -> str:
        s, st, hooks = self.s, self.state, self.hooks
        saved_loss, window_n = st.extra.pop("log_window", (0.0, 0))  # a resume continues the saved window
        window_loss = torch.tensor(saved_loss, dtype=torch.float64) if window_n else None
        grad_norm = None
        self.meter.reset()
        while st.step < s.total_steps:
            start = st.batch_in_epoch
            for micro_batches in hooks.batches(st.epoch, start):
                self.optimizer.zero_grad(set_to_none=True)
                result = accumulate_gradients(self.model, micro_batches, hooks.train_step,
                                              world_size=self.world_size, scaler=self.scaler)
                grad_norm = self._optimizer_step()
                st.step += 1
                st.batch_in_epoch += 1
                st.samples_seen += s.samples_per_step or result.count
                st.tokens_seen += (s.samples_per_step or result.count) * s.tokens_per_sample
                self.meter.update(samples=s.samples_per_step or result.count,
                                  tokens=(s.samples_per_step or result.count) * s.tokens_per_sample)
                loss = result.loss.detach().double()  # stays on the device until logged
                if s.nonfinite_at_step == st.step:
                    loss = loss * float("nan")
                window_loss = loss if window_loss is None else window_loss + loss
                self._unchecked_loss = loss if self._unchecked_loss is None else self._unchecked_loss + loss
                self._grad_norm = grad_norm
                window_n += 1
                self._window = (window_loss, window_n)
                hooks.after_step(st, result)
                if st.step % s.log_every == 0 or st.step == s.total_steps:
                    self._check_finite()
                    mean = float(window_loss) / window_n
                    window = {"train_loss": mean, "lr": self.scheduler.get_last_lr()[0], **self.meter.rates()}
                    if grad_norm is not None:
                        window["grad_norm"] = float(grad_norm)
                    record = hooks.step_record(st, window)
                    if record is not None:
                        self.metrics.log(record, step=st.step, epoch=st.epoch + st.batch_in_epoch / s.steps_per_epoch)
                    window_loss, window_n = None, 0
                    self._window = (None, 0)
                if s.preempt_at_step == st.step:
                    os.kill(os.getpid(), signal.SIGTERM)
                end_of_epoch = st.batch_in_epoch >= s.steps_per_epoch
                last = st.step >= s.total_steps
                if s.eval_every and st.step % s.eval_every == 0 and not (end_of_epoch or last):
                    self._evaluate(f"step {st.step}")
                if s.save_every and st.step % s.save_every == 0 and self.last_save_step != st.step \
                        and not (end_of_epoch or last):
                    self.save()
                if self._stop_requested() and not (end_of_epoch or last):
                    if self.last_save_step != st.step:
                        self.save()
                    hooks.on_stop(st, self.preempt.reason if self.preempt else "stop")
                    return "stopped"
                if end_of_epoch or last:
                    break
            if st.batch_in_epoch == start and st.step < s.total_steps:
                raise RuntimeError(f"hooks.batches({st.epoch}, {start}) yielded no batch before the epoch's "
                                   f"{s.steps_per_epoch} steps were done")
            if st.batch_in_epoch >= s.steps_per_epoch:
                epoch_record = hooks.epoch_record(st)
                st.next_epoch()
                at_epoch = s.eval_every_epochs and st.epoch % s.eval_every_epochs == 0
                if at_epoch or st.step >= s.total_steps:
                    self._evaluate(f"epoch {st.epoch}", epoch_record)
                else:
                    hooks.on_eval(st, epoch_record, False, f"epoch {st.epoch}")
                    self.save()
            elif st.step >= s.total_steps and self.last_eval_step != st.step:
                self._evaluate("final")
            if st.step < s.total_steps and self._stop_requested():
                if self.last_save_step != st.step:
                    self.save()
                hooks.on_stop(st, self.preempt.reason if self.preempt else "stop")
                return "stopped"
        if self.last_eval_step != st.step:
            self._evaluate("final")
        return "finished"
