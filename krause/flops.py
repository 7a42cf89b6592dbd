"""FLOP counts of Krause attention at its real sparse cost.

Per query and head, with D the head dim, |C_i| the candidates and K_i = min(top_k, |C_i|):
- forward: 2 D |C_i| (distances) + 2 D K_i (weighted sum of the kept values);
- backward: 8 D K_i (grad of the kept probabilities, of v, of q and of k: the dropped
  candidates carry no gradient).
Softmax, top-k and other elementwise work are not counted, as for every other op in
``torch.utils.flop_counter``. These formulas are registered for the ops in krause.ops,
so ``FlopCounterMode`` reports them whichever kernels compute the op.

The Longformer and routing baselines run as a dense masked SDPA, which FlopCounterMode counts
at T² per head; ``longformer_pairs`` / ``routing_pairs`` with ``softmax_pairs_flops`` give the
pairs such an attention needs (a model-FLOPs count, as for the Krause op), for MFU and tables.
"""

from __future__ import annotations

import functools

from .masks import grid_candidate_mask


def _sum_min_ramp(num_tokens: int, cap: int) -> int:
    """sum_{i=0}^{T-1} min(cap, i + 1)."""
    if num_tokens <= cap:
        return num_tokens * (num_tokens + 1) // 2
    return cap * (cap + 1) // 2 + (num_tokens - cap) * cap


def _end_aligned_ramp(num_queries: int, num_keys: int | None, cap: int) -> int:
    """sum of min(cap, p + 1) over the positions p of the last num_queries of num_keys keys."""
    num_keys = num_queries if num_keys is None else num_keys
    return _sum_min_ramp(num_keys, cap) - _sum_min_ramp(num_keys - num_queries, cap)


def causal_forward_flops(num_tokens: int, head_dim: int, window: int, top_k: int, num_keys: int | None = None) -> int:
    """FLOPs of one (batch, head) of causal_krause_attention's forward (num_tokens queries,
    the last of num_keys keys; num_keys defaults to num_tokens)."""
    candidates = _end_aligned_ramp(num_tokens, num_keys, window)
    kept = _end_aligned_ramp(num_tokens, num_keys, min(window, top_k))
    return 2 * head_dim * (candidates + kept)


def causal_backward_flops(num_tokens: int, head_dim: int, window: int, top_k: int, num_keys: int | None = None) -> int:
    return 8 * head_dim * _end_aligned_ramp(num_tokens, num_keys, min(window, top_k))


@functools.lru_cache(maxsize=64)
def _local2d_counts(grid, radius, metric, top_k, num_prefix) -> tuple[int, int]:
    per_query = grid_candidate_mask(grid, radius, metric, num_prefix).sum(-1)
    return int(per_query.sum()), int(per_query.clamp(max=top_k).sum())


def local2d_forward_flops(grid, head_dim, radius, metric, top_k, num_prefix) -> int:
    """FLOPs of one (batch, head) of local_krause_attention_2d's forward."""
    candidates, kept = _local2d_counts(tuple(grid), radius, metric, top_k, num_prefix)
    return 2 * head_dim * (candidates + kept)


def local2d_backward_flops(grid, head_dim, radius, metric, top_k, num_prefix) -> int:
    _, kept = _local2d_counts(tuple(grid), radius, metric, top_k, num_prefix)
    return 8 * head_dim * kept


def _register_cpu_sdpa_flops() -> None:
    """Count SDPA on CPU too.

    torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not for the CPU
    flash kernel, so on CPU a softmax baseline's attention would count as 0 FLOPs and
    every Krause-vs-standard FLOP comparison made there would be skewed. We register
    torch's own SDPA formulas for the CPU kernel (dense cost, as on CUDA).
    """
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


# --------------------------------------------------------------------------- masked-softmax baselines
def softmax_pairs_flops(pairs: int, head_dim: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of softmax attention over `pairs` (query, key) pairs of one
    (batch, head): q·k and p·v are 2 D each per pair forward; backward twice that."""
    return 4 * head_dim * pairs, 8 * head_dim * pairs


def longformer_pairs(num_tokens: int, window: int, global_tokens: int) -> int:
    """(query, key) pairs of causal Longformer attention: query i sees the keys in (i - window, i]
    and the first `global_tokens` keys up to i (those outside its window counted once)."""
    pairs = _sum_min_ramp(num_tokens, window)
    # global keys j < global_tokens with j <= i - window: for query i, min(global_tokens, i - window + 1) of them
    for i in range(window, num_tokens):
        pairs += min(global_tokens, i - window + 1)
    return pairs


def routing_pairs(num_tokens: int, num_clusters: int) -> int:
    """(query, key) pairs of causal routing attention with balanced clusters (every run of
    `num_clusters` tokens fills each cluster once): query i sees its own key and the
    floor(i / num_clusters) earlier keys of its cluster. Real counts depend on the data
    (`RoutingAttention.cluster_sizes`); this is the balanced case the method aims for."""
    q, r = divmod(num_tokens, num_clusters)
    return num_tokens + num_clusters * q * (q - 1) // 2 + r * q
