"""Gradient accumulation from a global batch, with the loss normalised over the whole of it.

    plan = BatchPlan.from_global(global_batch=512, micro_batch=16, world_size=8)   # accum = 4
    result = accumulate_gradients(model, micro_batches, loss_sum_fn, world_size=env.world_size)
    clip, optimizer.step(), scheduler.step()

`loss_sum_fn(micro_batch)` returns (sum of the per-element losses, number of elements)
for one micro-batch (elements: samples, or tokens for a language model). Every
micro-batch's backward uses `loss_sum * world_size / N_global`, where N_global is the
element count of the whole global batch over all ranks (one all-reduce per step when
counts can vary, e.g. padding): after DDP / FSDP average gradients over ranks, the
gradient is d(sum of all losses / N_global) -- the same for any split of the global
batch into ranks x micro-batches. Gradient synchronisation runs only on the last
micro-batch: `no_sync()` for DDP, `set_requires_gradient_sync(False)` for FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .distributed import all_reduce_sum, get_world_size

__all__ = ["BatchPlan", "accumulate_gradients", "grad_sync", "AccumulationResult"]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """global_batch = micro_batch x accum_steps x world_size."""

    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum_steps

    @classmethod
    def from_global(cls, global_batch: int, micro_batch: int | None = None, world_size: int | None = None,
                    name: str = "--batch_size", micro_name: str = "--micro_batch_size") -> "BatchPlan":
        """The plan for a global batch; ValueError (one line) when it does not split evenly.

        micro_batch None: one micro-batch per rank (no accumulation)."""
        world_size = get_world_size() if world_size is None else int(world_size)
        if not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"{name}={global_batch} must be a positive integer")
        if global_batch % world_size:
            raise ValueError(f"{name}={global_batch} (global) is not divisible by the world size {world_size}")
        per_rank = global_batch // world_size
        micro = per_rank if micro_batch is None else int(micro_batch)
        if micro < 1:
            raise ValueError(f"{micro_name}={micro_batch} must be a positive integer")
        if per_rank % micro:
            raise ValueError(f"{name}={global_batch} is not divisible by {micro_name} x world size = "
                             f"{micro} x {world_size}; choose a global batch that is a multiple of {micro * world_size}")
        return cls(global_batch, micro, per_rank // micro, world_size)


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient synchronisation on (last micro-batch) or off (the others), for DDP and FSDP2 alike."""
    if enabled:
        if _is_fsdp2(model):
            model.set_requires_gradient_sync(True)
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif _is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@dataclasses.dataclass
class AccumulationResult:
    loss: float | torch.Tensor   # mean loss over the whole global batch (all ranks), a 0-d tensor
    count: int                   # elements in the global batch (all ranks)
    outputs: list[Any]           # whatever loss_sum_fn returned third, per micro-batch


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Any],
                         loss_sum_fn: Callable[[Any], tuple], *, world_size: int | None = None,
                         counts: Iterable[int] | None = None, scaler: Any = None,
                         global_count: int | None = None) -> AccumulationResult:
    """Forward and backward over this rank's micro-batches of one optimizer step.

    loss_sum_fn(mb) -> (loss_sum, count) or (loss_sum, count, extra). The grads end up
    as those of (sum of every element's loss over the global batch) / N_global.
    counts: the element counts of this rank's micro-batches when known in advance (to
        find N_global before the first backward); otherwise each micro-batch's count is
        taken from loss_sum_fn, which then must be the same on every rank and
        micro-batch (fixed-size batches): N_global = count x micro-batches x world.
    global_count: N_global when the caller already knows it (skips the all-reduce).
    scaler: a GradScaler (fp16) to scale the loss with.
    Call optimizer.zero_grad() before and clip / step after.
    """
    world_size = get_world_size() if world_size is None else world_size
    n_micro = len(micro_batches)
    if n_micro < 1:
        raise ValueError("accumulate_gradients needs at least one micro-batch")
    if global_count is None and counts is not None:
        global_count = int(all_reduce_sum(int(sum(counts))))
    loss_total = None
    outputs: list[Any] = []
    seen = 0
    for i, mb in enumerate(micro_batches):
        with grad_sync(model, i == n_micro - 1):
            result = loss_sum_fn(mb)
            loss_sum, count = result[0], int(result[1])
            outputs.append(result[2] if len(result) > 2 else None)
            n_global = global_count if global_count is not None else count * n_micro * world_size
            loss = loss_sum * (world_size / n_global)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        seen += count
        detached = loss_sum.detach().double()
        loss_total = detached if loss_total is None else loss_total + detached
    n_global = global_count if global_count is not None else seen * world_size
    return AccumulationResult(loss=all_reduce_sum(loss_total) / n_global, count=int(n_global), outputs=outputs)
