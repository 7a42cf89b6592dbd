"""Dense reference implementations of Krause attention.

Obviously correct and O(N^2) in time and memory: every query scores every key, the
candidate set and the top-k are applied as masks (``krause.dense``, the one formula), and
autograd does the backward. Tests hold the fast implementations equal to these.
"""

from __future__ import annotations

from . import _validation as V
from .dense import causal_candidates, krause_attention_dense, repeat_kv  # noqa: F401  (re-exported)
from .masks import grid_candidate_mask


def causal_krause_attention_reference(q, k, v, log_sigma, window: int, top_k: int, *, key_padding_mask=None):
    """Dense causal-window Krause attention; same contract as ``krause.causal_krause_attention``."""
    V.check_positive_int("window", window)
    V.check_positive_int("top_k", top_k)
    b, h, _, nk, _ = V.check_qkv(q, k, v, end_aligned=True)
    key_padding_mask = V.check_key_padding_mask(key_padding_mask, b, nk, q)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    mask = causal_candidates(q.shape[2], nk, window, key_padding_mask, q.device)
    return krause_attention_dense(q, k, v, log_sigma, mask, top_k)


def local_krause_attention_2d_reference(
    q, k, v, log_sigma, grid, radius: int, metric: str, top_k: int, num_prefix_tokens: int = 1
):
    """Dense 2-D local Krause attention; same contract as ``krause.local_krause_attention_2d``."""
    V.check_nonnegative_int("radius", radius)
    V.check_metric(metric)
    V.check_positive_int("top_k", top_k)
    _, h, _, n, _ = V.check_qkv(q, k, v)
    grid = V.check_grid(grid, n, num_prefix_tokens)
    log_sigma = V.check_log_sigma(log_sigma, h, q)
    mask = grid_candidate_mask(grid, radius, metric, num_prefix_tokens, q.device)
    return krause_attention_dense(q, k, v, log_sigma, mask, top_k)
