"""Attention dynamics of N particles on the unit sphere S^{d-1}.

Each particle moves along the tangent projection of its attention output,

    dx_i/dt = P_{x_i}(sum_j a_ij v_j),   P_x(y) = y - <x, y> x,   v_j = W_v x_j,

integrated by explicit Euler on the tangent field followed by renormalisation:

    x_i <- normalise(x_i + dt * P_{x_i}(sum_j a_ij v_j)).

The weights ``a_ij`` come from

- standard attention: ``softmax_j(beta <W_q x_i, W_k x_j>)`` (torch SDPA, every pair);
- Krause attention: the RBF score ``-|W_q x_i - W_k x_j|^2 / (2 sigma^2)``, softmax over the
  ``top_k`` nearest candidates, the candidates being the particles within the
  bounded-confidence radius ``|x_i - x_j| <= radius`` (chord distance; ``None``: all). The
  weights are computed by ``krause.dense.krause_attention_dense``, the library's one
  dense Krause formula. With identity matrices on the sphere ``|x_i - x_j|^2 = 2 - 2<x_i, x_j>``,
  so Krause attention is standard attention at ``beta = 1 / sigma^2`` restricted to the
  top-k nearest particles inside the radius.

Everything is vectorised over particles; the N x N interaction is processed in row chunks
so that large N (10,000 and more) fits in memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..dense import krause_attention_dense

__all__ = [
    "DynamicsConfig",
    "Trajectory",
    "validate",
    "initial_positions",
    "interaction_matrices",
    "drift",
    "euler_step",
    "simulate",
]

ATTENTIONS = ("standard", "krause")
# Elements of one (rows x N) interaction chunk: bounds the memory of the dense Krause formula.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class DynamicsConfig:
    """One simulation. ``dt`` is the Euler step; the horizon is ``steps * dt``."""

    attention: str = "krause"
    n: int = 200
    d: int = 2
    steps: int = 1000
    dt: float = 0.1
    beta: float = 1.0           # standard attention inverse temperature
    sigma: float = 0.3          # Krause RBF width
    top_k: int = 16             # Krause: nearest candidates kept
    radius: float | None = None  # Krause bounded-confidence radius (chord distance); None = every particle
    weight_scale: float = 0.0   # 0: identity Q, K, V; else I + weight_scale * G / sqrt(d), G fixed Gaussian
    seed: int = 0
    tol: float = 1e-2           # clustering tolerance: angular distance (radians)
    record_every: int = 5       # positions saved every this many steps (cluster counts too)
    device: str = "cpu"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trajectory:
    config: DynamicsConfig
    steps: list = field(default_factory=list)           # recorded step indices
    positions: list = field(default_factory=list)       # (N, d) CPU tensors at those steps (if kept)
    cluster_counts: list = field(default_factory=list)  # clusters at those steps
    spreads: list = field(default_factory=list)         # max angle to the mean direction (radians)
    final: torch.Tensor | None = None
    max_norm_error: float = 0.0
    seconds: float = 0.0

    @property
    def times(self) -> list:
        return [s * self.config.dt for s in self.steps]


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def validate(cfg: DynamicsConfig) -> DynamicsConfig:
    """Raises ValueError (one line naming the argument) on a bad configuration."""
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
    _positive_int("n", cfg.n, 2)
    _positive_int("d", cfg.d, 2)
    _positive_int("steps", cfg.steps, 1)
    _positive_int("top_k", cfg.top_k, 1)
    _positive_int("record_every", cfg.record_every, 1)
    _finite("dt", cfg.dt, positive=True)
    _finite("beta", cfg.beta, nonnegative=True)
    _finite("sigma", cfg.sigma, positive=True)
    _finite("tol", cfg.tol, positive=True)
    _finite("weight_scale", cfg.weight_scale, nonnegative=True)
    if cfg.radius is not None:
        _finite("radius", cfg.radius, positive=True)
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {cfg.dtype!r}")
    return cfg


def initial_positions(n: int, d: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """n points uniform on S^{d-1} (normalised Gaussians), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(device=device, dtype=dtype)


