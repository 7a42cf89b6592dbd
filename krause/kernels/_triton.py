"""Triton kernels of Krause attention (forward, backward, decode).

One query block per program. The keys a block can see are gathered into a single tile
(the causal band: block + W - 1 keys; the 2-D band: the prefix tokens and the patches
within `radius` rows; a prefix query row: every token), so selection happens in
registers:

- distances ``|q|^2 + |k|^2 - 2 q.k`` in fp32 (the squared norms come in precomputed,
  so every pass computes bit-identical distances from the same dot products), clamped
  at 0;
- selection: each candidate gets the int64 key ``(float bits of dist) << 32 | key
  index`` (non-negative floats order like their bits), so the order is "nearer first,
  then lower key index"; ``n_iter`` (= top_k, or 0 when top_k covers every candidate)
  min-reductions raise a per-row threshold to the top_k-th smallest key, and exactly the
  keys <= threshold are kept: min(top_k, #candidates) of them, ties broken by index;
- softmax over the kept, times V. The forward saves the log-sum-exp and the threshold
  key per row; the backward recomputes the scores from them.

NaN policy (krause/nonfinite.py): the norms come in non-finite for a query or key with a
NaN/inf entry, and the forward flags value rows with one as it loads them; a query with such
a candidate gets an all-NaN output row and the threshold key -1 ("keeps nothing"), so the
backward passes no gradient through it. Every tile is loaded with its non-finite entries
read as 0 (``_load_rows``), so a NaN outside a query's candidates never reaches its
products (a 0 weight times NaN would be NaN).

The backward is FlashAttention-2 shaped: a query-block pass for dq and the per-head
dlog_sigma partial sums, and a key-block pass for dk/dv that loops over the query heads
sharing a key/value head (GQA without expansion) — no atomics anywhere. The backward
recognises the threshold key by its index and compares other recomputed distances with
the saved threshold distance within a tolerance of the norms (a tile of another shape
may round the dot products differently), breaking in-band ties by index, so exact
duplicates follow the forward's choice (see _kept_backward).
"""

import triton
import triton.language as tl

# Sentinel selection key for "not a candidate" / "keep every candidate".
BIG = tl.constexpr(0x7FFFFFFFFFFFFFFF)

