"""`run_search`: one call, two backends (Optuna in process, Ray Tune across workers); samplers, pruners, storages as tables."""
from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from marginsearch.losses import MarginSpec, identify, named

from .results import BASELINE, FAIL_REASON, Objective, SearchResult, TrialFailed, TrialRow
from .sampler import RewardGuidedSampler
from .space import SearchSpace, load

__all__ = ["SearchError", "SAMPLERS", "PRUNERS", "BACKENDS", "STORAGE_KINDS", "run_search", "make_storage",
           "make_sampler", "enqueue_baselines", "baseline_params", "checked_reward", "open_study", "finished_count",
           "record_failure", "retry_abandoned", "retried_numbers", "HEARTBEAT_S", "ABANDONED_RETRIES"]

HEARTBEAT_S = 30
ABANDONED_RETRIES = 3  # how often a coordinator re-runs a trial whose process was killed before giving up on it


class SearchError(ValueError):
    """A search that cannot start: unknown backend/sampler/pruner, unusable storage or resources."""


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

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
}


def make_sampler(sampler: str | BaseSampler, space: SearchSpace, seed: int | None,
                 population: int = 8) -> tuple[BaseSampler, bool]:
    """(sampler, named_grid) from a table name or an Optuna sampler instance."""
    if isinstance(sampler, BaseSampler):
        return sampler, False
    if sampler not in SAMPLERS:
        raise SearchError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} or pass an Optuna sampler")
    entry = SAMPLERS[sampler]
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        raise SearchError(f"sampler {sampler!r} needs the {entry.needs!r} package (pip install {entry.needs})")
    return entry.build(space, seed, population), entry.named_grid


def _journal(target: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(target.removeprefix("journal:")).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _rdb(url: str, heartbeat: bool) -> BaseStorage:
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    if not heartbeat:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 but documented for this use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                          grace_period=4 * HEARTBEAT_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))


def _sqlite_file(path: str, heartbeat: bool) -> BaseStorage:
    resolved = Path(path).resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return _rdb(f"sqlite:///{resolved}", heartbeat)


STORAGE_KINDS: dict[str, Callable[[str, bool], BaseStorage]] = {
    "journal": lambda target, heartbeat: _journal(target),  # journal:<path>: JournalFileBackend (NFS-friendly, no heartbeat)
    "url": _rdb,             # any SQLAlchemy URL: RDB storage, with heartbeat + retry of stale trials
    "file": _sqlite_file,    # a plain path: a SQLite file there
}


def make_storage(storage: str | BaseStorage | None, heartbeat: bool = True) -> BaseStorage | None:
    """An Optuna storage from None (in memory), `journal:<path>`, a SQLAlchemy URL or a SQLite file path.

    RDB storages get a 30 s SQLite lock timeout and, with `heartbeat` (for `study.optimize`), a
    heartbeat whose stale trials are marked FAIL and retried (RetryHeartbeatStaleTrialCallback, 2 retries).
    """
    if storage is None or isinstance(storage, BaseStorage):
        return storage
    kind = "journal" if storage.startswith("journal:") else "url" if "://" in storage else "file"
    try:
        return STORAGE_KINDS[kind](storage, heartbeat)
    except Exception as exc:  # SQLAlchemy / OS errors: name the storage on one line
        raise SearchError(f"storage {storage!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def baseline_params(space: SearchSpace, baselines: Sequence[str | MarginSpec] | str) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) per baseline, duplicates (same params) dropped; "named" means every named loss in the space."""
    if isinstance(baselines, str):
        if baselines != "named":
            raise SearchError(f"baselines: give a list of named losses or specs, or 'named'; got {baselines!r}")
        baselines = list(space.baselines())
    out: list[tuple[str, dict[str, Any]]] = []
    for item in baselines:
        spec = named(item) if isinstance(item, str) else item
        label = item if isinstance(item, str) else (identify(spec) or "custom")
        params = space.params_of(spec)
        if all(params != p for _, p in out):
            out.append((label, params))
    return out


def enqueue_baselines(study: optuna.Study, space: SearchSpace, baselines: Sequence[str | MarginSpec] | str) -> int:
    """Enqueue each baseline once (skipped if a trial with its params exists); how many are new."""
    before = len(study.get_trials(deepcopy=False))
    for label, params in baseline_params(space, baselines):
        study.enqueue_trial(params, user_attrs={BASELINE: label}, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False)) - before


