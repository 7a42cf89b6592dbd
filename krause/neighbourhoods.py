"""Sparse access patterns of the fast Krause paths.

A neighbourhood says, for each query, which M candidate keys it may look at, and
provides the four sparse products the forward and backward passes need, without ever
building an N x N tensor (except ``DenseNeighbourhood``, which exists for small N):

- ``dots(a, b)``        SDDMM:  out[i, m] = a_i . b_{nbr(i, m)}           -> (B, H, *Q, M)
- ``gather(w, b)``      SpMM:   out[i]    = sum_m w[i, m] b_{nbr(i, m)}  -> (B, H, *Q, D)
- ``scatter(w, a)``     SpMM^T: out[j]    = sum_{(i,m): nbr(i,m)=j} w[i, m] a_i  -> (B, H, Nk, D)
- ``gather_scalar(s)``  per-key scalars at the candidates             -> broadcastable to (B, H, *Q, M)
- ``scatter_scalar(w)`` adjoint of gather_scalar                      -> (B, H, Nk)

Queries live in a neighbourhood-specific layout ``*Q`` (``to_query_layout`` /
``from_query_layout`` convert from and to (B, H, Nq, ...)). ``valid`` (broadcastable to
(*Q, M)) marks real candidates; invalid slots point at zero padding and are masked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .masks import grid_offsets


def band_block_size(window: int) -> int:
    """Query block size of the causal band.

    Each block of C queries scores a span of C + W - 1 keys, so the work is (1 + (C-1)/W)
    times the exact W per query; smaller blocks waste less but launch more, smaller
    matmuls. W/2 (at least 16) measured best on CPU in benchmarks/attention_scaling.py.
    """
    return max(16, (window + 1) // 2)


@functools.lru_cache(maxsize=128)
def _band_valid_cpu(num_blocks: int, block: int, window: int) -> torch.Tensor:
    span = block + window - 1
    c = torch.arange(block)[None, :, None]
    m = torch.arange(span)[None, None, :]
    start = torch.arange(num_blocks)[:, None, None] * block
    key_pos = start - (window - 1) + m  # global key index of span slot m
    return (m >= c) & (m <= c + window - 1) & (key_pos >= 0)


class BandNeighbourhood:
    """Causal sliding window: query i sees keys i - W < j <= i.

    Queries are cut into blocks of C; block b scores the C + W - 1 keys that end at its
    last query, as one batched matmul against an overlapping (strided, copy-free) view
    of the left-padded keys. Time and memory are O(N (C + W) D).
    """

    def __init__(self, num_tokens: int, window: int, device, block: int | None = None):
        self.n = num_tokens
        self.w = window
        self.c = block or band_block_size(window)
        self.nb = -(-num_tokens // self.c)
        self.span = self.c + window - 1
        self.pad_right = self.nb * self.c - num_tokens
        self.valid = _band_valid_cpu(self.nb, self.c, window).to(device)  # (nb, C, span)
        self.num_candidates = window

    # layout ------------------------------------------------------------------
    def to_query_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, ...) -> (B, H, nb, C, ...), zero-padded at the end."""
        if self.pad_right:
            pad = [0, 0] * (x.dim() - 3) + [0, self.pad_right]
            x = F.pad(x, pad)
        return x.reshape(*x.shape[:2], self.nb, self.c, *x.shape[3:])

    def from_query_layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(*x.shape[:2], self.nb * self.c, *x.shape[4:])
        return x[:, :, : self.n]

    def _key_windows(self, b: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, H, nb, span, D): overlapping key spans, one per query block."""
        b = F.pad(b, (0, 0, self.w - 1, self.pad_right))
        return b.unfold(2, self.span, self.c).transpose(-1, -2)

    def _overlap_add(self, contrib: torch.Tensor) -> torch.Tensor:
        """Adjoint of _key_windows: (B, H, nb, span, ...) -> (B, H, N, ...)."""
        parts = -(-self.span // self.c)
        extra = parts * self.c - self.span
        if extra:
            pad = [0, 0] * (contrib.dim() - 4) + [0, extra]
            contrib = F.pad(contrib, pad)
        contrib = contrib.reshape(*contrib.shape[:3], parts, self.c, *contrib.shape[4:])
        out = contrib.new_zeros(*contrib.shape[:2], self.nb + parts - 1, self.c, *contrib.shape[5:])
        for t in range(parts):
            out[:, :, t : t + self.nb] += contrib[:, :, :, t]
        out = out.reshape(*out.shape[:2], (self.nb + parts - 1) * self.c, *out.shape[4:])
        return out[:, :, self.w - 1 : self.w - 1 + self.n]

    # sparse products ---------------------------------------------------------
    def dots(self, a, b):
        return a @ self._key_windows(b).transpose(-1, -2)

    def gather(self, w, b):
        return w @ self._key_windows(b)

    def scatter(self, w, a):
        return self._overlap_add(w.transpose(-1, -2) @ a)

    def gather_scalar(self, s):
        return self._key_windows(s[..., None])[..., 0][:, :, :, None, :]

    def scatter_scalar(self, w):
        return self._overlap_add(w.sum(-2))


class DenseNeighbourhood:
    """Every query scores every key; ``valid`` is an optional (Nq, Nk) mask.

    Used on purpose where N is small enough that one dense matmul beats many small
    sparse ones (the CIFAR 8x8 grid), and for the handful of prefix (CLS) queries that
    see all tokens.
    """

    def __init__(self, num_keys: int, valid: torch.Tensor | None = None):
        self.valid = valid
        self.num_candidates = num_keys

    def to_query_layout(self, x):
        return x

    def from_query_layout(self, x):
        return x

    def dots(self, a, b):
        return a @ b.transpose(-1, -2)

    def gather(self, w, b):
        return w @ b

    def scatter(self, w, a):
        return w.transpose(-1, -2) @ a

    def gather_scalar(self, s):
        return s[:, :, None, :]

    def scatter_scalar(self, w):
        return w.sum(-2)


@functools.lru_cache(maxsize=64)
def _grid_valid_cpu(rows: int, cols: int, offsets: tuple, num_prefix: int) -> torch.Tensor:
    r = torch.arange(rows).repeat_interleave(cols)[:, None]
    c = torch.arange(cols).repeat(rows)[:, None]
    dr = torch.tensor([o[0] for o in offsets])[None, :]
    dc = torch.tensor([o[1] for o in offsets])[None, :]
    inside = (r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols)
    return torch.cat([torch.ones(rows * cols, num_prefix, dtype=torch.bool), inside], dim=1)


class GridNeighbourhood:
    """Patch queries of 2-D local attention: the prefix keys plus the patches at fixed
    grid offsets (the radius neighbourhood).

    Candidates are read as shifted views of the zero-padded key grid, one per offset, so
    nothing larger than (B, H, G, D) is ever materialised per offset: O(G M D) time,
    O(G M) extra memory, with G = rows * cols and M = P + |offsets|.
    """

    def __init__(self, grid, radius: int, metric: str, num_prefix: int, device):
        self.rows, self.cols = grid
        self.r = radius
        self.p = num_prefix
        self.offsets = tuple(grid_offsets(radius, metric))
        self.valid = _grid_valid_cpu(self.rows, self.cols, self.offsets, num_prefix).to(device)
        self.num_candidates = num_prefix + len(self.offsets)

    def to_query_layout(self, x):
        return x[:, :, self.p :]

    def from_query_layout(self, x):
        return x

    def _padded_grid(self, b):
        """(B, H, N, ...) -> (B, H, rows + 2r, cols + 2r, ...) patch keys with a zero border."""
        g = b[:, :, self.p :]
        g = g.reshape(*g.shape[:2], self.rows, self.cols, *g.shape[3:])
        trailing = [0, 0] * (g.dim() - 4)
        return F.pad(g, trailing + [self.r, self.r, self.r, self.r])

    def _shifted(self, padded, dr, dc):
        """Keys at offset (dr, dc) from every patch, as a (B, H, G, ...) view."""
        r0, c0 = self.r + dr, self.r + dc
        view = padded[:, :, r0 : r0 + self.rows, c0 : c0 + self.cols]
        return view.reshape(*view.shape[:2], self.rows * self.cols, *view.shape[4:])

    def dots(self, a, b):
        prefix = a @ b[:, :, : self.p].transpose(-1, -2)
        padded = self._padded_grid(b)
        local = [torch.linalg.vecdot(a, self._shifted(padded, dr, dc)) for dr, dc in self.offsets]
        return torch.cat([prefix, torch.stack(local, dim=-1)], dim=-1)

    def gather(self, w, b):
        out = w[..., : self.p] @ b[:, :, : self.p]
        padded = self._padded_grid(b)
        for m, (dr, dc) in enumerate(self.offsets):
            out = out + w[..., self.p + m, None] * self._shifted(padded, dr, dc)
        return out

    def _scatter_grid(self, per_offset, trailing_shape, like):
        """Adds per-offset query-side contributions back onto the keys they came from."""
        padded = like.new_zeros(
            *like.shape[:2], self.rows + 2 * self.r, self.cols + 2 * self.r, *trailing_shape
        )
        for (dr, dc), contrib in zip(self.offsets, per_offset):
            r0, c0 = self.r + dr, self.r + dc
            padded[:, :, r0 : r0 + self.rows, c0 : c0 + self.cols] += contrib.reshape(
                *contrib.shape[:2], self.rows, self.cols, *trailing_shape
            )
        inner = padded[:, :, self.r : self.r + self.rows, self.r : self.r + self.cols]
        return inner.reshape(*inner.shape[:2], self.rows * self.cols, *trailing_shape)

    def scatter(self, w, a):
        prefix = w[..., : self.p].transpose(-1, -2) @ a
        per_offset = (w[..., self.p + m, None] * a for m in range(len(self.offsets)))
        local = self._scatter_grid(per_offset, (a.shape[-1],), a)
        return torch.cat([prefix, local], dim=2)

    def gather_scalar(self, s):
        prefix = s[:, :, None, : self.p].expand(*s.shape[:2], self.rows * self.cols, self.p)
        padded = self._padded_grid(s)
        local = torch.stack([self._shifted(padded, dr, dc) for dr, dc in self.offsets], dim=-1)
        return torch.cat([prefix, local], dim=-1)

    def scatter_scalar(self, w):
        prefix = w[..., : self.p].sum(-2)
        per_offset = (w[..., self.p + m] for m in range(len(self.offsets)))
        local = self._scatter_grid(per_offset, (), w)
        return torch.cat([prefix, local], dim=2)
