"""Candidate patterns of the fast Krause paths.

A neighbourhood says, for each query, which M candidate keys it may look at, and
provides the sparse products the forward and backward passes need (see engine.py),
without ever building an N x N tensor (except ``DenseNeighbourhood``, which exists for
small N and for the few prefix queries that see every key).

Work is done in *chunks* (``chunks``): a few heads, or one head and a range of its
queries, sized so a chunk's score tensor and the keys it reads stay in the CPU's cache
(see ``CHUNK_SCORES``); off CPU there is one chunk. Every tensor is flattened to
(B*H, ...) first. Per chunk ``ch`` (a ``Chunk``, which indexes query-layout tensors), the
band and the grid provide (the ``SparseNeighbourhood`` protocol):

- ``distances(ch, q, q_sq, kbuf, ksq)``  squared distances (*Q, M), +inf on invalid slots
- ``dots_chunk(ch, a, buf)``     SDDMM:  out[i, m] = a_i . b_{nbr(i, m)}
- ``gather(ch, w, buf, out)``    SpMM:   out[i]    = sum_m w[i, m] b_{nbr(i, m)}
- ``scatter_add_(ch, w, a, acc)``  SpMM^T: acc[j] += sum_{(i,m): nbr(i,m)=j} w[i, m] a_i

(the dense neighbourhood is run by its own code in engine.py).

Keys are handed over as (B*H, Nk, E) and turned into the neighbourhood's key layout by
``keys`` / ``key_scalars`` (the band keeps them as they are; the grid copies them into a
zero-bordered grid so that every candidate slot, valid or not, reads real memory);
``new_acc`` / ``read_acc`` do the same for the backward's accumulators. Each chunk's
candidates are strided views of that layout (no gathered copies).
Queries live in a query layout ``*Q`` (``to_query_layout`` / ``from_query_layout``).

``dots``, ``gather_scalar`` and ``valid`` on whole (B, H, ...) tensors are kept for
callers that want the candidate distances without the engine (krause.flex).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .masks import grid_offsets

# CPU chunk sizes, in scores (query x candidate pairs) per chunk; the --tune sweeps of
# benchmarks/attention_scaling.py measure them (results in the README).
# Band/grid chunks re-read their rows once per matmul or offset: 256 KiB of fp32 scores
# keeps a chunk and its rows within a typical per-core L2 cache.
CHUNK_SCORES = 1 << 16
# The band's chunks are matmuls on overlapping views (nothing re-read): bigger means fewer ops.
BAND_CHUNK_SCORES = 1 << 18
# The dense path reads each key once per matmul: its chunks only bound the temporaries.
DENSE_CHUNK_SCORES = 1 << 20

_INF = float("inf")


class Chunk(NamedTuple):
    """A piece of the (B*H, ...) query layout the engine works on at once.

    ``heads`` is one head (an int: the chunk's tensors have no head dimension, so products
    are plain 3-D bmm on strided views, the CPU path) or a slice of heads (a leading head
    dimension, 4-D matmuls: one chunk of everything off CPU); ``queries`` selects the
    chunk's query blocks / rows."""

    heads: int | slice
    queries: slice

    @property
    def one_head(self) -> bool:
        return isinstance(self.heads, int)


class SparseNeighbourhood(Protocol):
    """What the engine's sparse path needs from a candidate pattern (band, grid)."""

    num_candidates: int  # real candidates of a query (at most)
    num_slots: int  # M: candidate slots per query, valid or not

    def to_query_layout(self, x: torch.Tensor) -> torch.Tensor: ...
    def from_query_layout(self, x: torch.Tensor) -> torch.Tensor: ...
    def chunks(self, heads: range, num_queries: int, budget: int | None) -> Iterator[Chunk]: ...
    def keys(self, x: torch.Tensor) -> torch.Tensor: ...
    def key_scalars(self, s: torch.Tensor) -> torch.Tensor: ...
    def new_acc(self, bh: int, trailing: tuple, like: torch.Tensor) -> torch.Tensor: ...
    def read_acc(self, acc: torch.Tensor) -> torch.Tensor: ...
    def distances(self, ch: Chunk, q, q_sq, kbuf, ksq) -> torch.Tensor: ...
    def dots_chunk(self, ch: Chunk, a, buf) -> torch.Tensor: ...
    def gather(self, ch: Chunk, w, buf, out) -> torch.Tensor: ...
    def scatter_add_(self, ch: Chunk, w, a, acc) -> None: ...
    def scatter_colsum_(self, ch: Chunk, w, acc) -> None: ...