def interaction_matrices(d: int, weight_scale: float, seed: int, dtype=torch.float32, device="cpu"):
    """Fixed (W_q, W_k, W_v): identity, or identity plus a seeded Gaussian perturbation."""
    eye = torch.eye(d, dtype=torch.float64)
    if weight_scale == 0:
        mats = (eye, eye, eye)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        mats = tuple(eye + weight_scale * torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
                     for _ in range(3))
    return tuple(m.to(device=device, dtype=dtype) for m in mats)


def _chunks(n: int):
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def drift(x: torch.Tensor, cfg: DynamicsConfig, mats=None) -> torch.Tensor:
    """sum_j a_ij v_j for every particle: (N, d) -> (N, d)."""
    wq, wk, wv = mats if mats is not None else (None, None, None)
    q = x if wq is None else x @ wq.T
    k = x if wk is None else x @ wk.T
    v = x if wv is None else x @ wv.T
    q4, k4, v4 = q[None, None], k[None, None], v[None, None]  # (B=1, H=1, N, d)
    if cfg.attention == "standard":
        return F.scaled_dot_product_attention(q4, k4, v4, scale=float(cfg.beta))[0, 0]
    log_sigma = torch.tensor(math.log(cfg.sigma), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    for rows in _chunks(x.shape[0]):
        if cfg.radius is None:
            candidates = torch.ones(rows.stop - rows.start, x.shape[0], dtype=torch.bool, device=x.device)
        else:
            candidates = torch.cdist(x[rows], x) <= cfg.radius
        out[rows] = krause_attention_dense(q4[:, :, rows], k4, v4, log_sigma, candidates, cfg.top_k)[0, 0]
    return out


def euler_step(x: torch.Tensor, velocity: torch.Tensor, dt: float) -> torch.Tensor:
    """x <- normalise(x + dt * P_x(velocity)), P_x the projection onto the tangent space at x."""
    tangent = velocity - (velocity * x).sum(-1, keepdim=True) * x
    y = x + dt * tangent
    return y / y.norm(dim=-1, keepdim=True)


def simulate(cfg: DynamicsConfig, keep_positions: bool = True, x0: torch.Tensor | None = None) -> Trajectory:
    """Runs ``cfg.steps`` Euler steps; records positions (optional) and cluster counts every
    ``cfg.record_every`` steps and at the last step."""
    import time

    from .measure import count_clusters, spread

    validate(cfg)
    dtype = getattr(torch, cfg.dtype)
    x = initial_positions(cfg.n, cfg.d, cfg.seed, dtype, cfg.device) if x0 is None else x0.to(cfg.device, dtype)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"x0 must be (N >= 2, d >= 2), got {tuple(x.shape)}")
    mats = None
    if cfg.weight_scale:
        mats = interaction_matrices(cfg.d, cfg.weight_scale, cfg.seed, dtype, cfg.device)
    traj = Trajectory(config=cfg)

    def record(step: int) -> None:
        traj.steps.append(step)
        traj.cluster_counts.append(count_clusters(x, cfg.tol))
        traj.spreads.append(spread(x))
        traj.max_norm_error = max(traj.max_norm_error, float((x.norm(dim=-1) - 1).abs().max()))
        if keep_positions:
            traj.positions.append(x.detach().cpu().clone())

    t0 = time.perf_counter()
    with torch.no_grad():
        record(0)
        for step in range(1, cfg.steps + 1):
            x = euler_step(x, drift(x, cfg, mats), cfg.dt)
            if step % cfg.record_every == 0 or step == cfg.steps:
                record(step)
    traj.seconds = time.perf_counter() - t0
    traj.final = x.detach().cpu()
    return traj
