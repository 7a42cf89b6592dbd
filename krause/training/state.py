"""`TrainState`: the loop's own counters, checkpointed as one `Stateful` part.

Everything the loop needs to continue where it stopped lives here instead of in
checkpoint "extras": the optimizer step, the epoch and the position inside it, the
samples / tokens consumed, the best selection metric so far, and running sums of the
current epoch or logging window (global values, identical on every rank, so a run
saved on N ranks resumes on M). Families may add their own plain values in `extra`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["TrainState"]


@dataclasses.dataclass
class TrainState:
    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # epochs completed (the current epoch is this one)
    batch_in_epoch: int = 0       # global batches of the current epoch already consumed
    samples_seen: int = 0         # over all ranks
    tokens_seen: int = 0          # over all ranks (language models)
    best_metric: float | None = None
    sums: dict[str, float] = dataclasses.field(default_factory=dict)   # running sums, global over ranks
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)    # family-specific plain values

    @property
    def epoch_progress(self) -> float:
        """Fractional epochs for logging, given `steps_per_epoch` was set in extra (else `epoch`)."""
        spe = self.extra.get("steps_per_epoch")
        return self.epoch + self.batch_in_epoch / spe if spe else float(self.epoch)

    def add(self, **values: float) -> None:
        """Add to the running sums (creating keys at 0)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def pop_sums(self, *keys: str) -> dict[str, float]:
        """Remove and return the named running sums (all when none are named)."""
        keys = keys or tuple(self.sums)
        return {k: self.sums.pop(k, 0.0) for k in keys}

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    # -- Stateful (torch.distributed.checkpoint)
    # One JSON string, not a nested dict: DCP flattens dicts into keys, and the running
    # sums of a fresh TrainState (the load template) do not have the saved keys yet.
    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(dataclasses.asdict(self), sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = json.loads(state["json"])
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainState in the checkpoint has unknown fields {unknown}")
        for k, v in values.items():
            setattr(self, k, v)
