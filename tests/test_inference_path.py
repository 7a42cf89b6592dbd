"""The causal op's inference path (``krause.ops.plain_inference``): without autograd or
anything that watches the op, ``causal_krause_attention`` runs the op's kernel as a plain
function and skips what only the backward reads. Its outputs must be the autograd path's,
bit for bit, on every kernel it applies to (the compiled CPU kernel and the engine),
padding, GQA, ties and NaN rows included; anything that must see the op still does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import krause
from krause import cpu, ops

from test_conformance import CAUSAL, make_inputs, padding, poison

KERNELS = ("compiled", "engine")


def _kernel(name):
    if name == "compiled" and not cpu.active():
        pytest.skip(f"compiled CPU kernel: {cpu.status()}")
    return cpu.use_engine(name == "engine")


def _both_paths(q, k, v, ls, window, top_k, mask, dtype):
    """(inference output, autograd output) of one call."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.no_grad():
        lean = krause.causal_krause_attention(q, k, v, ls, window, top_k, key_padding_mask=mask, impl="fast")
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    full = krause.causal_krause_attention(*leaves, ls.detach().clone().requires_grad_(True), window, top_k,
                                          key_padding_mask=mask, impl="fast")
    return lean, full.detach()


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CAUSAL))
@pytest.mark.parametrize("kernel", KERNELS)
def test_inference_output_is_the_autograd_output(kernel, case, dtype, one_torch_thread):
    b, h, hkv, tq, tk, d, window, top_k, per_head, pad, dup, _ = CAUSAL[case]
    q, k, v, ls, _ = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=len(case), dup_keys=dup)
    with _kernel(kernel):
        lean, full = _both_paths(q, k, v, ls, window, top_k, padding(pad, b, tk), dtype)
    _same_bits(lean, full)


@pytest.mark.parametrize("kind", ["q", "k", "v"])
@pytest.mark.parametrize("case", ["end-aligned", "decode-step", "left-padding", "holes"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_inference_nan_rows_are_the_autograd_ones(kernel, case, kind, one_torch_thread):
    b, h, hkv, tq, tk, d, window, top_k, per_head, pad, dup, _ = CAUSAL[case]
    q, k, v, ls, _ = make_inputs(b, h, hkv, tq, tk, d, per_head, seed=len(case), dup_keys=dup)
    with _kernel(kernel):
        lean, full = _both_paths(*poison(q, k, v, kind), ls, window, top_k, padding(pad, b, tk), torch.float32)
    assert lean.isnan().any()
    _same_bits(lean, full)


@pytest.mark.parametrize("kernel", KERNELS)
def test_decoding_steps_take_the_inference_path(kernel, monkeypatch, one_torch_thread):
    """A no-grad call (a parameter sigma included) never enters the custom op; a call that
    wants gradients does."""
    q, k, v, _, _ = make_inputs(1, 4, 2, 1, 33, 16, True, seed=3)
    sigma = torch.nn.Parameter(torch.full((4,), 0.3))
    with _kernel(kernel):
        expected = krause.causal_krause_attention(q, k, v, sigma, 32, 8, impl="fast").detach()

        def refuse(*args, **kwargs):
            raise AssertionError("the custom op ran")

        monkeypatch.setattr(ops, "_causal_fwd", refuse)
        with torch.no_grad():
            out = krause.causal_krause_attention(q, k, v, sigma, 32, 8, impl="fast")
        with torch.inference_mode():
            out_inference_mode = krause.causal_krause_attention(q, k, v, sigma, 32, 8, impl="fast")
        with pytest.raises(AssertionError, match="the custom op ran"):
            krause.causal_krause_attention(q, k, v, sigma, 32, 8, impl="fast")  # sigma wants a gradient
    _same_bits(out, expected)
    _same_bits(out_inference_mode, expected)


def test_what_watches_the_op_still_sees_it(one_torch_thread):
    q, k, v, ls, _ = make_inputs(1, 2, 1, 1, 20, 8, False, seed=1)
    with torch.no_grad():
        assert ops.plain_inference(q, k, v, ls, None)
        assert ops.plain_inference(q, k, v, torch.nn.Parameter(ls))
        with FlopCounterMode(display=False) as counter:
            assert not ops.plain_inference(q, k, v, ls)
            krause.causal_krause_attention(q, k, v, ls, 8, 4, impl="fast")
        assert counter.get_total_flops() > 0  # counted by the op's formula
        with torch.device("cpu"):  # a torch function mode
            assert not ops.plain_inference(q, k, v, ls)
        assert not ops.plain_inference(q.to("meta"), k, v, ls)
        # vmap hands wrapped tensors: the op (and its batching fallback) must see them
        batched = torch.vmap(lambda q_: krause.causal_krause_attention(q_, k, v, ls, 8, 4, impl="fast"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "There is a performance drop")  # torch's loop over the batch
            stacked = batched(torch.stack([q, 2 * q]))
        for i, scale in enumerate((1, 2)):
            _same_bits(stacked[i], krause.causal_krause_attention(scale * q, k, v, ls, 8, 4, impl="fast"))
    assert not ops.plain_inference(q, k, v, ls.requires_grad_(True))
    assert ops.plain_inference(q, k, v, ls.detach())


@pytest.mark.skipif(not cpu.active(), reason=f"compiled CPU kernel: {cpu.status()}")
@pytest.mark.parametrize("saved", [True, False])
def test_compiled_forward_does_not_depend_on_the_keys_before_the_window(saved, one_torch_thread):
    """The compiled forward cuts off the keys older than the first query's window only when
    they outnumber the keys it reads; with a short or a long such prefix, the same query
    gives the same bits (and saved kept indices into the full keys)."""
    q, k, v, ls, _ = make_inputs(2, 4, 2, 3, 60, 16, True, seed=5, dup_keys=7)
    k[0, 1, 20, 2] = float("nan")  # outside every window: must not reach the output
    valid = torch.rand(2, 60, generator=torch.Generator().manual_seed(0)) > 0.2
    window, top_k = 10, 4
    outs = []
    for start in (0, 40, 45, 48):  # keys before the window: 48, 8, 3, 0 (the window reads 12)
        out, probs, dist, kept = cpu.causal_forward(q, k[:, :, start:], v[:, :, start:], ls, valid[:, start:],
                                                    window, top_k, saved=saved)
        if saved:
            kept = torch.where(kept >= 0, kept + start, kept)  # into the 60 keys
            outs.append((out, probs, dist, kept))
        else:  # inference: the kernel writes the output only
            assert probs.shape == dist.shape == kept.shape == (*q.shape[:3], 0)
            outs.append((out,))
    assert not outs[0][0].isnan().any()
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            _same_bits(a, b)
