"""The Optuna backend of `run_search`: `study.optimize` in this process, any Optuna storage."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import optuna
from optuna.samplers import BaseSampler

from marginsearch.losses import MarginSpec

from .results import Objective, SearchResult, TrialFailed, TrialRow, row_of, rows_of
from .search import PRUNERS, checked_reward, enqueue_baselines, finished_count, open_study, record_failure
from .space import SearchSpace

__all__ = ["run_optuna", "optuna_objective"]


def optuna_objective(space: SearchSpace, objective: Objective) -> Callable[[optuna.Trial], float]:
    """Wrap `objective(spec, report)` as an Optuna objective: suggest, build the spec, report, record failures."""

    def run(trial: optuna.Trial) -> float:
        spec = space.to_spec(space.suggest(trial))
        trial.set_user_attr("spec", spec.to_dict())

        def report(epoch: int, reward: float) -> None:
            trial.report(float(reward), step=int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            return checked_reward(objective(spec, report))
        except TrialFailed as exc:
            record_failure(trial.set_user_attr, exc.reason)
            raise TrialFailed(exc.reason) from None

    return run


def run_optuna(*, space: SearchSpace, objective: Objective, sampler: BaseSampler, n_trials: int, pruner: str,
               storage: Any, study_name: str, baselines: Sequence[str | MarginSpec] | str, resume: bool,
               callbacks: list[Callable[[TrialRow], Any]], **_ray_only: Any) -> SearchResult:
    """Run the search with `study.optimize` (heartbeats and stale-trial retry come with RDB storages)."""
    study, _ = open_study(storage, study_name, sampler, PRUNERS[pruner](), resume)
    enqueue_baselines(study, space, baselines)
    remaining = n_trials - finished_count(study)
    hooks = [lambda st, trial, cb=cb: cb(row_of(trial, space)) for cb in callbacks]
    hooks.append(lambda st, trial: st.stop() if finished_count(st) >= n_trials else None)  # other workers count too
    if remaining > 0:
        study.optimize(optuna_objective(space, objective), n_trials=remaining, catch=(TrialFailed,),
                       callbacks=hooks, gc_after_trial=False)
    return SearchResult(rows_of(study, space), "optuna", study_name, None if storage is None else str(storage), study)
