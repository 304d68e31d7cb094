"""Population mode, the papers' algorithm (AM-LFS arXiv 1905.07375, Search-Softmax arXiv 2007.06542).

Each round draws `population` candidates from the `RewardGuidedSampler`, trains each from the best
model of the previous round, scores them, updates the policy and carries the best model forward.
The objective protocol is `objective(spec, start_state) -> (reward, end_state)`; `start_state` is
None in round 0 and states are opaque to this module (the trainer's checkpoint dicts). Trials live
in an Optuna study (ask/tell, so in any storage) with their round in user attr ``round``; states
live in memory, so a population run is not resumable mid-way.

Backends (`POPULATION_BACKENDS`) only run a round's candidates: "optuna" calls the objective in this
process one after another; "ray" runs them in parallel as one Ray Tune run per round and passes
states through Tune checkpoints (`searchspace.ray_population`). The driver asks all of a round's
trials first (round k's policy depends only on rounds < k, so the draws are the same) and tells them
in order.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from optuna.trial import TrialState

from marginsearch.losses import MarginSpec

from ._study import PRUNERS, PopulationObjective, RoundRunner, SearchError, enqueue_baselines, open_study, run_candidate
from .options import DEFAULT_POPULATION, RayOptions, StudyOptions
from .results import FAIL_REASON, ROUND, SearchResult, TrialRow, row_of, rows_of, store_spec
from .sampler import RewardGuidedSampler
from .space import SearchSpace, load

__all__ = ["PopulationResult", "run_population", "run_candidate", "POPULATION_BACKENDS"]


@contextmanager
def _in_process(objective: PopulationObjective, study_name: str, ray: RayOptions) -> Iterator[RoundRunner]:
    """The "optuna" backend: candidates run here, one after another (it reads no Ray options)."""
    yield lambda specs, state, _round: (run_candidate(objective, spec, state) for spec in specs)


def _ray_rounds(objective: PopulationObjective, study_name: str,
                ray: RayOptions) -> AbstractContextManager[RoundRunner]:
    return importlib.import_module("marginsearch.searchspace.ray_population").ray_rounds(objective, study_name, ray)


POPULATION_BACKENDS: dict[str, Callable[[PopulationObjective, str, RayOptions],
                                        AbstractContextManager[RoundRunner]]] = {
    "optuna": _in_process, "ray": _ray_rounds}


@dataclass
class PopulationResult(SearchResult):
    """A search result plus, per round, the rewards, the best row, the policy after it, and the final carried state."""

    rewards_per_round: list[list[float | None]] = field(default_factory=list)
    best_per_round: list[TrialRow | None] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    final_state: Any = field(default=None, repr=False)


def run_population(space: SearchSpace | str, population_objective: PopulationObjective, rounds: int, *,
                   population: int = DEFAULT_POPULATION, sampler: RewardGuidedSampler | None = None,
                   seed: int | None = 0, study: StudyOptions = StudyOptions(name="marginsearch-population"),
                   baselines: Sequence[str | MarginSpec] | str = (),
                   callbacks: Sequence[Callable[[TrialRow], Any]] = (), backend: str = "optuna",
                   ray: RayOptions = RayOptions()) -> PopulationResult:
    """Run `rounds` rounds of `population` candidates; each starts from the previous round's best state.

    Baselines are enqueued and take the first slots of round 0 (their rewards normalise that round;
    the policy learns only from drawn candidates). A candidate raising TrialFailed (or returning a
    non-finite reward) is FAIL with `fail_reason`; if a whole round fails the state carries over unchanged.
    `backend="ray"` trains each round's candidates in parallel Ray Tune trials (Ray started locally
    unless `ray.address` or already running; `ray.resources_per_trial` {"cpu", "gpu"},
    `ray.max_concurrent`, Tune results and checkpoints under `ray.storage_path`); the objective must
    then be picklable. The study is always new (`study.resume` does not apply: states live in memory).
    """
    if backend not in POPULATION_BACKENDS:
        raise SearchError(f"unknown backend {backend!r}; choose one of {', '.join(POPULATION_BACKENDS)}")
    if rounds < 1 or population < 1:
        raise SearchError(f"rounds and population must be ≥ 1, got {rounds} and {population}")
    space = load(space)
    sampler = sampler or RewardGuidedSampler(space=space, seed=seed, population=population)
    if sampler.population != population:
        raise SearchError(f"sampler.population is {sampler.population}, run_population was given {population}")
    optuna_study, _ = open_study(study.storage, study.name, sampler, PRUNERS["none"](), resume=False)
    if optuna_study.get_trials(deepcopy=False):
        raise SearchError(f"study {study.name!r} already has trials; population mode needs a new study")
    enqueue_baselines(optuna_study, space, baselines)
    state: Any = None
    rewards_per_round: list[list[float | None]] = []
    best_per_round: list[TrialRow | None] = []
    with POPULATION_BACKENDS[backend](population_objective, study.name, ray) as run_round:
        for k in range(rounds):
            trials, specs = [], []
            for _ in range(population):
                trial = optuna_study.ask()
                trial.set_user_attr(ROUND, k)
                specs.append(space.to_spec(space.suggest(trial)))
                store_spec(trial.set_user_attr, specs[-1])
                trials.append(trial)
            scored: list[tuple[float | None, Any, TrialRow]] = []
            for trial, (reward, end_state, reason) in zip(trials, run_round(specs, state, k), strict=True):
                if reason is not None:
                    trial.set_user_attr(FAIL_REASON, reason)
                    frozen = optuna_study.tell(trial, state=TrialState.FAIL)
                else:
                    frozen = optuna_study.tell(trial, reward)
                row = row_of(frozen, space)
                scored.append((reward, end_state, row))
                for cb in callbacks:
                    cb(row)
            done = [s for s in scored if s[0] is not None]
            rewards_per_round.append([s[0] for s in scored])
            if done:
                _, state, best_row = max(done, key=lambda s: cast(float, s[0]))  # done: rewards not None
                best_per_round.append(best_row)
            else:
                best_per_round.append(None)
    return PopulationResult(rows_of(optuna_study, space), f"{backend}-population", study.name,
                            study.label, optuna_study, rewards_per_round, best_per_round,
                            sampler.trajectory(optuna_study), state)
