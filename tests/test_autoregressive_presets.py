"""autoregressive_transformers `--preset paper`: the first release's choices where this code's defaults
differ (weight decay on every parameter, no gradient clipping, an unmodelled first pixel sampled
uniformly); the resolved config, and each choice's real path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoregressive_transformers import generate, train
from autoregressive_transformers.common import evaluate_bpd
from autoregressive_transformers.config import PRESETS, ModelConfig, run_config, train_model_config
from autoregressive_transformers.model import PixelTransformer
from krause.training.checkpointer import Checkpointer
from krause.training.metrics import read_metrics
from krause.training.optim import param_groups

TINY = ["--dim", "16", "--num_layers", "1", "--num_heads", "2", "--window", "32", "--top_k", "16",
        "--batch_size", "4", "--limit_train", "8", "--limit_test", "4", "--device", "cpu", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paper_preset_resolved_config():
    default = train.parse_args(["--out_dir", "x"])
    paper = train.parse_args(["--out_dir", "x", "--preset", "paper"])
    changed = {k: (getattr(default, k), v) for k, v in vars(paper).items() if getattr(default, k) != v}
    assert changed == {"preset": ("default", "paper"), "decay_all": (False, True), "grad_clip": (1.0, 0.0),
                       "first_pixel": ("modelled", "uniform")}
    resolved = run_config(paper, train_model_config(paper))
    assert resolved["model"]["first_pixel"] == "uniform" and "first_pixel" not in resolved
    assert resolved["decay_all"] is True and resolved["grad_clip"] == 0.0
    assert resolved["lr"] == 1e-3 and resolved["weight_decay"] == 0.01 and resolved["batch_size"] == 64
    assert resolved["model"] == dict(run_config(default, train_model_config(default))["model"], first_pixel="uniform")
    # an explicit flag still wins over the preset
    assert train.parse_args(["--out_dir", "x", "--preset", "paper", "--grad_clip", "0.5"]).grad_clip == 0.5
    assert set(PRESETS) == {"default", "paper"}


def test_default_run_config_has_no_keys_that_older_runs_lack():
    """decay_all and first_pixel arrived after runs existed: written only when set, so a run
    directory made before them (same settings) still resumes."""
    default = train.parse_args(["--out_dir", "x"])
    resolved = run_config(default, train_model_config(default))
    assert "decay_all" not in resolved and "first_pixel" not in resolved["model"]
    assert ModelConfig(**resolved["model"]).first_pixel == "modelled"  # readers fill the default back in


def test_decay_all_leaves_nothing_exempt():
    model = PixelTransformer(ModelConfig(seq_len=20, dim=16, num_layers=1, num_heads=2, window=8, top_k=4))
    fair = param_groups(model, 0.01)
    assert fair[1]["param_names"] and "pos_emb" in fair[1]["param_names"]  # biases, norms, positions, log_sigma
    everything = param_groups(model, 0.01, decay_all=True)
    assert not everything[1]["params"] and len(everything[0]["params"]) == len(list(model.parameters()))


def _model(first_pixel, seq_len=30):
    torch.manual_seed(0)
    return PixelTransformer(ModelConfig(seq_len=seq_len, dim=16, num_layers=1, num_heads=2, window=8, top_k=4,
                                        dropout=0.0, first_pixel=first_pixel)).eval()


def test_unmodelled_first_pixel_is_left_out_of_the_bpd():
    modelled, release = _model("modelled"), _model("uniform")  # the same weights
    pixels = torch.randint(0, 256, (5, 30), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    cpu = torch.device("cpu")
    a = evaluate_bpd(modelled, pixels, 2, cpu, progress=False)
    b = evaluate_bpd(release, pixels, 2, cpu, progress=False)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(modelled(pixels.long()).transpose(1, 2), pixels.long(),
                                                reduction="none").double()
    assert a["bpd"] == pytest.approx(float(nll.mean()) / math.log(2), rel=1e-6)
    assert b["bpd"] == pytest.approx(float(nll[:, 1:].mean()) / math.log(2), rel=1e-6)
    assert a["num_images"] == b["num_images"] == 5 and a["bpd"] != b["bpd"]


def test_unmodelled_first_pixel_is_sampled_uniformly():
    """Greedy decoding: a modelled first pixel is the start token's argmax in every row; the release's is
    drawn uniformly (seeded), and every later pixel is still the argmax given it."""
    modelled, release = _model("modelled"), _model("uniform")
    g = torch.Generator().manual_seed(4)
    same = modelled.sample(64, temperature=0.0, generator=g)
    assert same[:, 0].unique().numel() == 1
    drawn = release.sample(64, temperature=0.0, generator=torch.Generator().manual_seed(4))
    assert drawn[:, 0].unique().numel() > 30  # 64 uniform draws over 256 values
    assert torch.equal(drawn, release.sample(64, temperature=0.0, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        logits = release(drawn)
    assert torch.equal(logits[:, 1:].argmax(-1), drawn[:, 1:])


def test_paper_preset_trains_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--preset", "paper", "--max_steps", "2", "--out_dir", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "paper" and saved["decay_all"] and saved["grad_clip"] == 0.0
    assert saved["model"]["first_pixel"] == "uniform"
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert logged and not any("grad_norm" in r for r in logged)  # no clipping (a clipped run logs the norm)
    ck = Checkpointer(out / "checkpoints")
    groups = torch.load(ck.export(tmp_path / "paper.pt", ck.latest_step()), weights_only=False)["app"]["optimizer"][
        "param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01]  # one group: every parameter decays, log_sigma included
    assert "blocks.0.attn.log_sigma" in groups[0]["param_names"] and "pos_emb" in groups[0]["param_names"]
    # resuming needs the same resolved values, not the preset's name
    assert train.main(TINY + ["--decay_all", "--grad_clip", "0", "--first_pixel", "uniform", "--max_steps", "2",
                              "--out_dir", str(out), "--resume"]) == 0
    assert generate.main(["--run_dir", str(out), "--num_samples", "2", "--batch_size", "2", "--device", "cpu",
                          "--no_progress"]) == 0
    assert "2 samples" in capsys.readouterr().out


def test_default_run_clips_and_logs_the_gradient_norm(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--max_steps", "2", "--log_every", "1", "--out_dir", str(out)]) == 0
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert len(logged) == 2 and all(r["grad_norm"] > 0 for r in logged)