def checked_reward(value: Any) -> float:
    """The objective's value as a finite float, else TrialFailed."""
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise TrialFailed(f"objective returned {value!r}, not a number") from None
    if not math.isfinite(reward):
        raise TrialFailed(f"objective returned {reward}")
    return reward


def _optuna_backend(**kw: Any) -> SearchResult:
    from .optuna_backend import run_optuna

    return run_optuna(**kw)


def _ray_backend(**kw: Any) -> SearchResult:
    return importlib.import_module("marginsearch.searchspace.ray_backend").run_ray(**kw)


BACKENDS: dict[str, Callable[..., SearchResult]] = {"optuna": _optuna_backend, "ray": _ray_backend}


def run_search(space: SearchSpace | str, objective: Objective, *, backend: str = "optuna",
               sampler: str | BaseSampler = "reward-guided", n_trials: int = 16, seed: int | None = 0,
               pruner: str = "none", storage: str | BaseStorage | None = None, study_name: str = "marginsearch",
               baselines: Sequence[str | MarginSpec] | str = (), resume: bool = True, population: int = 8,
               ray_address: str | None = None, resources_per_trial: Mapping[str, float] | None = None,
               max_concurrent: int | None = None, ray_dir: str | None = None,
               callbacks: Sequence[Callable[[TrialRow], Any]] = ()) -> SearchResult:
    """Search `space` for the spec maximising `objective(spec, report) -> reward`; the table of all trials.

    `report(epoch, reward)` records an intermediate reward and raises the backend's prune signal
    (optuna.TrialPruned; Ray stops the trial from inside `tune.report`). An objective raising
    `TrialFailed(reason)` or returning NaN/inf gives a FAIL trial with `fail_reason`. `n_trials`
    counts every trial of the study, earlier sessions and baselines included (resume tops it up).
    `callbacks` run in the driver after each finished trial with its `TrialRow`.
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
    return BACKENDS[backend](
        space=space, objective=objective, sampler=built, n_trials=n_trials, pruner=pruner,
        storage=storage, study_name=study_name, baselines=baselines, resume=resume, ray_address=ray_address,
        resources_per_trial=dict(resources_per_trial or {"cpu": 1, "gpu": 0}), max_concurrent=max_concurrent,
        ray_dir=ray_dir, callbacks=list(callbacks))


def open_study(storage: str | BaseStorage | None, study_name: str, sampler: BaseSampler,
               pruner: optuna.pruners.BasePruner, resume: bool) -> tuple[optuna.Study, BaseStorage | None]:
    """Create (or, with `resume`, load) the maximising study; refuse to overwrite an existing one without resume."""
    built = make_storage(storage)
    try:
        study = optuna.create_study(storage=built, study_name=study_name, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        raise SearchError(f"study {study_name!r} already exists in {storage}; pass resume=True or a new study_name") from None
    return study, built


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the FAIL trials that a later trial retries (stale heartbeat or `retry_abandoned`)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def finished_count(study: optuna.Study) -> int:
    """Trials already finished (they count towards n_trials on resume); a retried abandoned trial counts once, as its retry."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number not in retried)
               for t in trials)


def retry_abandoned(study: optuna.Study, reason: str, max_retry: int = ABANDONED_RETRIES) -> list[int]:
    """Fail every RUNNING trial (`fail_reason` = reason) and enqueue it again with its params, as a stale heartbeat would.

    Only for a coordinator that knows no worker of this study is running (a resumed campaign):
    the heartbeat's grace period would otherwise keep a killed trial RUNNING for minutes.
    The numbers of the trials failed.
    """
    storage = study._storage
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason.splitlines()[0])
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    failed_trial = storage.get_trial(trial._trial_id)
                    failed_trial.user_attrs = {k: v for k, v in failed_trial.user_attrs.items() if k != FAIL_REASON}
                    retry(study, failed_trial)  # the retry inherits params and attrs, not the reason
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile
    return failed


def record_failure(set_user_attr: Callable[[str, Any], None], reason: str) -> None:
    """Store why a trial failed in its user attrs (one line)."""
    set_user_attr(FAIL_REASON, reason.splitlines()[0] if reason else "failed")

