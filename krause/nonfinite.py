"""The NaN policy of the Krause ops (docs/api.md, "Non-finite inputs"), for the paths written in PyTorch.

Output row i is all NaN when query i has at least one valid candidate and q_i, or the key
or the value of any valid candidate j (inside the window or neighbourhood, not padding),
holds a NaN or an infinity. A query with no valid candidate returns zeros, as always.
Everything else is computed from the finite inputs, so a NaN never leaks into rows
that cannot see it. Backward: a NaN row passes no gradient (its upstream gradient counts
as 0, as for a padded row) and a non-finite input entry gets gradient 0; the other
gradients are those of the finite computation.

The compiled CPU kernel and the Triton kernels apply the same rule inside their loops;
the helpers here serve the reference, the engine (``krause.ops``) and FlexAttention.
"""

from __future__ import annotations

import torch

from .masks import grid_offsets


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with every NaN and infinity replaced by 0 (gradient 0 there, 1 elsewhere)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., N) bool: row n of x (..., N, D) holds a NaN or an infinity."""
    return ~torch.isfinite(x).all(-1)


def split_finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite_or_zero(x), nonfinite_rows(x)) from one isfinite pass (the engine's and flex's prologue)."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), ~finite.all(-1)


def _per_query_head(bad_kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, H, ...): query head h reads key/value head h // (H // Hkv)."""
    return bad_kv.repeat_interleave(num_heads // bad_kv.shape[1], dim=1)


def causal_poisoned_rows(bad_q, bad_kv, window: int, key_valid=None) -> torch.Tensor:
    """(B, H, Tq) bool: the output rows the policy makes NaN for end-aligned causal-window
    attention, from the non-finite rows of q (B, H, Tq) and of k or v (B, Hkv, Tk) (query i
    at key position Tk - Tq + i sees the keys p - window < j <= p that ``key_valid`` (B, Tk)
    does not mark as padding). Linear time: window counts by cumsum."""
    h, tq = bad_q.shape[1], bad_q.shape[2]
    tk = bad_kv.shape[2]
    pos = torch.arange(tk - tq, tk, device=bad_q.device)
    hi, lo = pos + 1, (pos - window + 1).clamp_min(0)

    def in_window(flags: torch.Tensor) -> torch.Tensor:  # (..., Tk) -> (..., Tq) counts over each window
        total = torch.nn.functional.pad(flags.to(torch.int32).cumsum(-1), (1, 0))
        return total[..., hi] - total[..., lo]

    if key_valid is not None:
        bad_kv = bad_kv & key_valid[:, None, :]
        has = in_window(key_valid)[:, None, :] > 0
    else:
        has = (hi > lo)[None, None, :]
    seen = _per_query_head(in_window(bad_kv) > 0, h)
    return has & (bad_q | seen)


def grid_poisoned_rows(bad_q, bad_kv, grid, radius: int, metric: str, num_prefix: int) -> torch.Tensor:
    """(B, H, N) bool: the NaN rows of 2-D local attention, from the non-finite rows of q
    (B, H, N) and of k or v (B, Hkv, N) (prefix queries see every token, every query sees
    the prefix tokens, a patch sees the patches within ``radius``).
    O(N * |offsets|): one shifted OR per neighbourhood offset."""
    rows, cols = grid
    p = num_prefix
    bad_kv = _per_query_head(bad_kv, bad_q.shape[1])  # (B, H, N)
    prefix_bad = bad_kv[..., :p].any(-1, keepdim=True)
    patches = torch.nn.functional.pad(bad_kv[..., p:].unflatten(-1, (rows, cols)), (radius,) * 4)
    near = torch.zeros_like(bad_kv[..., p:].unflatten(-1, (rows, cols)))
    for dr, dc in grid_offsets(radius, metric):
        near |= patches[..., radius + dr : radius + dr + rows, radius + dc : radius + dc + cols]
    seen = torch.cat([bad_kv.any(-1, keepdim=True).expand(*bad_kv.shape[:-1], p), near.flatten(-2) | prefix_bad], -1)
    return bad_q | seen


def fill_nan_rows(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out (B, H, N, D) with the rows marked in ``rows`` (B, H, N) set to NaN (out of place:
    autograd passes no gradient through them)."""
    return out.masked_fill(rows[..., None], float("nan"))
