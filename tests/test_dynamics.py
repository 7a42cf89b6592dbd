"""krause.dynamics: attention dynamics on the sphere, the cluster counter, the CLI."""

import json
import math

import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from krause import dense
from krause.dynamics import (DynamicsConfig, cluster_labels, cluster_sizes, count_clusters, drift, initial_positions,
                             simulate, spread, summarise, validate)
from krause.dynamics import measure as measure_mod
from krause.dynamics import particles as simulate_mod
from krause.dynamics.__main__ import main as cli


def _on_circle(angles):
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], -1)


# --------------------------------------------------------------------------- cluster counter
def test_counter_on_constructed_groups():
    g = torch.Generator().manual_seed(0)
    centres = [0.0, 2 * math.pi / 3, 4 * math.pi / 3]
    angles = [c + 1e-4 * float(torch.randn(1, generator=g)) for c in centres for _ in range(7)]
    x = _on_circle(angles)
    assert count_clusters(x, 1e-2) == 3
    assert cluster_sizes(x, 1e-2) == [7, 7, 7]
    labels = cluster_labels(x, 1e-2)
    assert labels.tolist() == [0] * 7 + [7] * 7 + [14] * 7


def test_counter_single_linkage_chain_and_singletons():
    # a chain with gaps 0.005 < tol is one cluster even though its ends are 0.5 apart
    chain = _on_circle([0.005 * i for i in range(101)])
    assert count_clusters(chain, 1e-2) == 1
    # gaps 0.02 > tol: every point alone; shuffled so labels must propagate in any order
    spaced = _on_circle([0.02 * i for i in torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()])
    assert count_clusters(spaced, 1e-2) == 50
    # two antipodal tight pairs in d=5
    e = torch.eye(5, dtype=torch.float64)
    x = torch.stack([e[0], e[0] + 1e-4 * e[1], -e[0], -e[0] + 1e-4 * e[2]])
    assert cluster_sizes(x, 1e-2) == [2, 2]


def test_counter_matches_scipy_components_with_chunking(monkeypatch):
    x = initial_positions(300, 3, seed=3, dtype=torch.float64)
    tol = 0.15
    angles = torch.arccos((x @ x.T).clamp(-1, 1)).numpy()
    expected, _ = connected_components(csr_matrix(angles < tol), directed=False)
    assert 1 < expected < 300
    assert count_clusters(x, tol) == expected
    monkeypatch.setattr(measure_mod, "CHUNK_ELEMENTS", 7 * 300)  # 7-row chunks
    assert count_clusters(x, tol) == expected


def test_spread_and_bad_points():
    x = _on_circle([0.0, 0.1, -0.1])
    assert spread(x) == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ValueError, match="points"):
        count_clusters(torch.ones(4), 0.1)
    with pytest.raises(ValueError, match="tol"):
        count_clusters(x, 0.0)


# --------------------------------------------------------------------------- drifts
def test_standard_drift_is_softmax_of_inner_products():
    x = initial_positions(30, 3, seed=0, dtype=torch.float64)
    cfg = DynamicsConfig(attention="standard", n=30, d=3, beta=2.5, dtype="float64")
    expected = torch.softmax(2.5 * x @ x.T, dim=-1) @ x
    torch.testing.assert_close(drift(x, cfg), expected)


def _krause_weights_by_hand(x, sigma, top_k, radius):
    n = x.shape[0]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # deliberately a loop: the obvious definition
        d2 = ((x[i] - x) ** 2).sum(-1)
        cand = [j for j in range(n) if radius is None or float(d2[j].sqrt()) <= radius]
        cand = sorted(cand, key=lambda j: float(d2[j]))[:top_k]
        logits = torch.stack([-d2[j] / (2 * sigma ** 2) for j in cand])
        w[i, cand] = torch.softmax(logits, 0)
    return w


@pytest.mark.parametrize("radius", [None, 0.9])
def test_krause_drift_matches_definition_and_uses_the_core_formula(monkeypatch, radius):
    x = initial_positions(40, 3, seed=1, dtype=torch.float32)
    cfg = DynamicsConfig(attention="krause", n=40, d=3, sigma=0.4, top_k=5, radius=radius)
    calls = []
    real = dense.krause_attention_dense
    monkeypatch.setattr(simulate_mod, "krause_attention_dense", lambda *a: calls.append(a[4].shape) or real(*a))
    monkeypatch.setattr(simulate_mod, "CHUNK_ELEMENTS", 16 * 40)  # 16-row chunks: 16, 16, 8
    got = drift(x, cfg)
    assert calls == [(16, 40), (16, 40), (8, 40)]
    expected = _krause_weights_by_hand(x.double(), 0.4, 5, radius) @ x.double()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_krause_radius_below_spacing_freezes_particles():
    x = _on_circle([0.0, 1.0, 2.0, 3.0]).float()
    cfg = DynamicsConfig(attention="krause", n=4, d=2, steps=20, radius=0.1, sigma=0.3, top_k=3)
    traj = simulate(cfg, x0=x)
    torch.testing.assert_close(traj.final, x)


