"""The Ray Tune backend of `run_search` (ray 2.60): `Tuner` + `OptunaSearch` driving the same Optuna sampler and study.

The sampler and the Optuna study live in the driver (`OptunaSearch`); each trial runs the
objective in a Ray worker and reports per epoch with `ray.tune.report`. `_RowSearch`, a small
OptunaSearch subclass, tells the study PRUNED for trials a scheduler stopped (OptunaSearch
would say COMPLETE with a partial score), FAIL with `fail_reason` for failed ones, and records
intermediate rewards by epoch. It overrides `on_trial_result` / `on_trial_complete` and reads
OptunaSearch's `_ot_trials`, `_ot_study`, `_completed_trials`: pinned to ray >= 2.60, < 2.70.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from .environment import set_offline_defaults

set_offline_defaults()  # before ray is imported

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.samplers import BaseSampler  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from marginsearch.losses import MarginSpec  # noqa: E402

from ._study import (PRUNERS, SearchError, baseline_params, checked_reward, finished_count, make_storage,  # noqa: E402
                     open_study)
from .options import RayOptions, SearchPlan  # noqa: E402
from .results import (BASELINE, FAIL_REASON, Objective, SearchResult, TrialFailed, TrialRow, row_of, rows_of,  # noqa: E402
                      store_spec)
from .space import SearchSpace  # noqa: E402

__all__ = ["run_ray", "ray_resources", "SCHEDULERS"]

METRIC, MODE = "reward", "max"

SCHEDULERS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "median": lambda: MedianStoppingRule(time_attr="epoch", metric=METRIC, mode=MODE, grace_period=1,
                                         min_samples_required=3),
    "hyperband": lambda: ASHAScheduler(time_attr="epoch", metric=METRIC, mode=MODE, grace_period=1,
                                       reduction_factor=3, max_t=1000),
}


def _trainable(config: dict[str, Any], space: SearchSpace | None = None, objective: Objective | None = None) -> None:
    """One trial in a Ray worker: build the spec, run the objective, report per epoch and a final result."""
    spec = space.to_spec(config)
    last_epoch = [0]

    def report(epoch: int, reward: float) -> None:
        last_epoch[0] = int(epoch)
        tune.report({METRIC: float(reward), "epoch": int(epoch), "final": False})  # raises SystemExit to stop

    try:
        reward = checked_reward(objective(spec, report))
    except TrialFailed as exc:
        tune.report({METRIC: -math.inf, "epoch": last_epoch[0], "final": True, FAIL_REASON: exc.reason})
        return
    tune.report({METRIC: reward, "epoch": last_epoch[0], "final": True})


class _RowSearch(OptunaSearch):
    """OptunaSearch that records PRUNED / FAIL states, epoch-indexed rewards, baseline labels, and calls row callbacks."""

    def __init__(self, *args: Any, search_space: SearchSpace, labels: Mapping[tuple, str],
                 row_callbacks: Sequence[Callable[[TrialRow], Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._search_space, self._labels, self._row_callbacks = search_space, dict(labels), list(row_callbacks)

    def save(self, checkpoint_path: str) -> None:
        """Ray checkpoints a searcher by pickling its attributes: the driver-side callbacks (closures) stay out."""
        callbacks, self._row_callbacks = self._row_callbacks, []
        try:
            super().save(checkpoint_path)
        finally:
            self._row_callbacks = callbacks

    def restore(self, checkpoint_path: str) -> None:
        """Restore the searcher's state, keeping this driver's callbacks."""
        callbacks = self._row_callbacks
        super().restore(checkpoint_path)
        self._row_callbacks = callbacks

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is None:
            return None
        trial = self._ot_trials[trial_id]
        store_spec(trial.set_user_attr, self._search_space.to_spec(config))  # the one stored copy of the trial's spec
        label = self._labels.pop(_key(config), None)  # an enqueued baseline
        if label is not None:
            trial.set_user_attr(BASELINE, label)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or result.get("final"):
            return
        self._ot_trials[trial_id].report(float(result[METRIC]), int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial, result = self._ot_trials[trial_id], result or {}
        if not result.get("final") and METRIC in result and "epoch" in result:
            ot_trial.report(float(result[METRIC]), int(result["epoch"]))  # the result a scheduler stopped it on
        if error or FAIL_REASON in result:
            ot_trial.set_user_attr(FAIL_REASON, result.get(FAIL_REASON, "the trial raised an error (see the Ray log)"))
            frozen = self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif result.get("final"):
            frozen = self._ot_study.tell(ot_trial, float(result[METRIC]))
        else:  # stopped by the scheduler after an intermediate report
            frozen = self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
        for cb in self._row_callbacks:
            cb(row_of(frozen, self._search_space))


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def ray_resources(requested: Mapping[str, float], max_concurrent: int | None) -> tuple[dict[str, float], int]:
    """Per-trial resources checked against `ray.cluster_resources()`, and how many trials fit at once."""
    unknown = sorted(set(requested) - {"cpu", "gpu"})
    if unknown:
        raise SearchError(f"resources_per_trial: unknown key(s) {unknown}; use 'cpu' and 'gpu'")
    cluster = ray.cluster_resources()
    cpu, gpu = float(requested.get("cpu", 1)), float(requested.get("gpu", 0))
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if gpu > have_gpu:
        raise SearchError(f"resources_per_trial asks for gpu={gpu:g} but the Ray cluster has {have_gpu:g} GPU(s)")
    if cpu > have_cpu or cpu <= 0:
        raise SearchError(f"resources_per_trial asks for cpu={cpu:g} but the Ray cluster has {have_cpu:g} CPU(s)")
    fit = int(have_cpu // cpu)
    if gpu > 0:
        fit = min(fit, int(have_gpu // gpu))
    return {"cpu": cpu, "gpu": gpu}, max(1, min(fit, max_concurrent or fit))


def run_ray(plan: SearchPlan, options: RayOptions) -> SearchResult:
    """Run the search as Ray Tune trials (Ray started locally unless `options.address`; shut down again if started here)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, logging_level="WARNING")
    try:
        resources, concurrent = ray_resources(options.resources_per_trial, options.max_concurrent)
        built = make_storage(plan.study.storage, heartbeat=False) or optuna.storages.InMemoryStorage()
        study, _ = open_study(built, plan.study.name, plan.sampler, PRUNERS["none"](), plan.study.resume)
        existing = [_key(t.system_attrs.get("fixed_params", t.params)) for t in study.get_trials(deepcopy=False)]
        pending = [(label, p) for label, p in baseline_params(plan.space, plan.baselines) if _key(p) not in existing]
        remaining = plan.n_trials - finished_count(study)
        searcher = _RowSearch(space=plan.space.suggest, metric=METRIC, mode=MODE, sampler=plan.sampler, storage=built,
                              study_name=plan.study.name, points_to_evaluate=[p for _, p in pending] or None,
                              search_space=plan.space, labels={_key(p): label for label, p in pending},
                              row_callbacks=plan.callbacks)
        if remaining > 0:
            trainable = tune.with_parameters(_trainable, space=plan.space, objective=plan.objective)
            tuner = tune.Tuner(
                tune.with_resources(trainable, resources),
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=SCHEDULERS[plan.pruner](),
                                            num_samples=remaining, max_concurrent_trials=concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=plan.study.name, storage_path=options.storage_path, verbose=0))
            tuner.fit()
        study = optuna.load_study(study_name=plan.study.name, storage=built, sampler=plan.sampler)
        return SearchResult(rows_of(study, plan.space), "ray", plan.study.name, plan.study.label, study)
    finally:
        if started:
            ray.shutdown()
