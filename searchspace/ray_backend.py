"""The Ray Tune backend of `run_search` (ray >= 2.60, < 3): a `Tuner` whose searcher asks and tells our Optuna study.

The sampler and the Optuna study live in the driver; each trial runs the objective in a Ray worker
and reports per epoch with `ray.tune.report`. `StudySearcher` is a `ray.tune.search.Searcher`
subclass that owns the study and uses only Ray's public Searcher interface (`suggest`,
`on_trial_result`, `on_trial_complete`, `save` / `restore`): `suggest` asks the study for a trial
(enqueued baselines first, labelled) and stores its spec with `results.store_spec`;
`on_trial_result` records the intermediate reward by epoch; `on_trial_complete` tells the study
PRUNED for trials a scheduler stopped, FAIL with `fail_reason` for failed ones, COMPLETE with the
final reward otherwise, then calls the row callbacks (in the driver).

Ray's token authentication (on by default for `ray start --head` once a token exists): a client
that `ray.init(address=...)`s without the token fails with AuthenticationError deep in a
ConnectionError; `connect_ray` and `ray_resources` turn it into a one-line `SearchError` that
names what to set (`AUTH_HINT`).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .environment import set_offline_defaults

set_offline_defaults()  # before ray is imported

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.exceptions import AuthenticationError  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from ._study import (  # noqa: E402
    PRUNERS,
    SearchError,
    checked_reward,
    enqueue_baselines,
    finished_count,
    make_storage,
    open_study,
)
from .options import RayOptions, SearchPlan  # noqa: E402
from .results import (  # noqa: E402
    FAIL_REASON,
    Objective,
    SearchResult,
    TrialFailed,
    TrialRow,
    row_of,
    rows_of,
    store_spec,
)
from .space import SearchSpace  # noqa: E402

__all__ = ["run_ray", "ray_resources", "connect_ray", "StudySearcher", "SCHEDULERS", "AUTH_HINT"]

METRIC, MODE = "reward", "max"

AUTH_HINT = ("set RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> "
             "(default ~/.ray/auth_token; `ray get-auth-token` on the head node prints it)")
_AUTH_SIGNS = ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")  # Ray formats the GCS error into text

SCHEDULERS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "median": lambda: MedianStoppingRule(time_attr="epoch", metric=METRIC, mode=MODE, grace_period=1,
                                         min_samples_required=3),
    "hyperband": lambda: ASHAScheduler(time_attr="epoch", metric=METRIC, mode=MODE, grace_period=1,
                                       reduction_factor=3, max_t=1000),
}


def _trainable(config: dict[str, Any], space: SearchSpace | None = None, objective: Objective | None = None) -> None:
    """One trial in a Ray worker: build the spec, run the objective, report per epoch and a final result."""
    assert space is not None and objective is not None, "bound with tune.with_parameters"
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


class StudySearcher(Searcher):
    """Ray Tune's searcher over an Optuna study: ask on `suggest`, report by epoch, tell COMPLETE / PRUNED / FAIL.

    The study (with its sampler and storage) stays in the driver. `row_callbacks` run there after each
    finished trial with its `TrialRow`. A checkpoint (`save`) holds which Tune trial is which Optuna
    trial number, never the study or the callbacks: `restore` it into a searcher built on the same study.
    """

    def __init__(self, study: optuna.Study, space: SearchSpace,
                 row_callbacks: Sequence[Callable[[TrialRow], Any]] = ()) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.study, self.space, self.row_callbacks = study, space, list(row_callbacks)
        self._numbers: dict[str, int] = {}         # Tune trial id → Optuna trial number
        self._live: dict[str, optuna.Trial] = {}   # the asked, unfinished trials of this driver
        self._done: set[str] = set()
        self._epochs: dict[str, set[int]] = {}     # the epochs reported per Tune trial (each recorded once)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self._numbers:
            return dict(self._trial(trial_id).params)
        trial = self.study.ask()  # an enqueued baseline (WAITING, labelled) first, else the sampler's draw
        self._numbers[trial_id], self._live[trial_id] = trial.number, trial
        params = self.space.suggest(trial)
        store_spec(trial.set_user_attr, self.space.to_spec(params))  # the one stored copy of the trial's spec
        return dict(params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._done or trial_id not in self._numbers or result.get("final"):
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._done or trial_id not in self._numbers:
            return
        trial, result = self._trial(trial_id), result or {}
        if not result.get("final") and METRIC in result and "epoch" in result:
            self._report(trial_id, result)  # the result a scheduler stopped it on comes only here
        if error or FAIL_REASON in result:
            trial.set_user_attr(FAIL_REASON, result.get(FAIL_REASON, "the trial raised an error (see the Ray log)"))
            frozen = self.study.tell(trial, state=TrialState.FAIL)
        elif result.get("final"):
            frozen = self.study.tell(trial, float(result[METRIC]))
        else:  # stopped by the scheduler after an intermediate report
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self._done.add(trial_id)
        self._live.pop(trial_id, None)
        self._epochs.pop(trial_id, None)
        for cb in self.row_callbacks:
            cb(row_of(frozen, self.space))

    def save(self, checkpoint_path: str) -> None:
        """Which Tune trial is which Optuna trial (JSON); the study itself is in its storage."""
        state = {"study": self.study.study_name, "numbers": self._numbers, "done": sorted(self._done)}
        with open(checkpoint_path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """Take up a saved searcher's trials (this searcher must be built on the same study)."""
        with open(checkpoint_path, encoding="utf-8") as f:
            state = json.load(f)
        if state["study"] != self.study.study_name:
            raise SearchError(f"searcher checkpoint {checkpoint_path} is of study {state['study']!r}, "
                              f"not {self.study.study_name!r}")
        self._numbers, self._done, self._live = dict(state["numbers"]), set(state["done"]), {}

    def _report(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """The intermediate reward of an epoch, once (Tune may pass the same result to both notifications)."""
        epoch = int(result["epoch"])
        if epoch not in self._epochs.setdefault(trial_id, set()):
            self._epochs[trial_id].add(epoch)
            self._trial(trial_id).report(float(result[METRIC]), step=epoch)

    def _trial(self, trial_id: str) -> optuna.Trial:
        """The live Optuna trial of a Tune trial; after `restore`, reopened from the study by its number."""
        trial = self._live.get(trial_id)
        if trial is None:
            frozen = self.study.get_trials(deepcopy=False)[self._numbers[trial_id]]
            trial = self._live[trial_id] = optuna.trial.Trial(self.study, frozen._trial_id)
            self._epochs[trial_id] = set(frozen.intermediate_values)
        return trial


def _auth_failure(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is Ray refusing this client's token."""
    while exc is not None:
        if isinstance(exc, AuthenticationError) or any(sign in str(exc) for sign in _AUTH_SIGNS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _auth_error(address: str | None) -> SearchError:
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    return SearchError(f"{where} uses token authentication and refused this client: {AUTH_HINT}")


def connect_ray(address: str | None) -> bool:
    """`ray.init(address)` unless Ray is up here; whether this call started it (then the caller shuts it down).

    A refused token, or no cluster at `address`, is a one-line SearchError (with what to set for tokens).
    """
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:
        if _auth_failure(exc):
            raise _auth_error(address) from None
        if isinstance(exc, ConnectionError):
            raise SearchError(f"cannot connect to Ray at {address}: {exc}".splitlines()[0]) from None
        raise
    return True


def ray_resources(requested: Mapping[str, float], max_concurrent: int | None) -> tuple[dict[str, float], int]:
    """Per-trial resources checked against `ray.cluster_resources()`, and how many trials fit at once."""
    unknown = sorted(set(requested) - {"cpu", "gpu"})
    if unknown:
        raise SearchError(f"resources_per_trial: unknown key(s) {unknown}; use 'cpu' and 'gpu'")
    try:
        cluster = ray.cluster_resources()
    except Exception as exc:
        if _auth_failure(exc):
            raise _auth_error(None) from None
        raise
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
    """Run the search as Ray Tune trials (a local Ray unless `options.address`; shut down again if started here)."""
    started = connect_ray(options.address)
    try:
        resources, concurrent = ray_resources(options.resources_per_trial, options.max_concurrent)
        built = make_storage(plan.study.storage, heartbeat=False) or optuna.storages.InMemoryStorage()
        study, _ = open_study(built, plan.study.name, plan.sampler, PRUNERS["none"](), plan.study.resume)
        enqueue_baselines(study, plan.space, plan.baselines)  # once each; a resumed study keeps its own
        remaining = plan.n_trials - finished_count(study)
        if remaining > 0:
            trainable = tune.with_parameters(_trainable, space=plan.space, objective=plan.objective)
            tuner = tune.Tuner(
                tune.with_resources(trainable, resources),
                tune_config=tune.TuneConfig(search_alg=StudySearcher(study, plan.space, plan.callbacks),
                                            scheduler=SCHEDULERS[plan.pruner](), num_samples=remaining,
                                            max_concurrent_trials=concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=plan.study.name, storage_path=options.storage_path, verbose=0))
            tuner.fit()
        return SearchResult(rows_of(study, plan.space), "ray", plan.study.name, plan.study.label, study)
    finally:
        if started:
            ray.shutdown()
