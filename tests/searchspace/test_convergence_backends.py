"""The reward-guided sampler's mean converges to a known optimum through `run_search`, in the Optuna and the Ray
backend."""
from __future__ import annotations

import os

import numpy as np
import optuna
import pytest

from marginsearch.searchspace import RewardGuidedSampler, load
from marginsearch.searchspace.sampler import to_unit
from marginsearch.searchspace.search import RayOptions, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE_TOML = """
name = "two-margins"
[fixed]
"target.kind" = "margin"
[[param]]
name = "m2"
type = "float"
low = 0.0
high = 0.8
default = 0.1
sets = "target.m2_rad"
[[param]]
name = "m3"
type = "float"
low = 0.0
high = 0.5
default = 0.45
sets = "target.m3_cos"
"""
OPTIMUM = {"m2": 0.75, "m3": 0.25}  # normalised coordinates (the defaults sit at 0.125 and 0.9)
ROUNDS, POPULATION = 14, 6


def quadratic(spec, report):
    """Reward = −squared distance of the spec's normalised (m2, m3) to OPTIMUM; no training."""
    space = load(os.environ["CONVERGENCE_SPACE"])
    dists = space.distributions()
    params = space.params_of(spec)
    reward = -sum((to_unit(params[n], dists[n]) - OPTIMUM[n]) ** 2 for n in OPTIMUM)
    report(1, reward)
    return reward


@pytest.fixture
def space_path(tmp_path, monkeypatch):
    path = tmp_path / "two-margins.toml"
    path.write_text(SPACE_TOML)
    monkeypatch.setenv("CONVERGENCE_SPACE", str(path))
    return path


def _converged(sampler, result, space_path):
    trajectory = sampler.trajectory(result.study)
    start = np.array([trajectory[0]["mu_unit"][n] for n in OPTIMUM])
    late = np.array([[t["mu_unit"][n] for n in OPTIMUM] for t in trajectory[-4:]]).mean(axis=0)
    target = np.array(list(OPTIMUM.values()))
    return np.abs(start - target).max(), np.abs(late - target).max(), len(trajectory)


def test_converges_in_the_optuna_backend(space_path):
    sampler = RewardGuidedSampler(space=load(space_path), seed=0, population=POPULATION, sigma_decay=0.9,
                                  sigma_min=0.05)
    result = run_search(space_path, quadratic, backend="optuna", sampler=sampler, n_trials=ROUNDS * POPULATION)
    far, near, snapshots = _converged(sampler, result, space_path)
    assert snapshots == ROUNDS + 1
    assert far > 0.6 and near < 0.1


@pytest.mark.slow
def test_converges_in_the_ray_backend(space_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        sampler = RewardGuidedSampler(space=load(space_path), seed=0, population=POPULATION, sigma_decay=0.9,
                                      sigma_min=0.05)
        result = run_search(space_path, quadratic, backend="ray", sampler=sampler, n_trials=ROUNDS * POPULATION,
                            ray=RayOptions(storage_path=str(space_path.parent / "ray")))
    finally:
        ray.shutdown()
    assert len(result.rows) == ROUNDS * POPULATION
    far, near, _ = _converged(sampler, result, space_path)
    assert far > 0.6 and near < 0.1