# Index modes of the "other side" of a tile (see _other_index).
CAUSAL_KEYS = 0  # keys of a causal query block: the band block + W - 1 wide
GRID_BAND = 1  # prefix tokens then the patch band of a 2-D block (queries or keys: symmetric)
ALL = 2  # every token (2-D prefix queries; queries of the 2-D prefix keys)
CAUSAL_QUERIES = 3  # query rows that see a causal key block


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. PREC "ieee": fp32 operands in full precision;
    "default": half-precision operands; "upcast": operands cast to fp32 first (exact for
    bf16: Triton's CPU interpreter multiplies bf16 storage as integers in tl.dot)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == "default":  # fp16 / bf16 operands: the backend's tensor-core dot
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _other_index(start, chunk, Tq, Tk, W, P, P_PAD, cols, radius, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Indices of the tokens on the other side of a tile whose own block starts at `start`."""
    a = tl.arange(0, BLOCK)
    if MODE == 0:
        idx = start + (Tk - Tq) - W + 1 + a
    elif MODE == 1:
        lo = tl.maximum(start - P - radius * cols - radius, 0)
        idx = tl.where(a < P_PAD, tl.where(a < P, a, -1), P + lo + a - P_PAD)
    elif MODE == 2:
        idx = chunk * BLOCK + a
    else:
        idx = start - (Tk - Tq) + a
    return idx


@triton.jit
def _candidates(qi, kj, Tq, Tk, W, P, cols, radius, GRID: tl.constexpr, CHEB: tl.constexpr):
    """Bool tile: key kj (1, N) is a candidate of query row qi (M, 1)."""
    ok = (qi >= 0) & (qi < Tq) & (kj >= 0) & (kj < Tk)
    if GRID:
        pq = tl.maximum(qi - P, 0)
        pk = tl.maximum(kj - P, 0)
        dr = tl.abs(pq // cols - pk // cols)
        dc = tl.abs(pq % cols - pk % cols)
        if CHEB:
            gd = tl.maximum(dr, dc)
        else:
            gd = dr + dc
        ok = ok & ((qi < P) | (kj < P) | (gd <= radius))
    else:
        pos = qi + (Tk - Tq)
        ok = ok & (kj <= pos) & (kj > pos - W)
    return ok


@triton.jit
def _load_raw(base, idx, D, BLOCK_D: tl.constexpr, ROWS_OK):
    d = tl.arange(0, BLOCK_D)
    ptrs = base + idx[:, None] * D + d[None, :]
    return tl.load(ptrs, mask=ROWS_OK[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _finite(x):
    """Elementwise: x is neither NaN nor an infinity."""
    return tl.abs(x.to(tl.float32)) < float("inf")


@triton.jit
def _load_rows(base, idx, D, BLOCK_D: tl.constexpr, ROWS_OK):
    """A tile of rows with non-finite entries read as 0."""
    x = _load_raw(base, idx, D, BLOCK_D, ROWS_OK)
    return tl.where(_finite(x), x, 0.0).to(x.dtype)


@triton.jit
def _nonfinite_rows(x):
    """Per row of a raw tile: it holds a NaN or an infinity."""
    return tl.max(tl.where(_finite(x), 0, 1), axis=1) > 0


@triton.jit
def _distances(qt, kt, qn, kn, PREC: tl.constexpr):
    """fp32 squared distances (raw, before clamping) of a (M, D) x (N, D) tile pair."""
    dot = _mm(qt, tl.trans(kt), PREC)
    return qn[:, None] + kn[None, :] - 2.0 * dot


@triton.jit
def _select_key(dist, cand, kj):
    """int64 selection key of each candidate (BIG for non-candidates)."""
    bits = dist.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(cand, (bits << 32) | kj.to(tl.int64), BIG)


@triton.jit
def _threshold(key, n_iter, BLOCK_M: tl.constexpr):
    """Per row, the n_iter-th smallest key (BIG when fewer candidates or n_iter == 0)."""
    thr = tl.full([BLOCK_M], -1, tl.int64)
    for _ in range(n_iter):
        thr = tl.min(tl.where(key > thr[:, None], key, BIG), axis=1)
    return tl.where(n_iter > 0, thr, BIG)


@triton.jit
def _kept_backward(dist, cand, kj, qn, kn, thr):
    """The forward's kept set from its threshold key, robust to the recomputed distances
    rounding differently: the threshold key itself is recognised by index; others within
    ~80 fp32 ulps of the norms of the threshold distance count as tied and go by index."""
    full = thr == BIG
    thr_d = (thr >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    thr_i = thr - ((thr >> 32) << 32)  # the tie index (low 32 bits)
    tol = 1e-5 * (qn[:, None] + kn[None, :])
    idx = kj.to(tl.int64)
    near = tl.abs(dist - thr_d[:, None]) <= tol
    kept = (idx == thr_i[:, None]) | (dist < thr_d[:, None] - tol) | (near & (idx < thr_i[:, None]))
    return cand & (thr >= 0)[:, None] & (full[:, None] | kept)  # thr -1: a NaN row keeps nothing


@triton.jit
def _kept_probs(keep, coef, dist, lse):
    """The backward's probabilities exp(s - lse) of the kept logits s = -coef dist, formed as
    the forward forms them (the logit through the select, then the difference): a multiply
    fused into the subtraction would round s unlike the forward's max did, which past
    coef dist ~ 1e9 puts exp out of range."""
    s = tl.where(keep, -coef * dist, float("-inf"))
    return tl.exp(s - lse[:, None])


@triton.jit
def _coef(LS, h, LS_PER_HEAD: tl.constexpr):
    """1 / (2 sigma_h^2) for head h (scalar)."""
    if LS_PER_HEAD:
        ls = tl.load(LS + h).to(tl.float32)
    else:
        ls = tl.load(LS).to(tl.float32)
    return 0.5 * tl.exp(-2.0 * ls)


@triton.jit
def _fwd_kernel(
    Q, K, V, QN, KN, LS, KVALID, O, LSE, THR,
    H, G, Tq, Tk, D, W, P, P_PAD, cols, radius, n_iter, row_start,
    LS_PER_HEAD: tl.constexpr, HAS_VALID: tl.constexpr, GRID: tl.constexpr, CHEB: tl.constexpr,
    KMODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(1)  # query block (axis 1: at most 65535 of them)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bk = b * (H // G) + h // G
    m0 = row_start + pid * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    if KMODE == 2:  # the prefix-row launch of the 2-D op
        row_ok = row_ok & (rows < P)
    kj = _other_index(m0, 0, Tq, Tk, W, P, P_PAD, cols, radius, KMODE, BLOCK_N)
    k_ok = (kj >= 0) & (kj < Tk)

    qt = _load_rows(Q + bh.to(tl.int64) * Tq * D, rows, D, BLOCK_D, row_ok)
    kt = _load_rows(K + bk.to(tl.int64) * Tk * D, kj, D, BLOCK_D, k_ok)
    qn = tl.load(QN + bh * Tq + rows, mask=row_ok, other=0.0)
    kn = tl.load(KN + bk * Tk + kj, mask=k_ok, other=0.0)
    raw = _distances(qt, kt, qn, kn, PREC)
    dist = tl.where(raw > 0.0, raw, 0.0)
    cand = _candidates(rows[:, None], kj[None, :], Tq, Tk, W, P, cols, radius, GRID, CHEB) & row_ok[:, None]
    if HAS_VALID:
        real = tl.load(KVALID + b * Tk + kj, mask=k_ok, other=0)
        cand = cand & (real != 0)[None, :]

    vt = _load_raw(V + bk.to(tl.int64) * Tk * D, kj, D, BLOCK_D, k_ok)
    bad = tl.max(tl.where(cand & ((_finite(raw) == 0) | _nonfinite_rows(vt)[None, :]), 1, 0), axis=1) > 0
    vt = tl.where(_finite(vt), vt, 0.0).to(vt.dtype)
    key = _select_key(dist, cand, kj[None, :])
    thr = tl.where(bad, -1, _threshold(key, n_iter, BLOCK_M))
    keep = cand & (key <= thr[:, None])

    coef = _coef(LS, h, LS_PER_HEAD)
    s = tl.where(keep, -coef * dist, float("-inf"))
    m = tl.max(s, axis=1)
    has = m > float("-inf")
    m = tl.where(has, m, 0.0)
    p = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
    l = tl.sum(p, axis=1)
    acc = _mm(p.to(vt.dtype), vt, PREC)
    inv = tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)
    out = tl.where(bad[:, None], float("nan"), acc * inv[:, None])
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), 0.0)

    d = tl.arange(0, BLOCK_D)
    tl.store(O + bh.to(tl.int64) * Tq * D + rows[:, None] * D + d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))
    tl.store(LSE + bh * Tq + rows, lse, mask=row_ok)
    tl.store(THR + bh * Tq + rows, thr, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, QN, KN, LS, KVALID, DO, LSE, THR, DELTA, DQ, DCOEF,
    H, G, Tq, Tk, D, W, P, P_PAD, cols, radius, row_start,
    LS_PER_HEAD: tl.constexpr, HAS_VALID: tl.constexpr, GRID: tl.constexpr, CHEB: tl.constexpr,
    KMODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(1)  # query block (axis 1: at most 65535 of them)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bk = b * (H // G) + h // G
    m0 = row_start + pid * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    if KMODE == 2:  # the prefix-row launch of the 2-D op
        row_ok = row_ok & (rows < P)
    kj = _other_index(m0, 0, Tq, Tk, W, P, P_PAD, cols, radius, KMODE, BLOCK_N)
    k_ok = (kj >= 0) & (kj < Tk)

    qt = _load_rows(Q + bh.to(tl.int64) * Tq * D, rows, D, BLOCK_D, row_ok)
    kt = _load_rows(K + bk.to(tl.int64) * Tk * D, kj, D, BLOCK_D, k_ok)
    vt = _load_rows(V + bk.to(tl.int64) * Tk * D, kj, D, BLOCK_D, k_ok)
    dot_ = _load_raw(DO + bh.to(tl.int64) * Tq * D, rows, D, BLOCK_D, row_ok)
    qn = tl.load(QN + bh * Tq + rows, mask=row_ok, other=0.0)
    kn = tl.load(KN + bk * Tk + kj, mask=k_ok, other=0.0)
    lse = tl.load(LSE + bh * Tq + rows, mask=row_ok, other=0.0)
    thr = tl.load(THR + bh * Tq + rows, mask=row_ok, other=0)
    dot_ = tl.where((thr >= 0)[:, None], dot_, 0.0).to(dot_.dtype)  # a NaN row's upstream gradient is ignored
    raw = _distances(qt, kt, qn, kn, PREC)
    dist = tl.where(raw > 0.0, raw, 0.0)
    cand = _candidates(rows[:, None], kj[None, :], Tq, Tk, W, P, cols, radius, GRID, CHEB) & row_ok[:, None]
    if HAS_VALID:
        real = tl.load(KVALID + b * Tk + kj, mask=k_ok, other=0)
        cand = cand & (real != 0)[None, :]
    keep = _kept_backward(dist, cand, kj[None, :], qn, kn, thr)

    coef = _coef(LS, h, LS_PER_HEAD)
    p = _kept_probs(keep, coef, dist, lse)
    dp = _mm(dot_, tl.trans(vt), PREC)
    # delta = do . out, from the kept scores in fp32 (the whole row is in the tile); stored
    # for the key pass. do . out with a bf16 `out` would bias dlog_sigma by its rounding.
    delta = tl.sum(p * dp, axis=1)
    tl.store(DELTA + bh * Tq + rows, delta, mask=row_ok)
    ds = p * (dp - delta[:, None])
    dcoef = tl.sum(tl.where(keep, -ds * dist, 0.0), axis=1)  # per row (dist may be inf off the kept set)
    dd = tl.where(raw >= 0.0, -coef * ds, 0.0)  # d loss / d distance (clamp passes raw >= 0)
    dq = 2.0 * tl.sum(dd, axis=1)[:, None] * qt.to(tl.float32) - 2.0 * _mm(dd.to(kt.dtype), kt, PREC)

    d = tl.arange(0, BLOCK_D)
    tl.store(DQ + bh.to(tl.int64) * Tq * D + rows[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))
    tl.store(DCOEF + bh * Tq + rows, dcoef, mask=row_ok)  # per row: the same whatever the block size


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, QN, KN, LS, KVALID, DO, LSE, THR, DELTA, DK, DV,
    H, G, Tq, Tk, D, W, P, P_PAD, cols, radius, key_start, key_end, num_chunks,
    LS_PER_HEAD: tl.constexpr, HAS_VALID: tl.constexpr, GRID: tl.constexpr, CHEB: tl.constexpr,
    QMODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(1)  # key block
    bk = tl.program_id(0)
    hkv = H // G
    b = bk // hkv
    n0 = key_start + pid * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    k_ok = keys < key_end
    kt = _load_rows(K + bk.to(tl.int64) * Tk * D, keys, D, BLOCK_D, k_ok)
    vt = _load_rows(V + bk.to(tl.int64) * Tk * D, keys, D, BLOCK_D, k_ok)
    kn = tl.load(KN + bk * Tk + keys, mask=k_ok, other=0.0)
    real = k_ok
    if HAS_VALID:
        real = real & (tl.load(KVALID + b * Tk + keys, mask=k_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(G):
        h = (bk % hkv) * G + g
        bh = b * H + h
        coef = _coef(LS, h, LS_PER_HEAD)
        for c in range(num_chunks):
            qi = _other_index(n0, c, Tq, Tk, W, P, P_PAD, cols, radius, QMODE, BLOCK_Q)
            q_ok = (qi >= 0) & (qi < Tq)
            qt = _load_rows(Q + bh.to(tl.int64) * Tq * D, qi, D, BLOCK_D, q_ok)
            dot_ = _load_raw(DO + bh.to(tl.int64) * Tq * D, qi, D, BLOCK_D, q_ok)
            qn = tl.load(QN + bh * Tq + qi, mask=q_ok, other=0.0)
            lse = tl.load(LSE + bh * Tq + qi, mask=q_ok, other=0.0)
            thr = tl.load(THR + bh * Tq + qi, mask=q_ok, other=0)
            dot_ = tl.where((thr >= 0)[:, None], dot_, 0.0).to(dot_.dtype)  # a NaN row's upstream gradient is ignored
            delta = tl.load(DELTA + bh * Tq + qi, mask=q_ok, other=0.0)
            raw = _distances(qt, kt, qn, kn, PREC)  # (queries, keys), as in the forward
            dist = tl.where(raw > 0.0, raw, 0.0)
            cand = _candidates(qi[:, None], keys[None, :], Tq, Tk, W, P, cols, radius, GRID, CHEB)
            cand = cand & real[None, :]
            keep = _kept_backward(dist, cand, keys[None, :], qn, kn, thr)
            p = _kept_probs(keep, coef, dist, lse)
            dv += _mm(tl.trans(p.to(dot_.dtype)), dot_, PREC)
            dp = _mm(dot_, tl.trans(vt), PREC)
            ds = p * (dp - delta[:, None])
            dd = tl.where(raw >= 0.0, -coef * ds, 0.0)
            dk += 2.0 * tl.sum(dd, axis=0)[:, None] * kt.to(tl.float32) \
                - 2.0 * _mm(tl.trans(dd.to(qt.dtype)), qt, PREC)

    d = tl.arange(0, BLOCK_D)
    off = bk.to(tl.int64) * Tk * D + keys[:, None] * D + d[None, :]
    smask = k_ok[:, None] & (d[None, :] < D)
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=smask)


@triton.jit
def _decode_kernel(
    Q, K, V, QN, KN, LS, LENGTHS, VALID, O,
    H, G, C, D, window, pos, n_iter,
    LS_PER_HEAD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch, kv head): its G query heads against the C ring slots."""
    bk = tl.program_id(0)
    hkv = H // G
    b = bk // hkv
    g = tl.arange(0, BLOCK_M)
    g_ok = g < G
    heads = (bk % hkv) * G + g
    slots = tl.arange(0, BLOCK_N)
    W = C  # the ring's slot count (token p lives in slot p % C)
    length = tl.load(LENGTHS + b).to(tl.int32)
    # slot s holds the token written (pos - 1 - s) mod C steps ago (ring layout of krause.cache)
    age = ((pos - 1 - slots) % W + W) % W
    s_ok = (slots < W) & (age < tl.minimum(tl.minimum(length, pos), window))
    if HAS_VALID:
        s_ok = s_ok & (tl.load(VALID + b * W + slots, mask=slots < W, other=0) != 0)
    kpos = pos - 1 - age  # absolute position: ties go to the older token

    qt = _load_rows(Q + b.to(tl.int64) * H * D, heads, D, BLOCK_D, g_ok)
    kt = _load_rows(K + bk.to(tl.int64) * W * D, slots, D, BLOCK_D, slots < W)
    vt = _load_raw(V + bk.to(tl.int64) * W * D, slots, D, BLOCK_D, slots < W)
    qn = tl.load(QN + b * H + heads, mask=g_ok, other=0.0)
    kn = tl.load(KN + bk * W + slots, mask=slots < W, other=0.0)
    raw = _distances(qt, kt, qn, kn, PREC)
    dist = tl.where(raw > 0.0, raw, 0.0)
    cand = g_ok[:, None] & s_ok[None, :]
    bad = tl.max(tl.where(cand & ((_finite(raw) == 0) | _nonfinite_rows(vt)[None, :]), 1, 0), axis=1) > 0
    vt = tl.where(_finite(vt), vt, 0.0).to(vt.dtype)
    key = _select_key(dist, cand, kpos[None, :])
    thr = tl.where(bad, -1, _threshold(key, n_iter, BLOCK_M))
    keep = cand & (key <= thr[:, None])
    if LS_PER_HEAD:
        ls = tl.load(LS + heads, mask=g_ok, other=0.0).to(tl.float32)
    else:
        ls = tl.load(LS).to(tl.float32) + tl.zeros([BLOCK_M], dtype=tl.float32)
    coef = 0.5 * tl.exp(-2.0 * ls)
    s = tl.where(keep, -coef[:, None] * dist, float("-inf"))
    m = tl.max(s, axis=1)
    has = m > float("-inf")
    m = tl.where(has, m, 0.0)
    p = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
    l = tl.sum(p, axis=1)
    acc = _mm(p.to(vt.dtype), vt, PREC)
    out = tl.where(bad[:, None], float("nan"), acc * tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)[:, None])
    d = tl.arange(0, BLOCK_D)
    tl.store(O + b.to(tl.int64) * H * D + heads[:, None] * D + d[None, :], out.to(O.dtype.element_ty),
             mask=g_ok[:, None] & (d[None, :] < D))
