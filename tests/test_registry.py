"""The one attention registry: names, KrauseConfig, presets, every family x every name, and
no attention math outside ``krause/``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import krause.nn
from krause.nn import REGISTRY, KrauseConfig, attention_names, build_attention, resolve_name
from krause.nn.config import config_from_fields

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- names and errors
def test_every_name_builds_its_class_and_reads_only_its_fields():
    cfg = KrauseConfig(window=5, top_k=3, sigma=2.0)
    args = {"causal": (16, 2), "vision": (16, 2), "window": (16, 2, 2)}
    layout_kw = {"vision": dict(grid=(2, 2), num_prefix_tokens=1)}
    for name, entry in REGISTRY.items():
        module = build_attention(name, *args[entry.layout], krause=cfg, **layout_kw.get(entry.layout, {}))
        assert type(module) is entry.cls, name
        if entry.takes_config:
            assert module.config == cfg, name
        for field in entry.reads if not entry.takes_config else ():
            assert getattr(module, field) == getattr(cfg, field), (name, field)
    assert build_attention("sliding_window", 16, 2, krause=cfg).window == 5
    assert build_attention("topk", 16, 2, krause=cfg).top_k == 3
    assert build_attention("gated", 16, 2, krause=cfg).config == cfg
    assert not hasattr(build_attention("softmax", 16, 2, krause=cfg), "config")


def test_aliases_and_twin_kinds():
    assert resolve_name("standard") == resolve_name("vanilla") == "softmax"
    assert type(build_attention("standard", 16, 2)) is REGISTRY["softmax"].cls
    assert type(build_attention("causal", 16, 2)) is REGISTRY["softmax"].cls
    assert type(build_attention("causal", 16, 2, krause=KrauseConfig())) is REGISTRY["krause"].cls
    assert attention_names("causal") == sorted(n for n, e in REGISTRY.items() if e.layout == "causal")


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as info:
        build_attention("flash", 16, 2)
    message = str(info.value)
    assert message.startswith("attention 'flash' is not registered; registered names: ")
    assert all(name in message for name in REGISTRY) and "\n" not in message
    with pytest.raises(ValueError, match=r"^attn 'vision_krause' is not registered; registered names: gated, krause"):
        resolve_name("vision_krause", "causal", "attn")  # a 2-D name is not a causal one
    with pytest.raises(ValueError, match="^attention None is not registered"):
        resolve_name(None)


def test_loose_krause_settings_and_bad_config_raise():
    with pytest.raises(ValueError, match="^window is a Krause setting: pass it inside krause="):
        build_attention("sliding_window", 16, 2, window=4)
    with pytest.raises(ValueError, match="^krause must be a KrauseConfig or None, got dict"):
        build_attention("krause", 16, 2, krause=dict(window=4))


def test_one_sigma_check_one_text():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got "):
            KrauseConfig(sigma=bad)
        with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got "):
            krause.nn.check_sigma(bad)
    # the family configs reach the same check, naming their own field
    from autoregressive_transformers import ModelConfig
    from language_models_100m import model_config

    with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got -1.0$"):
        model_config("tiny", "krause", sigma=-1.0)
    with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got 0.0$"):
        ModelConfig(sigma=0.0)
    with pytest.raises(ValueError, match=r"^krause_impl must be one of"):
        model_config("tiny", "krause", krause_impl="cuda")
    with pytest.raises(ValueError, match=r"^attn_impl must be one of"):
        ModelConfig(attn_impl="cuda")


def test_config_from_fields_names_the_family_field():
    names = {"window": "attn_window", "top_k": "attn_top_k"}
    assert config_from_fields({"window": 7}, names) == KrauseConfig(window=7)
    with pytest.raises(ValueError, match="^attn_top_k must be >= 1, got 0$"):
        config_from_fields({"top_k": 0}, names)


# ----------------------------------------------------------------------------- family presets
def test_family_defaults_are_krause_config_overridden_visibly():
    from autoregressive_transformers import DATASETS, ModelConfig, model_config as ar_config
    from language_models_100m import KrauseLMConfig, model_config as lm_config
    from language_models_100m.model import KRAUSE_PRESET

    assert KRAUSE_PRESET == KrauseConfig().replace(window=32, top_k=16)
    assert KrauseLMConfig().krause_config == KRAUSE_PRESET
    assert lm_config("tiny", "krause").krause_config == KRAUSE_PRESET.replace(window=8, top_k=4)
    assert ModelConfig().krause_config == KrauseConfig()
    mnist = ar_config("mnist", "krause").krause_config
    assert mnist == KrauseConfig().replace(**DATASETS["mnist"]["krause"])


def test_a_preset_overriding_an_unknown_field_names_it(monkeypatch):
    import autoregressive_transformers.config as ar
    import language_models_100m.presets as lm

    monkeypatch.setitem(lm.PRESETS, "tiny", dict(lm.PRESETS["tiny"], krause=dict(window=8, topk=4)))
    with pytest.raises(ValueError, match="^topk is not a Krause setting; KrauseConfig fields are "):
        lm.model_config("tiny", "krause")
    monkeypatch.setitem(ar.DATASETS, "mnist", dict(ar.DATASETS["mnist"], krause=dict(windw=64)))
    with pytest.raises(ValueError, match="^windw is not a Krause setting; KrauseConfig fields are "):
        ar.model_config("mnist", "krause")


# ----------------------------------------------------------------------------- every family x every name
def _train_step(model, loss_fn) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.step()
    assert torch.isfinite(loss)
    attn_grads = [g for n, g in grads.items() if ".attn." in n and g is not None]
    assert attn_grads and any(bool(g.abs().sum() > 0) for g in attn_grads), "no gradient reached the attention"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    return float(loss.detach())


CAUSAL = attention_names("causal")
TWO_D = [n for n in REGISTRY if n not in CAUSAL]


def test_language_models_take_every_causal_name_but_linear():
    from language_models_100m import ATTENTIONS, build_model

    assert {resolve_name(a, "causal") for a in ATTENTIONS} == set(CAUSAL) - {"linear"}
    with pytest.raises(ValueError, match="not one of this family's"):
        build_model("tiny", "linear", vocab_size=64)


@pytest.mark.parametrize("name", [n for n in CAUSAL if n != "linear"])
def test_language_model_trains_with_every_causal_attention(name):
    from language_models_100m import build_model

    torch.manual_seed(0)
    model = build_model("tiny", name, vocab_size=64, dropout=0.0)
    attn = model.transformer.h[0].attn
    assert type(attn) is REGISTRY[name].cls
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    _train_step(model, lambda: model(ids, labels=ids, use_cache=False).loss)


@pytest.mark.parametrize("name", CAUSAL)
def test_pixel_model_trains_with_every_causal_attention(name):
    from autoregressive_transformers import ModelConfig, PixelTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(attn=name, seq_len=36, dim=16, num_layers=2, num_heads=2, window=8, top_k=4, dropout=0.0)
    model = PixelTransformer(cfg)
    assert type(model.blocks[0].attn) is REGISTRY[name].cls
    pixels = torch.randint(0, 256, (2, 36), generator=torch.Generator().manual_seed(0))
    _train_step(model, lambda: model.nll(pixels))


def test_the_families_cover_every_registered_name():
    """A name registered later must be exercised by some family here (causal by the two
    decoder families, 2-D by the vision models)."""
    assert set(CAUSAL) | set(TWO_D) == set(REGISTRY)
    assert set(TWO_D) == {n for n, e in REGISTRY.items() if e.layout in ("vision", "window")}


VISION_SMALL = {
    "vit_small_patch4_32": dict(embed_dim=16, depth=2, num_heads=2),
    "kvit_small_patch4_32": dict(embed_dim=16, depth=2, num_heads=2),
    "swin_tiny_patch4_window4_32": dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "kswin_tiny_patch4_window4_32": dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}


@pytest.mark.parametrize("name", TWO_D)
def test_vision_family_trains_with_every_2d_attention(name):
    """The vision family builds its models today; whichever small model holds the
    registered class of ``name`` takes a training step."""
    import timm.models.swin_transformer
    import timm.models.vision_transformer
    import vision_transformers as vt

    # The vision baselines are timm's stock models (a twin differs from its Krause model only in
    # attention by construction), so the 2-D softmax names are realised there by timm's own classes.
    stock = {"vision_softmax": timm.models.vision_transformer.Attention,
             "swin_softmax": timm.models.swin_transformer.WindowAttention}
    cls = stock.get(name, REGISTRY[name].cls)
    for model_name, kwargs in VISION_SMALL.items():
        torch.manual_seed(0)
        model = vt.create(model_name, num_classes=3, **kwargs)
        if any(type(m) is cls for m in model.modules()):
            break
    else:
        pytest.fail(f"no vision model builds the registered attention {name!r} ({cls.__name__})")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    model.train()
    _train_step(model, lambda: torch.nn.functional.cross_entropy(model(images), labels))


# ----------------------------------------------------------------------------- no attention math outside krause/
FAMILIES = ("language_models_100m", "autoregressive_transformers", "vision_transformers", "lora_llms")
ATTENTION_MATH = re.compile(
    r"softmax\(|\.topk\(|\btopk\(|cdist\(|scaled_dot_product_attention|masked_fill\(|\.tril\(|\.triu\("
    r"|transpose\(-1, -2\)|transpose\(-2, -1\)|_attention\(q\b|krause_weights\("
)
#: (file, the matched line's text) that are not attention: sampling a pixel, top-k accuracy.
NOT_ATTENTION = {
    ("autoregressive_transformers/model.py", "probs = torch.softmax(logits.float() / temperature, dim=-1)"),
    ("vision_transformers/hooks.py", "top = logits.topk(k, dim=1).indices"),
}


def test_no_attention_math_outside_krause():
    found = []
    for family in FAMILIES:
        for path in sorted((ROOT / family).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if ATTENTION_MATH.search(code) and (rel, code.strip()) not in NOT_ATTENTION:
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "attention math outside krause/ (build it with krause.nn.build_attention):\n" + "\n".join(found)


def test_the_grep_catches_attention_math(tmp_path):
    """The pattern finds the forms the LM family's deleted copies used."""
    for line in ("return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))",
                 "best = scores.topk(min(top_k, tk), dim=-1).indices",
                 "d = torch.cdist(q, k)", "w = torch.softmax(s, -1)",
                 "scores = q @ k.transpose(-1, -2)",
                 "return self.merge(topk_causal_attention(q, k, v, self.top_k, offset))"):
        assert ATTENTION_MATH.search(line), line
