"""Population mode, the papers' algorithm (AM-LFS arXiv 1905.07375, Search-Softmax arXiv 2007.06542).

Each round draws `population` candidates from the `RewardGuidedSampler`, trains each from the best
model of the previous round, scores them, updates the policy and carries the best model forward.
The objective protocol is `objective(spec, start_state) -> (reward, end_state)`; `start_state` is
None in round 0 and states are opaque to this module (the trainer's checkpoint dicts). Trials live
in an Optuna study (ask/tell, so in any storage) with their round in user attr ``round``; states
live in memory, so a population run is not resumable mid-way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from optuna.trial import TrialState

from losses import MarginSpec

from .results import FAIL_REASON, ROUND, SearchResult, TrialFailed, TrialRow, row_of, rows_of
from .sampler import RewardGuidedSampler
from .search import PRUNERS, SearchError, checked_reward, enqueue_baselines, open_study
from .space import SearchSpace, load

__all__ = ["PopulationResult", "run_population"]

PopulationObjective = Callable[[MarginSpec, Any], "tuple[float, Any]"]


@dataclass
class PopulationResult(SearchResult):
    """A search result plus, per round, the rewards, the best row, the policy after it, and the final carried state."""

    rewards_per_round: list[list[float | None]] = field(default_factory=list)
    best_per_round: list[TrialRow | None] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    final_state: Any = field(default=None, repr=False)


def run_population(space: SearchSpace | str, population_objective: PopulationObjective, rounds: int, *,
                   population: int = 8, sampler: RewardGuidedSampler | None = None, seed: int | None = 0,
                   storage: Any = None, study_name: str = "marginsearch-population",
                   baselines: Sequence[str | MarginSpec] | str = (),
                   callbacks: Sequence[Callable[[TrialRow], Any]] = ()) -> PopulationResult:
    """Run `rounds` rounds of `population` candidates; each starts from the previous round's best state.

    Baselines are enqueued and take the first slots of round 0 (their rewards normalise that round;
    the policy learns only from drawn candidates). A candidate raising TrialFailed (or returning a
    non-finite reward) is FAIL with `fail_reason`; if a whole round fails the state carries over unchanged.
    """
    if rounds < 1 or population < 1:
        raise SearchError(f"rounds and population must be ≥ 1, got {rounds} and {population}")
    space = load(space)
    sampler = sampler or RewardGuidedSampler(space=space, seed=seed, population=population)
    if sampler.population != population:
        raise SearchError(f"sampler.population is {sampler.population}, run_population was given {population}")
    study, _ = open_study(storage, study_name, sampler, PRUNERS["none"](), resume=False)
    if study.get_trials(deepcopy=False):
        raise SearchError(f"study {study_name!r} already has trials; population mode needs a new study")
    enqueue_baselines(study, space, baselines)
    state: Any = None
    rewards_per_round: list[list[float | None]] = []
    best_per_round: list[TrialRow | None] = []
    for k in range(rounds):
        scored: list[tuple[float | None, Any, TrialRow]] = []
        for _ in range(population):
            trial = study.ask()
            trial.set_user_attr(ROUND, k)
            spec = space.to_spec(space.suggest(trial))
            trial.set_user_attr("spec", spec.to_dict())
            try:
                reward, end_state = population_objective(spec, state)
                reward = checked_reward(reward)
            except TrialFailed as exc:
                trial.set_user_attr(FAIL_REASON, exc.reason)
                frozen = study.tell(trial, state=TrialState.FAIL)
                reward, end_state = None, None
            else:
                frozen = study.tell(trial, reward)
            row = row_of(frozen, space)
            scored.append((reward, end_state, row))
            for cb in callbacks:
                cb(row)
        done = [s for s in scored if s[0] is not None]
        rewards_per_round.append([s[0] for s in scored])
        if done:
            _, state, best_row = max(done, key=lambda s: s[0])
            best_per_round.append(best_row)
        else:
            best_per_round.append(None)
    return PopulationResult(rows_of(study, space), "optuna-population", study_name,
                            None if storage is None else str(storage), study, rewards_per_round, best_per_round,
                            sampler.trajectory(study), state)
