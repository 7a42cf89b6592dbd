"""Routing attention (Roy et al., 2021, "Efficient Content-Based Sparse Attention with
Routing Transformers"), a baseline of the language models.

Each head keeps ``num_clusters`` unit-norm centroids (a buffer, not a parameter, so the
parameter count equals the softmax model's), updated online by k-means: in training, every
forward moves each centroid towards the mean of the unit-normalised queries and keys
assigned to it, ``mu <- normalise(decay * mu + (1 - decay) * mean)``, the mean over the
global batch when distributed (so every rank keeps the same centroids, DDP or FSDP).
Queries and keys go to their nearest centroid; a query attends, with causal
softmax(q . k / sqrt(d)), to the earlier keys of its own cluster and always to its own key
(so no row is empty).

Balance: the paper makes clusters equal by giving each centroid its top T/C tokens over
the whole sequence; in a decoder that choice depends on later tokens (whether token i is
among a centroid's top T/C depends on every other token's score), which breaks causality.
Here the assignment of a token depends on that token alone (its nearest centroid), and the
k-means update keeps the centroids where the tokens are; ``cluster_sizes`` reports the
balance. The forward forms a (T, T) mask (the family's 1024-token contexts); decoding keeps
a growing cache and routes the cached keys again with the same (frozen in eval) centroids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _validation as V
from ..masks import end_aligned_mask, masked_sdpa
from ..reference import repeat_kv
from .causal import CausalProjections
from .config import KrauseConfig

EMA_DECAY = 0.999  # the paper's k-means decay


def nearest_cluster(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) vectors and (H, C, D) unit centroids -> (B, H, T) index of the nearest
    centroid of each unit-normalised vector (largest cosine)."""
    return torch.einsum("bhtd,hcd->bhtc", F.normalize(x.float(), dim=-1), centroids.float()).argmax(-1)


def routing_mask(query_clusters: torch.Tensor, key_clusters: torch.Tensor, key_padding_mask) -> torch.Tensor:
    """(B, H, Tq, Tk) bool: query i (the last Tq of Tk positions) sees the causal,
    non-padding keys of its own cluster and its own key."""
    tq, tk = query_clusters.shape[-1], key_clusters.shape[-1]
    causal = end_aligned_mask(tq, tk, None, key_padding_mask, query_clusters.device)
    own = end_aligned_mask(tq, tk, 1, key_padding_mask, query_clusters.device)
    same = query_clusters[..., :, None] == key_clusters[..., None, :]
    return (causal & same) | own


def routing_attention(q, k, v, centroids, key_padding_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal routing attention of q (B, H, Tq, D) (the last Tq positions) over k, v
    (B, Hkv, Tk, D) with (H, C, D) centroids; returns (B, H, Tq, D)."""
    h = q.shape[1]
    allowed = routing_mask(nearest_cluster(q, centroids), nearest_cluster(repeat_kv(k, h), centroids),
                           key_padding_mask)
    return masked_sdpa(q, k, v, allowed, None, dropout_p)


class RoutingAttention(CausalProjections):
    """Causal routing attention with ``num_clusters`` online k-means centroids per head
    (buffer ``centroids``, (H, C, head_dim)); the projections of every causal module here."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None,
                 num_clusters: int = KrauseConfig.num_clusters, *, bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, decay: float = EMA_DECAY):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.num_clusters = V.check_positive_int("num_clusters", num_clusters)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_clusters, self.head_dim), dim=-1))

    def forward(self, x: torch.Tensor, cache=None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project(x)
        if cache is None and self.training and q.shape[2] < self.num_clusters:
            raise ValueError(f"num_clusters {self.num_clusters} is more than the {q.shape[2]} tokens of the block")
        drop = self.attn_drop if self.training else 0.0
        if cache is not None:
            k_all, v_all, padding = cache.append(k, v, key_padding_mask)
        else:
            k_all, v_all = k, v
            padding = V.check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q)
        out = routing_attention(q, k_all, v_all, self.centroids, padding, drop)
        if self.training:  # after routing: this forward's assignments used the centroids it started with
            self._update_centroids(q, repeat_kv(k, self.num_heads), key_padding_mask)
        return self.merge(out)

    @torch.no_grad()
    def _update_centroids(self, q: torch.Tensor, k: torch.Tensor, key_padding_mask) -> None:
        vectors = F.normalize(torch.cat([q, k], dim=2).float(), dim=-1)  # (B, H, 2T, D)
        onehot = F.one_hot(nearest_cluster(vectors, self.centroids), self.num_clusters).float()
        if key_padding_mask is not None:
            onehot = onehot * key_padding_mask.repeat(1, 2)[:, None, :, None].float()
        sums = torch.einsum("bhtc,bhtd->hcd", onehot, vectors)
        counts = onehot.sum((0, 2))[..., None]  # (H, C, 1)
        if dist.is_available() and dist.is_initialized():  # one k-means step over the global batch: ranks agree
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        moved = self.decay * self.centroids.float() + (1 - self.decay) * sums / counts.clamp(min=1)
        self.centroids.copy_(torch.where(counts > 0, F.normalize(moved, dim=-1), self.centroids.float()))

    @torch.no_grad()
    def cluster_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """(H, C) share of the queries of x (B, T, C) routed to each cluster, for analysis."""
        q, _, _ = self.project(x)
        onehot = F.one_hot(nearest_cluster(q, self.centroids), self.num_clusters).float()
        return onehot.mean((0, 2))

    def new_cache(self, batch_size: int | None = None, device=None, dtype=None, capacity: int | None = None):
        """A growing cache, ``capacity`` slots up front (keys are routed again at each step)."""
        from ..cache import KVCacheLayer

        return KVCacheLayer(capacity, dtype=dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, num_clusters={self.num_clusters}"
