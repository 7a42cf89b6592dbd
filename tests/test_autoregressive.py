"""autoregressive_transformers: the pixel models (KARM / ARM / LARM), their decoding
caches, bits per dimension, image <-> token layout and the data sources."""

from __future__ import annotations

import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoregressive_transformers import ModelConfig, PixelTransformer, images_to_tokens, load_pixels, model_config
from krause.nn import causal_linear_attention, elu_feature_map
from autoregressive_transformers.common import evaluate_bpd
from autoregressive_transformers.data import eval_shard, tokens_to_images, train_batches

ATTNS = ["krause", "vanilla", "linear"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(attn, seq_len=100, **kw):
    fields = dict(attn=attn, seq_len=seq_len, dim=32, num_layers=2, num_heads=4, window=16, top_k=8, dropout=0.0)
    fields.update(kw)
    torch.manual_seed(0)
    return PixelTransformer(ModelConfig(**fields)).eval()


# --------------------------------------------------------------------------- models
def test_models_differ_only_in_attention():
    models = {a: tiny(a) for a in ATTNS}
    names = {a: {n: p.shape for n, p in m.named_parameters()} for a, m in models.items()}
    krause_only = set(names["krause"]) - set(names["vanilla"])
    assert krause_only and all(n.endswith("attn.log_sigma") for n in krause_only)
    assert names["vanilla"] == names["linear"]
    assert {n: s for n, s in names["krause"].items() if n not in krause_only} == names["vanilla"]
    # same seed, same init for every shared parameter
    for n, p in models["vanilla"].named_parameters():
        torch.testing.assert_close(p, dict(models["krause"].named_parameters())[n], rtol=0, atol=0)
        torch.testing.assert_close(p, dict(models["linear"].named_parameters())[n], rtol=0, atol=0)
    sigma = models["krause"].blocks[0].attn.log_sigma.exp()
    assert sigma.shape == (4,) and torch.allclose(sigma, torch.full((4,), 2.5))


def test_paper_presets():
    m = model_config("mnist", "krause")
    assert (m.seq_len, m.dim, m.num_layers, m.num_heads, m.window, m.top_k, m.sigma, m.dropout) == \
        (784, 256, 12, 8, 128, 96, 2.5, 0.1)
    c = model_config("cifar10", "linear")
    assert (c.seq_len, c.dim, c.num_layers, c.num_heads, c.window, c.top_k) == (3072, 512, 16, 8, 256, 192)
    assert model_config("mnist", "vanilla", dim=64, num_layers=None).dim == 64


@pytest.mark.parametrize("attn", ATTNS)
def test_cached_decoding_equals_full_forward(attn):
    """Prefill chunks and single steps, past the wrap of the Krause ring buffer (W=16 <
    100 tokens): the next-token distribution equals the full forward's at every position."""
    model = tiny(attn)
    x = torch.randint(0, 256, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = F.log_softmax(model(x), -1)
    ids = model.inputs_for(x)
    state = model.new_state(3)
    pieces, t = [], 0
    for length in [7, 1, 1, 1, 30, 1, 1, 20] + [1] * 38:
        pieces.append(model.decode(ids[:, t:t + length], state))
        t += length
    assert t == 100 and state.pos == 100
    cached = F.log_softmax(torch.cat(pieces, 1), -1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_decoding_memory_krause_constant_vanilla_grows():
    sizes = {}
    for attn in ATTNS:
        model = tiny(attn)
        state = model.new_state(2)
        ids = torch.randint(0, 256, (2, 1))
        model.decode(torch.full((2, 1), 256), state)
        grown = []
        for t in range(1, 100):
            model.decode(ids, state)
            if t in (20, 99):
                grown.append((state.nbytes, state.caches[0].num_cached if attn != "linear" else None))
        sizes[attn] = grown
    # 2 layers x (keys + values) x the W=16 tokens of (batch 2, 4 heads, head dim 8) fp32, a view
    # of the last step's W + 1 (krause.cache.WindowCacheLayer._keep_last)
    assert sizes["krause"] == [(2 * 2 * (2 * 4 * (16 + 1) * 8 * 4), 16)] * 2, sizes["krause"]
    assert sizes["linear"][0][0] == sizes["linear"][1][0]
    assert [n for _, n in sizes["vanilla"]] == [21, 100]


def test_start_token_models_first_pixel_and_causality():
    model = tiny("krause")
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (2, 100), generator=g)
    with torch.no_grad():
        logits = model(x)
        # pixel 0 is predicted from the start token alone: the same for every image
        torch.testing.assert_close(logits[0, 0], logits[1, 0])
        y = x.clone()
        y[:, 60:] = torch.randint(0, 256, (2, 40), generator=g)
        changed = model(y)
    torch.testing.assert_close(changed[:, :61], logits[:, :61])  # position t sees pixels < t only
    assert not torch.allclose(changed[:, 61:], logits[:, 61:])


def test_sampling_is_seeded_and_keeps_prefix():
    model = tiny("krause")
    a = model.sample(2, 1.0, generator=torch.Generator().manual_seed(3))
    b = model.sample(2, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 100) and 0 <= a.min() and a.max() < 256
    prefix = torch.randint(0, 256, (2, 40))
    c = model.sample(temperature=0.0, prefix=prefix)
    assert torch.equal(c[:, :40], prefix)
    # greedy completion = argmax of the full forward at every sampled position
    with torch.no_grad():
        logits = model(c)
    assert torch.equal(logits[:, 40:].argmax(-1), c[:, 40:])
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, -1.0)
    with pytest.raises(ValueError, match="prefix length"):
        model.sample(prefix=torch.zeros(1, 100, dtype=torch.long))


@pytest.mark.parametrize("attn", ATTNS)
def test_cached_sampling_equals_sampling_from_full_forwards(attn):
    """The decoding caches (krause.cache layers, the linear state) change no sample: the same
    generator drawing from the full forward's logits at every step gives the same images."""
    from autoregressive_transformers.model import _sample_logits

    model = tiny(attn)
    cached = model.sample(2, 1.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ids = torch.full((2, 1), model.start_token)
    with torch.no_grad():
        for _ in range(model.cfg.seq_len):
            nxt = _sample_logits(model._run(ids, 0, None)[:, -1], 1.0, g)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(cached, ids[:, 1:])


def test_linear_attention_chunked_equals_naive_and_carries_state():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g) for _ in range(3))
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    s = torch.cumsum(fk[..., :, None] * v[..., None, :], 2)  # (B, H, T, D, D): naive prefix sums
    z = torch.cumsum(fk, 2)
    naive = (fq[..., None, :] @ s)[..., 0, :] / ((fq * z).sum(-1, keepdim=True) + 1e-6)
    out, (s_end, z_end) = causal_linear_attention(q, k, v, chunk=16)
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_end, s[:, :, -1], rtol=1e-5, atol=1e-5)
    first, state = causal_linear_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], chunk=16)
    rest, _ = causal_linear_attention(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], state, chunk=16)
    torch.testing.assert_close(torch.cat([first, rest], 2), naive, rtol=1e-5, atol=1e-5)


