"""Candidate sets of the Krause variants as boolean masks (query x key).

These are O(N^2) and meant for the dense reference and for small inputs only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def causal_window_mask(num_tokens: int, window: int, device=None) -> torch.Tensor:
    """mask[i, j] is True when key j is a candidate of query i: i - window < j <= i."""
    i = torch.arange(num_tokens, device=device)[:, None]
    j = torch.arange(num_tokens, device=device)[None, :]
    return (j <= i) & (j > i - window)


def grid_offsets(radius: int, metric: str) -> list[tuple[int, int]]:
    """(d_row, d_col) offsets of the neighbourhood, the centre included, in row-major order."""
    offsets = []
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            dist = abs(dr) + abs(dc) if metric == "manhattan" else max(abs(dr), abs(dc))
            if dist <= radius:
                offsets.append((dr, dc))
    return offsets


@functools.lru_cache(maxsize=64)
def _grid_candidate_mask_cpu(rows: int, cols: int, radius: int, metric: str, num_prefix_tokens: int) -> torch.Tensor:
    p = num_prefix_tokens
    n = p + rows * cols
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    dr = (r[:, None] - r[None, :]).abs()
    dc = (c[:, None] - c[None, :]).abs()
    close = (dr + dc <= radius) if metric == "manhattan" else (torch.maximum(dr, dc) <= radius)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:p, :] = True  # prefix (CLS) queries see every token
    mask[p:, :p] = True  # every patch sees the prefix tokens
    mask[p:, p:] = close
    return mask


def grid_candidate_mask(grid, radius: int, metric: str, num_prefix_tokens: int = 1, device=None) -> torch.Tensor:
    """mask[i, j] is True when key j is a candidate of query i for 2-D local attention.

    Patch queries see the patches within ``radius`` of them (``metric`` distance on the
    grid, themselves included) and all prefix tokens; prefix queries see all tokens.
    """
    rows, cols = grid
    return _grid_candidate_mask_cpu(rows, cols, radius, metric, num_prefix_tokens).to(device)


def end_aligned_mask(num_queries: int, num_keys: int, window: int | None, padding, device) -> torch.Tensor:
    """(1 or B, 1, Tq, Tk) bool: query i at position Tk - Tq + i sees keys in (pos - window, pos]
    (window None: all of them) that are not padding."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)
    allowed = allowed[None, None]
    return allowed if padding is None else allowed & padding[:, None, None, :]


def masked_sdpa(q, keys, values, allowed, scale, dropout_p) -> torch.Tensor:
    """SDPA under a bool mask; queries that may see no key get zeros (not NaN)."""
    out = F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=True
    )
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