def chunk_budget(device) -> int | None:
    """Scores per chunk on this device; None (no chunking) off CPU, where one large
    kernel beats many small launches."""
    return CHUNK_SCORES if torch.device(device).type == "cpu" else None


def band_block_size(window: int) -> int:
    """Query block size C of the causal band.

    A block of C queries scores a span of C + W - 1 keys: (1 + (C-1)/W) times the exact
    work, so small blocks waste less but make more, smaller matmuls; W / 8 (at least 16)
    balances the two (the sweep is ``benchmarks/attention_scaling.py --tune``).
    """
    return max(16, window // 8)


# --------------------------------------------------------------------------- causal band
@functools.lru_cache(maxsize=128)
def _band_valid_cpu(num_blocks: int, block: int, window: int) -> torch.Tensor:
    span = block + window - 1
    c = torch.arange(block)[None, :, None]
    m = torch.arange(span)[None, None, :]
    start = torch.arange(num_blocks)[:, None, None] * block
    key_pos = start - (window - 1) + m  # global key index of span slot m
    return (m >= c) & (m <= c + window - 1) & (key_pos >= 0)


@functools.lru_cache(maxsize=128)
def _band_invalid(num_blocks: int, block: int, window: int, device, group: int = 1) -> torch.Tensor:
    """(nb, group * C, span): row r of a block is query r % C of one of ``group`` heads."""
    return (~_band_valid_cpu(num_blocks, block, window)).repeat(1, group, 1).to(device)


class BandNeighbourhood:
    """Causal sliding window: query i sees keys i - W < j <= i.

    Queries are cut into blocks of C; block b scores the span of C + W - 1 keys that
    ends at its last query, as one batched matmul against an overlapping (strided,
    copy-free) view of the zero-padded keys. Time and memory are O(N (C + W) D).

    Grouped-query attention (``group`` = H / Hkv query heads per key/value head): the
    query layout folds the group's heads into the rows of each block, (B, Hkv, nb, G*C, D),
    so the G heads share one key span and keys are never repeated per head; per-row
    tensors (sigma coefficients, their gradient) come in (B*Hkv, G*C) via ``row_heads``.
    """

    def __init__(self, num_tokens: int, window: int, device, block: int | None = None, group: int = 1):
        self.n = num_tokens
        self.w = window
        self.group = group
        self.c = block or band_block_size(window)
        self.rows = self.group * self.c  # query rows per block
        self.nb = -(-num_tokens // self.c)
        self.span = self.c + window - 1
        self.parts = -(-self.span // self.c)  # key blocks one query block's span touches
        self.pad_right = self.nb * self.c - num_tokens
        self.device = device
        self.num_candidates = window
        self.num_slots = self.span  # M: candidate slots per query (valid or not)

    @property
    def valid(self) -> torch.Tensor:
        """(nb, G*C, span) bool: slot m of query row r in block b is a real candidate."""
        return ~_band_invalid(self.nb, self.c, self.w, self.device, self.group)

    # layout ------------------------------------------------------------------
    def to_query_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, ...) -> (B, H / G, nb, G*C, ...), zero-padded at the end."""
        if self.pad_right:
            pad = [0, 0] * (x.dim() - 3) + [0, self.pad_right]
            x = F.pad(x, pad)
        b, h = x.shape[:2]
        x = x.reshape(b, h, self.nb, self.c, *x.shape[3:])
        if self.group == 1:
            return x
        g = self.group
        x = x.view(b, h // g, g, self.nb, self.c, *x.shape[4:]).transpose(2, 3)
        return x.reshape(b, h // g, self.nb, self.rows, *x.shape[5:])

    def from_query_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H / G, nb, G*C, ...) -> (B, H, N, ...)."""
        b, hkv = x.shape[:2]
        if self.group > 1:
            g = self.group
            x = x.reshape(b, hkv, self.nb, g, self.c, *x.shape[4:]).transpose(2, 3)
        x = x.reshape(b, hkv * self.group, self.nb * self.c, *x.shape[5 if self.group > 1 else 4 :])
        return x[:, :, : self.n]

    def row_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """(B*H,) per-head values -> (B*Hkv, G*C) per query row of the folded layout."""
        if self.group == 1:
            return per_head
        return per_head.view(-1, self.group, 1).expand(-1, self.group, self.c).reshape(-1, self.rows)

    def head_sums(self, per_row: torch.Tensor) -> torch.Tensor:
        """(..., G*C) per-row sums -> (..., G) per head."""
        return per_row.unflatten(-1, (self.group, self.c)).sum(-1)

    # chunks and keys -----------------------------------------------------------
    def chunks(self, heads: range, num_queries: int, budget: int | None):
        """On CPU one head per chunk, so every product is a plain 3-D bmm on overlapping
        strided views (no copies); without a budget, all the heads at once (4-D matmuls)."""
        if budget is None:
            yield Chunk(slice(heads.start, heads.stop), slice(0, self.nb))
            return
        per = max(1, BAND_CHUNK_SCORES // (self.rows * self.span))
        for h in heads:
            for b0 in range(0, self.nb, per):
                yield Chunk(h, slice(b0, min(b0 + per, self.nb)))

    # Keys stay where they are, (BH, N, E) (or (BH, N) scalars): a chunk's spans are an
    # overlapping view of its rows; only chunks at the ends, whose spans reach before the
    # first or past the last key, read (and scatter into) a small zero-padded copy.
    def keys(self, x):
        return x

    def key_scalars(self, s):
        return s

    def new_acc(self, bh: int, trailing: tuple, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(bh, self.n, *trailing)

    def read_acc(self, acc):
        return acc

    def _rows(self, ch):
        """Key rows [lo, hi) the chunk's spans cover (may reach outside [0, N))."""
        blocks = ch[1]
        return blocks.start * self.c - (self.w - 1), blocks.stop * self.c

    def _region(self, x, ch, extra: int = 0):
        """Rows [lo, hi + extra) of x[h] (token dim first after the head), zero-padded
        where they fall outside the keys: a view when they do not."""
        h = ch.heads
        lo, hi = self._rows(ch)
        hi += extra
        xs = x[h]
        dim = 0 if ch.one_head else 1
        if lo >= 0 and hi <= self.n:
            return xs.narrow(dim, lo, hi - lo)
        region = xs.new_zeros(*xs.shape[:dim], hi - lo, *xs.shape[dim + 1 :])
        a, b = max(lo, 0), min(hi, self.n)
        if b > a:
            region.narrow(dim, a - lo, b - a).copy_(xs.narrow(dim, a, b - a))
        return region

    def _windows(self, x, ch, scalars: bool = False):
        """The chunk's key spans: (nbc, span, E) for one head, (bhc, nbc, span, E) for a
        head slice (for per-key ``scalars`` x (BH, N): without E); overlapping views."""
        region = self._region(x, ch)
        win = region.unfold(0 if ch.one_head else 1, self.span, self.c)
        return win if scalars else win.transpose(-1, -2)

    # sparse products on a chunk ---------------------------------------------
    def distances(self, ch, q, q_sq, kbuf, ksq):
        """(|q|^2 + |k|^2) - 2 q.k, in the reference's order of rounding."""
        dist = torch.add(q_sq, self._windows(ksq, ch, scalars=True).unsqueeze(-2))
        win = self._windows(kbuf, ch)
        if ch.one_head:
            dist.baddbmm_(q, win.transpose(-1, -2), alpha=-2.0)
        else:
            dist.sub_(torch.matmul(q, win.transpose(-1, -2)), alpha=2.0)
        return dist.masked_fill_(_band_invalid(self.nb, self.c, self.w, self.device, self.group)[ch[1]], _INF)

    def dots_chunk(self, ch, a, buf):
        return torch.matmul(a, self._windows(buf, ch).transpose(-1, -2))

    def gather(self, ch, w, buf, out):
        if ch.one_head:
            return torch.bmm(w, self._windows(buf, ch), out=out)
        return out.copy_(torch.matmul(w, self._windows(buf, ch)))

    def _scatter_parts(self, ch, acc, add_part):
        """Runs add_part(t, width, view) for each slice t of C span slots, with view the
        (nbc, width, ...) key rows it lands on (the parts overlap across blocks): straight
        into acc, or into a zero-padded temporary for chunks at the ends."""
        h, blocks = ch
        nbc, c = blocks.stop - blocks.start, self.c
        lo, hi = self._rows(ch)
        extra = self.parts * c - self.span  # the last part's (nbc, C) view reaches this far past hi
        dim = 0 if ch.one_head else 1
        direct = dim == 0 and lo >= 0 and hi + extra <= self.n
        target = acc[h].narrow(0, lo, hi + extra - lo) if direct else \
            acc.new_zeros(*acc[h].shape[:dim], hi + extra - lo, *acc.shape[2:])
        for t in range(self.parts):
            width = min(c, self.span - t * c)
            add_part(t, width, target.narrow(dim, t * c, nbc * c).unflatten(dim, (nbc, c)).narrow(dim + 1, 0, width))
        if not direct:
            a_, b_ = max(lo, 0), min(hi, self.n)
            acc[h].narrow(dim, a_, b_ - a_).add_(target.narrow(dim, a_ - lo, b_ - a_))

    def scatter_add_(self, ch, w, a, acc):
        """Adds w^T a onto the key rows of the chunk's spans (acc (BH, N, E))."""
        c = self.c

        def add_part(t, width, part):
            w_t = w[..., t * c : t * c + width].transpose(-1, -2)
            if ch.one_head and width == c:
                part.baddbmm_(w_t, a)  # in place: a plain (nbc, C, E) block
            else:  # (on a partial block, baddbmm_ would fall back to one addmm per block)
                part.add_(torch.matmul(w_t, a))

        self._scatter_parts(ch, acc, add_part)

    def scatter_colsum_(self, ch, w, acc):
        """Adds sum_i w[i, m] onto the key of slot m (acc (BH, N) scalars)."""
        c = self.c
        self._scatter_parts(ch, acc, lambda t, width, part: part.add_(w[..., t * c : t * c + width].sum(-2)))

    # whole-tensor products (krause.flex) -------------------------------------
    def _key_windows(self, b: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, H, nb, span, D): overlapping key spans, one per query block."""
        b = F.pad(b, (0, 0, self.w - 1, self.pad_right))
        return b.unfold(2, self.span, self.c).transpose(-1, -2)

    def dots(self, a, b):
        return a @ self._key_windows(b).transpose(-1, -2)

    def gather_scalar(self, s):
        return self._key_windows(s[..., None])[..., 0][:, :, :, None, :]


# --------------------------------------------------------------------------- dense
class DenseNeighbourhood:
    """Every query scores every key; ``valid`` is an optional (Nq, Nk) mask.

    Used on purpose where N is small enough that one dense matmul beats many small
    sparse ones (the CIFAR 8x8 grid), and for the handful of prefix (CLS) queries that
    see all tokens. engine.py runs it with its own dense code (see ``compact``).

    Compact rows. When the mask gives a trailing range of queries only a few candidates
    each (the patch queries of a small grid: at most P + |offsets|), the scores of those
    rows are computed densely (one matmul) but everything after that (top-k, softmax,
    the backward's elementwise work) runs on their Mc candidates only, gathered through
    ``cand_idx`` (Nq - F, Mc) (``flat_idx``: the same, slot-major, into the flattened
    (Nq, Nk) scores); the first F rows (the prefix queries) stay dense. Padding slots of
    short rows point at distinct non-candidate keys and are marked invalid in
    ``cand_valid``, so writing zeros through them never overwrites a real candidate.
    """

    # A row is compact when it has at most this fraction of the keys as candidates.
    COMPACT_FRACTION = 0.5

    def __init__(self, num_keys: int, valid: torch.Tensor | None = None):
        self.valid = valid
        self.num_keys = num_keys
        self.num_candidates = num_keys
        self.num_slots = num_keys
        self.full_rows = None if valid is None else valid.shape[0]
        self.full_invalid = None
        self.cand_idx = self.cand_valid = self.cand_invalid = self.flat_idx = None
        if valid is not None:
            self._find_compact_rows(valid)

    def _find_compact_rows(self, valid: torch.Tensor) -> None:
        counts = valid.sum(-1)
        compact = counts <= self.COMPACT_FRACTION * self.num_keys
        f = int((~compact).sum())
        if f == valid.shape[0] or bool(compact[:f].any()):  # no compact tail: all rows dense
            self.full_invalid = None if bool(valid.all()) else ~valid
            return
        self.full_rows = f
        head = valid[:f]
        self.full_invalid = None if bool(head.all()) else ~head
        tail = valid[f:]
        mc = int(counts[f:].max())
        # Candidates first (in key order), then non-candidates: the first mc columns of a
        # stable sort of ~tail are each row's candidates padded with distinct non-candidates.
        order = torch.sort((~tail).to(torch.uint8), dim=-1, stable=True).indices[:, :mc]
        self.cand_idx = order
        # Slot-major (Mc, Nq - F) views of the compact rows: slot j of every row is one
        # contiguous vector, so per-slot work and reductions over slots vectorise well.
        rows = torch.arange(f, valid.shape[0], device=valid.device)
        self.key_idx = order.t().reshape(-1)  # the candidate keys, slot-major
        self.flat_idx = (rows[None, :] * self.num_keys + order.t()).reshape(-1)  # into (Nq * Nk)
        self.cand_valid = tail.gather(-1, order).t().contiguous()  # (Mc, Nq - F)
        self.cand_invalid = ~self.cand_valid

    def to_query_layout(self, x):
        return x

    def from_query_layout(self, x):
        return x

    def chunks(self, heads: range, num_queries: int, budget: int | None):
        """Groups of heads; on CPU (a budget is given) of up to DENSE_CHUNK_SCORES scores."""
        per = len(heads) if budget is None else max(1, DENSE_CHUNK_SCORES // max(1, num_queries * self.num_keys))
        for h0 in range(heads.start, heads.stop, per):
            yield Chunk(slice(h0, min(h0 + per, heads.stop)), slice(None))

    def dots(self, a, b):
        return a @ b.transpose(-1, -2)

    def gather_scalar(self, s):
        return s[:, :, None, :]


# --------------------------------------------------------------------------- 2-D grid
@functools.lru_cache(maxsize=64)
def _grid_valid_cpu(rows: int, cols: int, offsets: tuple, num_prefix: int) -> torch.Tensor:
    r = torch.arange(rows).repeat_interleave(cols)[:, None]
    c = torch.arange(cols).repeat(rows)[:, None]
    dr = torch.tensor([o[0] for o in offsets])[None, :]
    dc = torch.tensor([o[1] for o in offsets])[None, :]
    inside = (r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols)
    return torch.cat([torch.ones(rows * cols, num_prefix, dtype=torch.bool), inside], dim=1)


@functools.lru_cache(maxsize=64)
def _grid_invalid(rows: int, cols: int, offsets: tuple, num_prefix: int, device) -> torch.Tensor:
    return (~_grid_valid_cpu(rows, cols, offsets, num_prefix)).to(device)


class GridNeighbourhood:
    """Patch queries of 2-D local attention: the prefix keys plus the patches at fixed
    grid offsets (the radius neighbourhood).

    Keys sit in a buffer of the prefix rows followed by the zero-bordered patch grid;
    the candidates at one offset are a shifted strided view of it, so each offset costs
    one pass over the chunk's queries and nothing larger than the chunk is materialised:
    O(G M D) time, O(G M) memory, with G = rows * cols and M = P + |offsets|.
    """

    def __init__(self, grid, radius: int, metric: str, num_prefix: int, device):
        self.rows, self.cols = grid
        self.r = radius
        self.p = num_prefix
        self.offsets = tuple(grid_offsets(radius, metric))
        self.device = device
        self.num_candidates = num_prefix + len(self.offsets)
        self.num_slots = self.num_candidates

    @property
    def valid(self) -> torch.Tensor:
        """(G, M) bool."""
        return ~self._invalid()

    def _invalid(self) -> torch.Tensor:
        return _grid_invalid(self.rows, self.cols, self.offsets, self.p, self.device)

    def to_query_layout(self, x):
        return x[:, :, self.p :]

    def from_query_layout(self, x):
        return x

    # chunks and key buffers ----------------------------------------------------
    def chunks(self, heads: range, num_queries: int, budget: int | None):
        """Whole grids of several heads, or bands of grid rows of one head."""
        g = self.rows * self.cols
        per_row = self.cols * self.num_candidates
        if budget is None or self.rows * per_row <= budget:
            per = len(heads) if budget is None else max(1, budget // (self.rows * per_row))
            for h0 in range(heads.start, heads.stop, per):
                yield Chunk(slice(h0, min(h0 + per, heads.stop)), slice(0, g))
            return
        rows = max(1, budget // per_row)
        for h in heads:
            for r0 in range(0, self.rows, rows):
                r1 = min(r0 + rows, self.rows)
                yield Chunk(slice(h, h + 1), slice(r0 * self.cols, r1 * self.cols))

    # Keys live in a buffer of the prefix rows followed by the zero-bordered patch grid
    # (BH, P + (rows + 2r) (cols + 2r), E), or (BH, ...) for per-key scalars.
    def _new_buffer(self, bh: int, trailing: tuple, like: torch.Tensor) -> torch.Tensor:
        padded = (self.rows + 2 * self.r) * (self.cols + 2 * self.r)
        return like.new_zeros(bh, self.p + padded, *trailing)

    def _grid(self, buf):
        return buf[:, self.p :].unflatten(1, (self.rows + 2 * self.r, self.cols + 2 * self.r))

    def _interior(self, buf):
        r = self.r
        return self._grid(buf)[:, r : r + self.rows, r : r + self.cols]

    def keys(self, x):
        buf = self._new_buffer(x.shape[0], x.shape[2:], x)
        buf[:, : self.p] = x[:, : self.p]
        self._interior(buf)[...] = x[:, self.p :].unflatten(1, (self.rows, self.cols))
        return buf

    def key_scalars(self, s):
        return self.keys(s)

    def new_acc(self, bh: int, trailing: tuple, like: torch.Tensor) -> torch.Tensor:
        return self._new_buffer(bh, trailing, like)

    def read_acc(self, acc):
        return torch.cat([acc[:, : self.p], self._interior(acc).flatten(1, 2)], dim=1)

    def _shifted(self, buf, ch, dr, dc):
        """Keys at offset (dr, dc) from the chunk's patches: (bhc, rows_c, cols, E) view."""
        heads, tokens = ch
        r0, r1 = tokens.start // self.cols, tokens.stop // self.cols
        top, left = self.r + dr + r0, self.r + dc
        return self._grid(buf)[heads, top : top + r1 - r0, left : left + self.cols]

    def _as_grid(self, x):
        return x.unflatten(1, (-1, self.cols))

    # sparse products on a chunk ---------------------------------------------
    def dots_chunk(self, ch, a, buf):
        heads = ch[0]
        out = a.new_empty(*a.shape[:-1], self.num_candidates)
        if self.p:
            torch.bmm(a, buf[heads, : self.p].transpose(1, 2), out=out[..., : self.p])
        a_g, out_g = self._as_grid(a), self._as_grid(out)
        for m, (dr, dc) in enumerate(self.offsets):
            torch.linalg.vecdot(a_g, self._shifted(buf, ch, dr, dc), out=out_g[..., self.p + m])
        return out

    def distances(self, ch, q, q_sq, kbuf, k_sq):
        """(|q|^2 + |k|^2) - 2 q.k, in the reference's order of rounding."""
        dots = self.dots_chunk(ch, q, kbuf)
        heads, tokens = ch
        local = [self._shifted(k_sq, ch, dr, dc) for dr, dc in self.offsets]
        if self.p:
            prefix = k_sq[heads, None, None, : self.p].expand(*local[0].shape, self.p)
            local = list(prefix.unbind(-1)) + local
        dist = torch.stack(local, dim=-1).flatten(1, 2).add_(q_sq).sub_(dots, alpha=2.0)
        return dist.masked_fill_(self._invalid()[tokens], _INF)

    def gather(self, ch, w, buf, out):
        heads = ch[0]
        if self.p:
            torch.bmm(w[..., : self.p], buf[heads, : self.p], out=out)
        else:
            out.zero_()
        out_g, w_g = self._as_grid(out), self._as_grid(w)
        for m, (dr, dc) in enumerate(self.offsets):
            out_g.addcmul_(w_g[..., self.p + m, None], self._shifted(buf, ch, dr, dc))
        return out

    def scatter_add_(self, ch, w, a, acc):
        heads = ch[0]
        if self.p:
            acc[heads, : self.p].baddbmm_(w[..., : self.p].transpose(1, 2), a)
        a_g, w_g = self._as_grid(a), self._as_grid(w)
        for m, (dr, dc) in enumerate(self.offsets):
            self._shifted(acc, ch, dr, dc).addcmul_(w_g[..., self.p + m, None], a_g)

    def scatter_colsum_(self, ch, w, acc):
        heads = ch[0]
        if self.p:
            acc[heads, : self.p] += w[..., : self.p].sum(-2)
        w_g = self._as_grid(w)
        for m, (dr, dc) in enumerate(self.offsets):
            self._shifted(acc, ch, dr, dc).add_(w_g[..., self.p + m])

    # whole-tensor products (krause.flex) -------------------------------------
    def _padded_grid(self, b):
        g = b[:, :, self.p :]
        g = g.reshape(*g.shape[:2], self.rows, self.cols, *g.shape[3:])
        trailing = [0, 0] * (g.dim() - 4)
        return F.pad(g, trailing + [self.r, self.r, self.r, self.r])

    def _shifted_whole(self, padded, dr, dc):
        r0, c0 = self.r + dr, self.r + dc
        view = padded[:, :, r0 : r0 + self.rows, c0 : c0 + self.cols]
        return view.reshape(*view.shape[:2], self.rows * self.cols, *view.shape[4:])

    def dots(self, a, b):
        prefix = a @ b[:, :, : self.p].transpose(-1, -2)
        padded = self._padded_grid(b)
        local = [torch.linalg.vecdot(a, self._shifted_whole(padded, dr, dc)) for dr, dc in self.offsets]
        return torch.cat([prefix, torch.stack(local, dim=-1)], dim=-1)

    def gather_scalar(self, s):
        prefix = s[:, :, None, : self.p].expand(*s.shape[:2], self.rows * self.cols, self.p)
        padded = self._padded_grid(s)
        local = torch.stack([self._shifted_whole(padded, dr, dc) for dr, dc in self.offsets], dim=-1)
        return torch.cat([prefix, local], dim=-1)
