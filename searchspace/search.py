"""`run_search`: one call, two backends (Optuna in process, Ray Tune across workers); samplers as a table.

Options are grouped (`StudyOptions`: storage, name, resume; `RayOptions`: only the Ray backend reads
them). The shared study machinery (storages, baselines, retries) is in `_study`; this module imports
the backends, none of them imports it.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers import BaseSampler

from marginsearch.losses import MarginSpec

from ._study import (
    ABANDONED_RETRIES,
    HEARTBEAT_S,
    PRUNERS,
    STORAGE_KINDS,
    SearchError,
    baseline_params,
    checked_reward,
    enqueue_baselines,
    finished_count,
    make_storage,
    open_study,
    record_failure,
    retried_numbers,
    retry_abandoned,
    write_ahead_log,
)
from .options import DEFAULT_POPULATION, RayOptions, SearchPlan, StudyOptions
from .optuna_backend import run_optuna
from .results import Objective, SearchResult, TrialRow
from .sampler import RewardGuidedSampler
from .space import SearchSpace, load

__all__ = ["SearchError", "SAMPLERS", "PRUNERS", "BACKENDS", "STORAGE_KINDS", "run_search", "make_storage",
           "make_sampler", "enqueue_baselines", "baseline_params", "checked_reward", "open_study", "finished_count",
           "record_failure", "retry_abandoned", "retried_numbers", "HEARTBEAT_S", "ABANDONED_RETRIES",
           "StudyOptions", "RayOptions", "SearchPlan", "DEFAULT_POPULATION", "write_ahead_log"]


@dataclass(frozen=True)
class SamplerEntry:
    """How to build a named sampler; `named_grid`: run exactly the space's named losses (enqueued), nothing drawn."""

    build: Callable[[SearchSpace, int | None, int], BaseSampler]
    named_grid: bool = False
    needs: str | None = None  # an optional package the sampler imports


def _cmaes(space: SearchSpace, seed: int | None, population: int) -> BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


SAMPLERS: dict[str, SamplerEntry] = {
    "reward-guided": SamplerEntry(lambda space, seed, m: RewardGuidedSampler(space=space, seed=seed, population=m)),
    "tpe": SamplerEntry(lambda space, seed, m: optuna.samplers.TPESampler(seed=seed)),
    "cmaes": SamplerEntry(_cmaes, needs="cmaes"),
    "random": SamplerEntry(lambda space, seed, m: optuna.samplers.RandomSampler(seed=seed)),
    "grid-named": SamplerEntry(lambda space, seed, m: optuna.samplers.RandomSampler(seed=seed), named_grid=True),
}

def make_sampler(sampler: str | BaseSampler, space: SearchSpace, seed: int | None,
                 population: int = DEFAULT_POPULATION) -> tuple[BaseSampler, bool]:
    """(sampler, named_grid) from a table name or an Optuna sampler instance."""
    if isinstance(sampler, BaseSampler):
        return sampler, False
    if sampler not in SAMPLERS:
        raise SearchError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} or pass an Optuna sampler")
    entry = SAMPLERS[sampler]
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        raise SearchError(f"sampler {sampler!r} needs the {entry.needs!r} package (pip install {entry.needs})")
    return entry.build(space, seed, population), entry.named_grid


def _ray_backend(plan: SearchPlan, ray: RayOptions) -> SearchResult:
    return importlib.import_module("marginsearch.searchspace.ray_backend").run_ray(plan, ray)


BACKENDS: dict[str, Callable[[SearchPlan, RayOptions], SearchResult]] = {
    "optuna": lambda plan, ray: run_optuna(plan),
    "ray": _ray_backend,
}


def run_search(space: SearchSpace | str, objective: Objective, *, backend: str = "optuna",
               sampler: str | BaseSampler = "reward-guided", n_trials: int = 16, seed: int | None = 0,
               population: int = DEFAULT_POPULATION, pruner: str = "none",
               baselines: Sequence[str | MarginSpec] | str = (), study: StudyOptions = StudyOptions(),
               ray: RayOptions = RayOptions(), callbacks: Sequence[Callable[[TrialRow], Any]] = ()) -> SearchResult:
    """Search `space` for the spec maximising `objective(spec, report) -> reward`; the table of all trials.

    `report(epoch, reward)` records an intermediate reward and raises the backend's prune signal
    (optuna.TrialPruned; Ray stops the trial from inside `tune.report`). An objective raising
    `TrialFailed(reason)` or returning NaN/inf gives a FAIL trial with `fail_reason`. `n_trials`
    counts every trial of the study, earlier sessions and baselines included (resume tops it up).
    `population` is the reward-guided sampler's round size. `callbacks` run in the driver after
    each finished trial with its `TrialRow`.
    """
    if backend not in BACKENDS:
        raise SearchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if pruner not in PRUNERS:
        raise SearchError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    if n_trials < 1:
        raise SearchError(f"n_trials must be ≥ 1, got {n_trials}")
    space = load(space)
    built, named_grid = make_sampler(sampler, space, seed, population)
    if named_grid:
        baselines = "named"
        n_trials = min(n_trials, len(baseline_params(space, "named")))
    plan = SearchPlan(space, objective, built, n_trials, pruner, study, baselines, list(callbacks))
    return BACKENDS[backend](plan, ray)