def test_bad_model_config_one_line_errors():
    for kw, match in [(dict(attn="flash"), "^attn 'flash' is not registered; registered names: gated, krause, linear"), (dict(window=0), "window"),
                      (dict(window=200), "window"), (dict(top_k=17), "top_k"), (dict(top_k=0), "top_k"),
                      (dict(num_heads=5), "num_heads"), (dict(sigma=-1.0), "sigma")]:
        with pytest.raises(ValueError, match=match) as info:
            ModelConfig(**dict(dict(seq_len=100, dim=32, num_heads=4, window=16, top_k=8), **kw))
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- BPD
def test_bpd_equals_hand_computation():
    """evaluate_bpd over uneven batches = sum over images and pixels of -log2 p(x_t | x_<t)
    computed here one position at a time, divided by the number of values."""
    model = tiny("krause", seq_len=30)
    pixels = torch.randint(0, 256, (5, 30), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    result = evaluate_bpd(model, pixels, batch_size=2, device=torch.device("cpu"), progress=False)
    total_bits = 0.0
    with torch.no_grad():
        for img in pixels.long():
            logits = model(img[None])[0].double()
            for t in range(30):
                log_z = torch.logsumexp(logits[t], 0)
                total_bits += float(log_z - logits[t, img[t]]) / math.log(2.0)
    assert result["num_images"] == 5
    assert result["bpd"] == pytest.approx(total_bits / (5 * 30), rel=1e-6)
    assert result["nll_nats"] == pytest.approx(result["bpd"] * math.log(2.0), rel=1e-12)


def test_eval_shards_cover_every_image_once_and_train_batches_are_global():
    for n, world in [(10, 3), (7, 2), (3, 4)]:
        shards = [eval_shard(n, r, world) for r in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(n))
    one = train_batches(20, 8, epoch=3, seed=1)
    two = [train_batches(20, 8, epoch=3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(one) == 2
    for s in range(2):
        assert torch.equal(torch.cat([two[0][s], two[1][s]]), one[s])
    assert not torch.equal(train_batches(20, 8, epoch=4, seed=1)[0], one[0])
    with pytest.raises(ValueError, match="divisible"):
        train_batches(20, 8, 0, 0, 0, 3)


# --------------------------------------------------------------------------- data
def test_token_layout_is_raster_with_interleaved_channels():
    img = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)  # (N, H, W, C)
    tok = images_to_tokens(img)
    assert tok.tolist() == [list(range(12))]  # R00 G00 B00 R01 G01 B01 R10 ...
    assert np.array_equal(tokens_to_images(tok, (2, 2, 3)), img)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tokens(img.astype(np.float32))


def test_embedded_mnist_split():
    train = load_pixels("mnist", "train")
    test = load_pixels("mnist", "test")
    assert train.shape == (4500, 784) and test.shape == (500, 784) and train.dtype == torch.uint8
    assert int(train.max()) == 255 and 0.05 < train.float().mean().item() / 255 < 0.3
    rows = {bytes(r.numpy()) for r in train}
    assert not any(bytes(r.numpy()) in rows for r in test)
    assert load_pixels("mnist", "test", limit=7).shape == (7, 784)


def _write_mnist(root, n_train=6, n_test=4):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
        out[prefix] = images
    return out


def _write_cifar(root, per_batch=3):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    hwc = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        planar = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CIFAR files: R plane, G plane, B plane
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": planar, "labels": list(rng.integers(0, 10, per_batch))}, f)
        hwc[name] = images
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return hwc


def test_torchvision_mnist_files(tmp_path):
    written = _write_mnist(str(tmp_path))
    train = load_pixels("mnist", "train", str(tmp_path))
    test = load_pixels("mnist", "test", str(tmp_path))
    assert torch.equal(train, torch.from_numpy(written["train"].reshape(6, 784)))
    assert torch.equal(test, torch.from_numpy(written["t10k"].reshape(4, 784)))


def test_torchvision_cifar10_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    hwc = _write_cifar(str(tmp_path))
    # torchvision checks the official files' MD5 sums; ours are small stand-ins in the same format
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    train = load_pixels("cifar10", "train", str(tmp_path))
    test = load_pixels("cifar10", "test", str(tmp_path))
    assert train.shape == (15, 3072) and test.shape == (3, 3072)
    expected = hwc["test_batch"]  # (N, H, W, C) -> raster with R,G,B of each pixel interleaved
    assert torch.equal(test, torch.from_numpy(expected.reshape(3, 3072)))
    assert test[0, :3].tolist() == expected[0, 0, 0].tolist()


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs a data path"):
        load_pixels("cifar10", "train")
    with pytest.raises(FileNotFoundError, match="no mnist data under"):
        load_pixels("mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_pixels("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        load_pixels("mnist", "val")


def test_decoding_step_work_is_flat_in_position_for_krause_only():
    """FLOPs of one cached decoding step at token 300 and at token 3,000 (CIFAR-10 length,
    W = 256): the same for KARM (ring buffer) and LARM (recurrent state), growing for ARM."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for attn in ATTNS:
        model = tiny(attn, seq_len=3072, window=256, top_k=192)
        for pos in (300, 3000):
            state = model.new_state(1)
            ids = torch.randint(0, 256, (1, pos), generator=torch.Generator().manual_seed(6))
            ids[:, 0] = model.start_token
            model.decode(ids, state)
            with FlopCounterMode(display=False) as counter:
                model.decode(ids[:, -1:], state)
            flops[attn, pos] = counter.get_total_flops()
    assert flops["krause", 300] == flops["krause", 3000] > 0
    assert flops["linear", 300] == flops["linear", 3000] > 0
    assert flops["vanilla", 3000] > flops["vanilla", 300] * 4


def test_attn_impl_reaches_every_krause_layer():
    model = tiny("krause", attn_impl="reference")
    assert [blk.attn.impl for blk in model.blocks] == ["reference"] * 2
    assert all(blk.attn.new_cache(1).impl == "reference" for blk in model.blocks)
    assert ModelConfig.from_dict({k: v for k, v in model.cfg.to_dict().items() if k != "attn_impl"}).attn_impl == "auto"
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny("krause")(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^attn_impl must be one of"):
        ModelConfig(attn_impl="cuda")


# --------------------------------------------------------------------------- one decoding-cache contract
@pytest.mark.parametrize("attn", ATTNS)
def test_decode_state_is_a_transformers_cache_of_contract_layers(attn):
    """DecodeState is a transformers Cache filled by krause.cache.install_layers, for every attention
    (linear's recurrent state is a transformers linear-attention layer): the Cache's row operations act
    on every layer, and decoding on after them equals decoding the reordered rows from the start."""
    from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

    from krause.cache import KrauseWindowLayer, KVCacheLayer, install_layers

    model = tiny(attn)
    expected = {"krause": KrauseWindowLayer, "vanilla": KVCacheLayer, "linear": LinearAttentionCacheLayerMixin}[attn]
    x = torch.randint(0, 256, (3, 100), generator=torch.Generator().manual_seed(7))
    state = model.new_state(3)
    assert isinstance(state, Cache) and len(state) == model.cfg.num_layers
    assert all(isinstance(layer, expected) for layer in state.layers)
    model.prefill(x[:, :30], state)
    layers = list(state.layers)
    assert install_layers(state, lambda: pytest.fail("a filled cache keeps its layers")) == layers
    order = torch.tensor([2, 0, 1])
    state.reorder_cache(order)  # beam search's reorder, through transformers' Cache
    step = model.decode(x[order, 30:31], state)
    fresh = model.new_state(3)
    model.prefill(x[order, :30], fresh)
    torch.testing.assert_close(step, model.decode(x[order, 30:31], fresh))
    state.batch_select_indices(torch.tensor([1]))  # keep one row
    assert state.batch_size == 1
    torch.testing.assert_close(model.decode(x[order[1:2], 31:32], state),
                               model.decode(x[order, 31:32], fresh)[1:2])
    state.batch_repeat_interleave(2)
    assert state.batch_size == 2
    torch.testing.assert_close(model.decode(x[order[1:2], 32:33].repeat(2, 1), state),
                               model.decode(x[order, 32:33], fresh)[1:2].repeat(2, 1, 1))