# --------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("d", [2, 3])
def test_standard_attention_reaches_consensus(d):
    s = summarise(simulate(DynamicsConfig(attention="standard", n=64, d=d, beta=1.0, steps=300, dt=0.1, seed=0)))
    assert s["final_clusters"] == 1
    assert s["time_to_consensus"] is not None and s["time_to_consensus"] < 30
    assert s["final_cluster_sizes"] == [64]


@pytest.mark.parametrize("d", [2, 3])
def test_krause_small_sigma_topk_keeps_several_clusters_all_run(d):
    cfg = DynamicsConfig(attention="krause", n=64, d=d, sigma=0.1, top_k=4, steps=300, dt=0.1, seed=0)
    s = summarise(simulate(cfg))
    assert s["min_clusters_over_run"] > 1
    assert s["time_to_consensus"] is None and s["consensus"] == "none within the horizon"
    assert sum(s["final_cluster_sizes"]) == 64
    # standard attention (beta = 1) from the same start and horizon reaches one cluster
    std = summarise(simulate(DynamicsConfig(attention="standard", n=64, d=d, beta=1.0, steps=300, seed=0)))
    assert std["final_clusters"] == 1 < s["final_clusters"]


@pytest.mark.parametrize("attention", ["standard", "krause"])
def test_particles_stay_on_the_sphere(attention):
    cfg = DynamicsConfig(attention=attention, n=50, d=4, steps=100, dt=0.3, beta=3.0, weight_scale=0.5, seed=2)
    traj = simulate(cfg, keep_positions=True)
    assert traj.max_norm_error < 1e-5
    norms = torch.stack(traj.positions).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert not torch.allclose(traj.positions[0], traj.final)  # it moved


@pytest.mark.parametrize("field,value,match", [
    ("n", 1, "n must"), ("d", 1, "d must"), ("top_k", 0, "top_k must"), ("sigma", 0.0, "sigma must"),
    ("sigma", -1.0, "sigma must"), ("beta", -0.5, "beta must"), ("steps", 0, "steps must"),
    ("dt", float("nan"), "dt must"), ("radius", 0.0, "radius must"), ("attention", "linear", "attention must"),
])
def test_bad_config_one_line_error(field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        validate(DynamicsConfig(**{field: value}))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- command line
def test_cli_animate_writes_gifs_snapshots_and_json(tmp_path, capsys):
    from PIL import Image

    rc = cli(["animate", "--out_dir", str(tmp_path), "--n", "24", "--steps", "40", "--frames", "6",
              "--top_k", "3", "--sigma", "0.2"])
    assert rc == 0
    for name in ("dynamics_circle.gif", "dynamics_sphere.gif", "dynamics_snapshots.png", "clusters_vs_time.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    gif = Image.open(tmp_path / "dynamics_circle.gif")
    assert gif.size[0] > gif.size[1] and 2 <= gif.n_frames <= 6
    data = json.loads((tmp_path / "dynamics.json").read_text())
    assert len(data["runs"]) == 4
    for run in data["runs"].values():
        assert run["config"]["n"] == 24 and len(run["times"]) == len(run["cluster_counts"]) == 21
        assert sum(run["final_cluster_sizes"]) == 24


def test_cli_measure_any_dimension_and_sweeps(tmp_path):
    assert cli(["measure", "--out_dir", str(tmp_path / "m"), "--attention", "krause", "--d", "6", "--n", "30",
                "--steps", "10"]) == 0
    m = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert m["config"]["d"] == 6 and m["max_norm_error"] < 1e-5
    assert cli(["sweep", "--out_dir", str(tmp_path / "k"), "--n", "20", "--steps", "30", "--sigmas", "0.1,0.5",
                "--top_ks", "2,8", "--radii", "none,1.0"]) == 0
    k = json.loads((tmp_path / "k" / "sweep_krause.json").read_text())
    assert [(r["point"]["sigma"], r["point"]["top_k"], r["point"]["radius"]) for r in k["records"]] == [
        (s, t, r) for s in (0.1, 0.5) for t in (2, 8) for r in (None, 1.0)]
    assert (tmp_path / "k" / "phase_diagram.png").stat().st_size > 1000
    assert cli(["sweep", "--attention", "standard", "--out_dir", str(tmp_path / "s"), "--n", "20", "--steps", "30",
                "--betas", "0,1,8"]) == 0
    s = json.loads((tmp_path / "s" / "sweep_standard.json").read_text())
    assert [r["point"]["beta"] for r in s["records"]] == [0, 1, 8]
    assert (tmp_path / "s" / "beta_sweep.png").is_file()


@pytest.mark.parametrize("argv,match", [
    (["animate", "--n", "1"], "n must"),
    (["animate", "--dims", "4"], "d in {2, 3}"),
    (["measure", "--d", "1"], "d must"),
    (["measure", "--top_k", "0"], "top_k must"),
    (["measure", "--sigma", "0"], "sigma must"),
    (["sweep", "--attention", "standard", "--betas", "1,-1"], "beta must"),
    (["measure", "--steps", "0"], "steps must"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    assert cli(argv + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_cli_out_dir_defaults_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["measure", "--n", "12", "--steps", "5", "--d", "2"]) == 0
    assert (tmp_path / "runs" / "dynamics" / "measure" / "measure.json").is_file()
