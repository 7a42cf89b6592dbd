"""Longformer-style and routing attention (the paper's two missing LM baselines): dense
loop references, causality, gradients, decoding, padding, the k-means update, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from krause.nn import KrauseConfig, LongformerAttention, RoutingAttention, build_attention


def _x(b=2, t=13, d=16, seed=0):
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


def _dense(q, k, v, allowed):
    """Softmax(q . k / sqrt(d)) over the allowed keys, one (b, h, i) at a time."""
    b, h, t, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(t) if allowed(bi, hi, i, j)]
                scores = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(scores, 0) @ v[bi, hi, keys]
    return out


def _longformer_reference(q, k, v, window, global_tokens):
    return _dense(q, k, v, lambda b, h, i, j: j <= i and (i - j < window or j < global_tokens))


def _routing_reference(q, k, v, centroids):
    h = q.shape[1]
    k_rep = k.repeat_interleave(h // k.shape[1], dim=1)

    def cluster(vec, head):
        cos = [F.cosine_similarity(vec, centroids[head, c], dim=0) for c in range(centroids.shape[1])]
        return int(torch.stack(cos).argmax())

    return _dense(q, k, v, lambda b, hd, i, j: j <= i and (j == i or cluster(q[b, hd, i], hd) == cluster(k_rep[b, hd, j], hd)))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window, global_tokens", [(3, 2), (4, 0), (20, 3)])
def test_longformer_equals_the_dense_reference(heads, kv_heads, window, global_tokens):
    torch.manual_seed(0)
    mod = LongformerAttention(16, heads, kv_heads, window=window, global_tokens=global_tokens).eval()
    x = _x()
    q, k, v = mod.project(x)
    expected = mod.merge(_longformer_reference(q, k, v, window, global_tokens))
    torch.testing.assert_close(mod(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2)])
def test_routing_equals_the_dense_reference(heads, kv_heads):
    torch.manual_seed(0)
    mod = RoutingAttention(16, heads, kv_heads, num_clusters=3).eval()
    x = _x()
    q, k, v = mod.project(x)
    expected = mod.merge(_routing_reference(q, k, v, mod.centroids))
    torch.testing.assert_close(mod(x), expected, atol=1e-5, rtol=1e-5)
    # the clusters are not trivial here: some query sees fewer keys than the causal prefix
    from krause.nn import nearest_cluster

    assert nearest_cluster(q, mod.centroids).unique().numel() > 1


def _modules():
    torch.manual_seed(0)
    return {"longformer": LongformerAttention(16, 2, window=3, global_tokens=2),
            "routing": RoutingAttention(16, 2, num_clusters=3)}


@pytest.mark.parametrize("name", ["longformer", "routing"])
def test_causal_and_gradients_reach_every_projection(name):
    mod = _modules()[name].eval()
    x = _x()
    later = x.clone()
    later[:, 7:] = torch.randn_like(later[:, 7:])
    torch.testing.assert_close(mod(later)[:, :7], mod(x)[:, :7], atol=0, rtol=0)
    assert not torch.allclose(mod(later)[:, 7:], mod(x)[:, 7:])
    mod(x).square().sum().backward()
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(mod, proj).weight.grad.abs().sum() > 0, proj


@pytest.mark.parametrize("name", ["longformer", "routing"])
def test_cached_decoding_equals_the_full_forward(name):
    mod = _modules()[name].eval()
    x = _x(t=15)
    with torch.no_grad():
        full = mod(x)
        cache = mod.new_cache(2, capacity=4)  # grows past its first capacity
        steps = [mod(x[:, :5], cache)] + [mod(x[:, i:i + 1], cache) for i in range(5, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["longformer", "routing"])
def test_a_left_padded_row_equals_its_unpadded_run(name):
    mod = _modules()[name].eval()
    x = _x(b=1, t=9)
    padded = torch.cat([torch.randn(1, 4, 16), x], dim=1)
    mask = torch.tensor([[False] * 4 + [True] * 9])
    with torch.no_grad():
        torch.testing.assert_close(mod(padded, key_padding_mask=mask)[:, 4:], mod(x), atol=1e-5, rtol=1e-5)


def test_longformer_global_tokens_reach_beyond_the_window():
    mod = LongformerAttention(16, 2, window=2, global_tokens=1).eval()
    x = _x(t=10)
    changed = x.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(mod(changed)[:, 9], mod(x)[:, 9])  # token 0 is global
    changed = x.clone()
    changed[:, 3] += 1.0
    torch.testing.assert_close(mod(changed)[:, 9], mod(x)[:, 9], atol=0, rtol=0)  # token 3 is out of the window


def test_routing_centroids_follow_the_data_online_in_training_only():
    torch.manual_seed(0)
    mod = RoutingAttention(16, 2, num_clusters=4, decay=0.5)
    assert not any(n == "centroids" for n, _ in mod.named_parameters())
    assert "centroids" in mod.state_dict()  # a persistent buffer: checkpoints and save_pretrained carry it
    before = mod.centroids.clone()
    mod.eval()
    mod(_x())
    assert torch.equal(mod.centroids, before)
    mod.train()
    x = _x(t=32)
    q, k, _ = mod.project(x)
    vectors = F.normalize(torch.cat([q, k], 2).detach(), dim=-1)
    fit_before = (vectors @ before.transpose(-1, -2)).amax(-1).mean()
    for _ in range(5):
        mod(x)
    fit_after = (vectors @ mod.centroids.transpose(-1, -2)).amax(-1).mean()
    assert fit_after > fit_before  # k-means moves the centroids towards the routed vectors
    torch.testing.assert_close(mod.centroids.norm(dim=-1), torch.ones(2, 4))
    sizes = mod.cluster_sizes(x)
    assert sizes.shape == (2, 4) and torch.allclose(sizes.sum(-1), torch.ones(2))


def test_routing_parameter_count_equals_softmax():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_attention("routing", 32, 4)) == count(build_attention("softmax", 32, 4))
    assert count(build_attention("longformer", 32, 4)) == count(build_attention("softmax", 32, 4))


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="^num_clusters 8 is more than the 5 tokens of the block$"):
        RoutingAttention(16, 2, num_clusters=8).train()(_x(t=5))
    with pytest.raises(ValueError, match="^global_tokens 6 is more than the 5 tokens of the block$"):
        LongformerAttention(16, 2, global_tokens=6).train()(_x(t=5))
    with pytest.raises(ValueError, match="^num_clusters must be >= 1, got 0$"):
        KrauseConfig(num_clusters=0)
    with pytest.raises(ValueError, match="^global_tokens must be >= 0, got -1$"):
        KrauseConfig(global_tokens=-1)
    with pytest.raises(ValueError, match="^decay must be in"):
        RoutingAttention(16, 2, decay=1.0)
    from language_models_100m import model_config

    with pytest.raises(ValueError, match=r"^attn_num_clusters 100 is more than the 64 tokens of a block"):
        model_config("tiny", "routing", attn_num_clusters=100)
    with pytest.raises(ValueError, match=r"^attn_global_tokens 65 is more than the 64 tokens of a block"):
        model_config("tiny", "longformer", krause=dict(global_tokens=65))
    assert model_config("tiny", "routing", krause=dict(num_clusters=2)).krause_config.num_clusters == 2


def _routing_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same module on both ranks
    mod = RoutingAttention(16, 2, num_clusters=4, decay=0.5).train()
    mod(_x(t=16, seed=10 + rank))  # different data per rank
    torch.save(mod.centroids, f"{out_dir}/centroids{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_routing_centroids_agree_across_ranks(tmp_path):
    """Each rank sees its own data; the k-means step averages over both, so the centroids
    stay equal (FSDP does not broadcast buffers) and equal one process fed both batches."""
    import torch.multiprocessing as mp

    mp.spawn(_routing_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    c0, c1 = torch.load(tmp_path / "centroids0.pt"), torch.load(tmp_path / "centroids1.pt")
    assert torch.equal(c0, c1)
    torch.manual_seed(0)
    single = RoutingAttention(16, 2, num_clusters=4, decay=0.5).train()
    single(torch.cat([_x(t=16, seed=10), _x(t=16, seed=11)]))
    torch.testing.assert_close(single.centroids, c0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tokens, window, global_tokens", [(1, 4, 2), (13, 3, 2), (13, 20, 3), (64, 8, 4), (40, 5, 0),
                                                           (30, 4, 12)])
def test_longformer_pair_count_equals_its_mask(tokens, window, global_tokens):
    from krause.flops import longformer_pairs
    from krause.nn.longformer import longformer_mask

    mask = longformer_mask(tokens, tokens, window, global_tokens, None, "cpu")
    assert longformer_pairs(tokens, window, global_tokens) == int(mask.sum())


@pytest.mark.parametrize("tokens, clusters", [(1, 3), (8, 2), (13, 4), (64, 8), (7, 7), (5, 9)])
def test_routing_pair_count_equals_its_mask_for_balanced_clusters(tokens, clusters):
    from krause.flops import routing_pairs
    from krause.nn.routing import routing_mask

    balanced = (torch.arange(tokens) % clusters)[None, None]  # every run of C tokens fills each cluster once
    assert routing_pairs(tokens, clusters) == int(routing_mask(balanced, balanced, None).sum())


@pytest.mark.parametrize("attention", ["longformer", "routing"])
def test_lm_flops_count_the_pairs_the_baseline_attends(attention):
    """MFU counts model FLOPs: the dense masked SDPA's T² is replaced by the attended pairs."""
    from krause.flops import longformer_pairs, routing_pairs, softmax_pairs_flops
    from language_models_100m import build_model
    from language_models_100m.steps import train_flops_per_token

    block = 64
    standard = train_flops_per_token(build_model("tiny", "standard", vocab_size=257), block, "cpu") * block
    model = build_model("tiny", attention, vocab_size=257)
    cfg = model.config
    pairs = (longformer_pairs(block, cfg.attn_window, cfg.attn_global_tokens) if attention == "longformer"
             else routing_pairs(block, cfg.attn_num_clusters))
    counted = train_flops_per_token(model, block, "cpu") * block
    head_dim = cfg.n_embd // cfg.n_head
    dense = cfg.n_layer * cfg.n_head * sum(softmax_pairs_flops(block * block, head_dim))
    assert pairs < block * (block + 1) // 2
    assert counted < standard  # fewer pairs than the causal softmax's
    if attention == "longformer":  # the same weights and matmuls as standard: only the attention core differs
        torch_sdpa = standard - counted + cfg.n_layer * cfg.n_head * sum(softmax_pairs_flops(pairs, head_dim))
        assert dense <= torch_sdpa <= 1.5 * dense  # torch counts the dense SDPA at (4 + 8..10) D T² per head
