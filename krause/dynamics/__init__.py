"""Particle dynamics of standard vs Krause attention on the unit sphere.

    from krause.dynamics import DynamicsConfig, simulate, summarise
    traj = simulate(DynamicsConfig(attention="krause", n=200, d=2, sigma=0.3, top_k=16))
    summarise(traj)["final_clusters"]

``python -m krause.dynamics {animate,measure,sweep}`` is the command line; see
``krause/dynamics/particles.py`` for the equations and the integrator, ``measure.py`` for
the clustering tolerance and the consensus criterion.
"""

from .measure import cluster_labels, cluster_sizes, count_clusters, spread, summarise, sweep
from .particles import DynamicsConfig, Trajectory, drift, euler_step, initial_positions, simulate, validate

__all__ = [
    "DynamicsConfig",
    "Trajectory",
    "simulate",
    "validate",
    "drift",
    "euler_step",
    "initial_positions",
    "cluster_labels",
    "cluster_sizes",
    "count_clusters",
    "spread",
    "summarise",
    "sweep",
]
