"""The Optuna backend of `run_search`: `study.optimize` in this process, any Optuna storage."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ._study import (
    INTERRUPTED,
    PRUNERS,
    checked_reward,
    enqueue_baselines,
    finished_among,
    finished_count,
    open_study,
    record_failure,
)
from .options import SearchPlan
from .results import (
    Objective,
    SearchResult,
    TrialContext,
    TrialFailed,
    TrialRow,
    end_trial_context,
    row_of,
    rows_of,
    store_spec,
    trial_context,
)
from .space import SearchSpace

__all__ = ["run_optuna", "optuna_objective"]


def _system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """The trial's system attrs as they were when it started (Optuna's copy in the Trial; else a storage read)."""
    cached = getattr(trial, "_cached_frozen_trial", None)
    return cached.system_attrs if cached is not None else trial.storage.get_trial_system_attrs(trial._trial_id)


def optuna_objective(space: SearchSpace, objective: Objective) -> Callable[[optuna.Trial], float]:
    """Wrap `objective(spec, report)` as an Optuna objective: suggest, build and store the spec, report, record
    failures."""

    def run(trial: optuna.Trial) -> float:
        spec = space.to_spec(space.suggest(trial))
        store_spec(trial.set_user_attr, spec)

        def report(epoch: int, reward: float) -> None:
            trial.report(float(reward), step=int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        token = trial_context(TrialContext(trial.number, trial.study.study_name, trial.set_user_attr,
                                           _system_attrs(trial).get("failed_trial"), trial.user_attrs))
        try:
            return checked_reward(objective(spec, report))
        except TrialFailed as exc:
            record_failure(trial.set_user_attr, exc.reason)
            raise TrialFailed(exc.reason) from None
        except KeyboardInterrupt:  # Optuna fails the trial; the reason makes a resume retry it, as after a kill
            record_failure(trial.set_user_attr, f"{INTERRUPTED} (SIGINT or SIGTERM) during the trial")
            raise
        finally:
            end_trial_context(token)

    return run


def _taken(study: optuna.Study) -> int:
    """Trials finished or running in any process: a worker stops once they make up n_trials, so N workers do not
    overshoot.

    A RUNNING trial of a process that died counts until its heartbeat goes stale; the next run retries it.
    """
    trials = study.get_trials(deepcopy=False)  # one read for both counts
    return finished_among(trials) + sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def _row_hook(cb: Callable[[TrialRow], Any], space: SearchSpace) -> Callable[[optuna.Study, FrozenTrial], None]:
    """An Optuna study callback that hands `cb` the finished trial's row."""
    return lambda st, trial: cb(row_of(trial, space))


def run_optuna(plan: SearchPlan) -> SearchResult:
    """Run the search with `study.optimize` (heartbeats and stale-trial retry come with RDB storages)."""
    study, _ = open_study(plan.study.storage, plan.study.name, plan.sampler, PRUNERS[plan.pruner](), plan.study.resume)
    enqueue_baselines(study, plan.space, plan.baselines)
    remaining = plan.n_trials - finished_count(study)
    hooks = [_row_hook(cb, plan.space) for cb in plan.callbacks]
    hooks.append(lambda st, trial: st.stop() if _taken(st) >= plan.n_trials else None)
    if remaining > 0:
        study.optimize(optuna_objective(plan.space, plan.objective), n_trials=remaining, catch=(TrialFailed,),
                       callbacks=hooks, gc_after_trial=False)
    return SearchResult(rows_of(study, plan.space), "optuna", plan.study.name, plan.study.label, study)
