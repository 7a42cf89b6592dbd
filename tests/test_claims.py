"""python -m krause.claims (the paper's claims) and krause.training.monitor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from krause.claims import CLAIMS
from krause.claims import __main__ as runner
from krause.claims import corpus, scaling
from krause.claims.common import AGREE, DISAGREE, SKIPPED, MissingPrerequisite, mean_std
from krause.training import monitor


# ----------------------------------------------------------------------------- runner
def test_unknown_claim_lists_the_valid_ones(capsys):
    assert runner.main(["--claim", "vision", "--claim", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err
    for name in CLAIMS:
        assert name in err
    with pytest.raises(ValueError, match="--claim: unknown claim 'x'"):
        runner.select(["x"])


def test_bad_threads_is_refused(capsys):
    assert runner.main(["--claim", "sync", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_claims_run_in_their_fixed_order():
    assert list(CLAIMS) == ["vision", "autoregressive", "lm", "sinks", "sync", "scaling"]
    assert runner.select(["scaling", "vision"]) == ["vision", "scaling"]
    for module in CLAIMS.values():  # every claim states its comparison, the paper's expectation and its rule
        assert module.COMPARISON and module.EXPECTATION and module.RULE.startswith("agree if")


def test_missing_benchmark_script_skips_only_that_claim(tmp_path, monkeypatch):
    fake = tmp_path / "site" / "krause" / "claims" / "scaling.py"
    monkeypatch.setattr(scaling, "__file__", str(fake))
    with pytest.raises(MissingPrerequisite, match="attention_scaling.py not found"):
        scaling.benchmark_script()
    res = runner.run_claim("scaling", tmp_path / "out", tiny=True)
    assert res.verdict == SKIPPED and "attention_scaling.py not found" in res.reason
    saved = json.loads((tmp_path / "out" / "scaling" / "result.json").read_text())
    assert saved["verdict"] == SKIPPED


def test_missing_corpus_skips_the_lm_claim_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "_info_dir", lambda: tmp_path / "no_timm_data")
    with pytest.raises(MissingPrerequisite, match="imagenet_synset_to_definition.txt not found"):
        corpus.load_corpus()
    monkeypatch.setattr(scaling, "__file__", str(tmp_path / "a" / "b" / "c" / "scaling.py"))
    assert runner.main(["--claim", "lm", "--claim", "scaling", "--tiny", "--out_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped: corpus:" in out and "skipped: " in out.split("== claim scaling")[1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["verdict"] for c in summary["claims"]] == [SKIPPED, SKIPPED]


def test_fit_slope_recovers_powers():
    ts = [256, 512, 1024, 2048]
    assert scaling.fit_slope(ts, [3e-6 * t for t in ts]) == pytest.approx(1.0)
    assert scaling.fit_slope(ts, [1e-9 * t * t for t in ts]) == pytest.approx(2.0)
    assert math.isnan(scaling.fit_slope([1024], [1.0]))


def test_mean_std():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_sinks_reuses_only_lm_models_of_the_same_size(tmp_path):
    from krause.claims import language
    from krause.claims.common import Context

    tiny = language.settings(True)
    for kind in language.KINDS:
        for seed in tiny["seeds"]:
            language.save(language.build(kind, tiny), language.model_dir(tmp_path, kind, seed), kind, tiny, seed)
    found = language.trained_models(Context(out_dir=tmp_path, root=tmp_path, tiny=True), tmp_path)
    assert sorted(found) == sorted((k, s) for k in language.KINDS for s in tiny["seeds"])
    model, kind, _ = language.load(found[("gated", 0)])
    assert kind == "gated" and not model.training
    assert language.trained_models(Context(out_dir=tmp_path, root=tmp_path, tiny=False), tmp_path) == {}


# ----------------------------------------------------------------------------- corpus
def test_corpus_is_real_text_with_a_disjoint_validation_split():
    c = corpus.load_corpus()
    assert c.documents > 20_000 and c.train.numel() > 1_000_000 and c.val.numel() > 50_000
    text = bytes(c.val[:2000].tolist()).decode("utf-8", errors="replace")
    assert " the " in text and "\n" in text
    val_docs = set(bytes(c.val.tolist()).decode("utf-8").splitlines())
    train_docs = set(bytes(c.train[:200_000].tolist()).decode("utf-8", errors="ignore").splitlines()[1:-1])
    assert len(val_docs & train_docs) < 0.02 * len(val_docs)  # (identical glosses of different synsets exist)
    w = corpus.fixed_windows(c.val, 64, 5)
    assert w.shape == (5, 64) and w.dtype == torch.long and int(w.max()) < corpus.VOCAB_SIZE
    ids = corpus.ByteTokenizer()("héllo", return_tensors="pt", truncation=True, max_length=3)["input_ids"]
    assert ids.tolist() == [[104, 195, 169]]


# ----------------------------------------------------------------------------- monitor
def _lm(kind):
    from language_models_100m.presets import build_model

    torch.manual_seed(0)
    return build_model("tiny", kind, vocab_size=64, dropout=0.0, bos_token_id=None, eos_token_id=None).eval()


def test_sink_mass_is_the_lora_llms_definition():
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0, :, 0] = torch.tensor([1.0, 0.5, 0.2])  # query 0 is excluded
    w[0, 1, :, 0] = torch.tensor([1.0, 0.1, 0.0])
    assert monitor.sink_mass(w) == pytest.approx((0.5 + 0.2 + 0.1 + 0.0) / 4)
    with pytest.raises(ValueError, match="weights must be"):
        monitor.sink_mass(torch.zeros(1, 1, 1, 1))


@pytest.mark.parametrize("kind", ["standard", "krause", "sliding_window", "topk"])
def test_monitor_weights_reproduce_the_lm_attention_output(kind):
    attn = _lm(kind).transformer.h[0].attn
    x = torch.randn(2, 24, attn.q_proj.in_features)
    with torch.no_grad():
        w = monitor.layer_attention_weights(attn, x)
        b, t, d = x.shape
        v = attn.v_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
        rebuilt = attn.o_proj((w @ v).transpose(1, 2).reshape(b, t, d))
        assert torch.allclose(rebuilt, attn(x), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, attn.num_heads, 24), atol=1e-5)
    assert bool((w.triu(1) == 0).all())  # causal


def test_monitor_measures_every_lm_kind():
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    values = {}
    for kind in ["standard", "krause", "gated", "sliding_window", "topk"]:
        model = _lm(kind).train()
        m = monitor.measure(model, ids, forward=lambda mdl, b: mdl(input_ids=b, use_cache=False))
        assert model.training  # mode restored
        assert m["attention_layers"] == ["transformer.h.0.attn", "transformer.h.1.attn"]
        assert all(v is not None and 0.0 <= v <= 1.0 for v in m["sink_mass"])
        assert len(m["clusters"]) == 2 and all(1 <= c <= 32 for c in m["clusters"])
        assert (len(m["sigma"]) == 2) == (kind in ("krause", "gated"))
        values[kind] = m
    assert values["krause"]["sigma"] == pytest.approx([2.5, 2.5])
    # window 8 of 32 tokens: at most 7 of the 31 queries 1..T-1 can see token 0
    assert max(values["krause"]["sink_mass"]) <= 7 / 31 + 1e-6


def test_monitor_reads_krause_nn_modules_and_counts_consensus():
    from krause.nn import CausalKrauseAttention, CausalSelfAttention

    class Block(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return x + self.attn(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(CausalSelfAttention(16, 2)), Block(CausalSelfAttention(16, 2))])
            self.blocks[1].attn = CausalKrauseAttention(16, 2, window=4, top_k=2)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()
    x = torch.randn(2, 12, 16)
    m = monitor.measure(net, x)
    assert m["attention_layers"] == ["blocks.0.attn", "blocks.1.attn"]
    expect0 = monitor.sink_mass(net.blocks[0].attn.attention_weights(x))
    assert m["sink_mass"][0] == pytest.approx(expect0)
    assert len(m["sigma"]) == 1
    # identical token representations are one cluster (consensus); orthogonal ones are one each
    same = torch.ones(1, 5, 4)
    assert monitor._mean_clusters(same, 0.1, 4) == 1
    assert monitor._mean_clusters(torch.eye(4)[None], 0.1, 4) == 4
    with pytest.raises(ValueError, match="tol must be"):
        monitor.measure(net, x, tol=0)


def test_monitor_gated_weights_mix_the_branches_by_the_gate():
    from krause.nn import GatedKrauseAttention

    torch.manual_seed(0)
    attn = GatedKrauseAttention(16, 2, window=4, top_k=2).eval()
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        w = monitor.layer_attention_weights(attn, x)
        gate = attn.gate_weights(x).float()
        expect = gate[..., 0][:, None, :, None] * attn.standard.attention_weights(x) + \
            gate[..., 1][:, None, :, None] * attn.krause.attention_weights(x)
    assert torch.allclose(w, expect, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 10), atol=1e-5)


def test_training_monitor_logs_jsonl_and_plots(tmp_path):
    from krause.training.metrics import MetricsLogger, read_metrics

    model = _lm("gated")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    mon = monitor.TrainingMonitor(model, ids, every=2, forward=lambda m, b: m(input_ids=b, use_cache=False))
    with MetricsLogger(tmp_path / "metrics.jsonl") as log:
        assert mon.maybe_log(1, log) is None
        for step in (2, 4):
            assert set(mon.maybe_log(step, log)) == set(monitor.MONITOR_KEYS)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert len(records[0]["monitor_sink_mass"]) == 2 and len(records[0]["monitor_sigma"]) == 2
    out = monitor.plot_monitor(tmp_path / "metrics.jsonl", tmp_path / "monitor.png")
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="every must be"):
        monitor.TrainingMonitor(model, ids, every=0)
    with pytest.raises(ValueError, match="no monitor records"):
        monitor.plot_monitor([{"step": 1, "loss": 2.0}], tmp_path / "x.png")


# ----------------------------------------------------------------------------- every claim, tiny
@pytest.mark.slow
def test_every_claim_runs_tiny(tmp_path, capsys):
    out = tmp_path / "claims"
    assert runner.main(["--tiny", "--out_dir", str(out), "--markdown", str(tmp_path / "claims.md")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and [c["name"] for c in summary["claims"]] == list(CLAIMS)
    for claim in summary["claims"]:
        assert claim["verdict"] in (AGREE, DISAGREE), (claim["name"], claim.get("reason"))
        assert claim["rows"] and claim["seeds"] and claim["measured"]
        assert (out / claim["name"] / "result.json").is_file()
        assert claim["figure"] and Path(claim["figure"]).is_file()
        assert f"== claim {claim['name']}" in printed
    assert "verdict:     this run" in printed
    assert (tmp_path / "claims.md").read_text().count("| ") > 6
