"""Shared study machinery of the search backends (private): storages, the study, baselines, rewards, retries.

The Optuna and Ray backends and population mode import from here; `search` (the public entry point)
imports the backends. Nothing here imports a backend, so the modules form no cycle.
"""
from __future__ import annotations

import contextlib
import math
import sqlite3
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from marginsearch.losses import MarginSpec, identify
from marginsearch.losses.errors import MarginsearchError

from .results import BASELINE, FAIL_REASON, TrialFailed
from .space import SearchSpace, baseline_spec

__all__ = ["SearchError", "PRUNERS", "STORAGE_KINDS", "HEARTBEAT_S", "ABANDONED_RETRIES", "make_storage",
           "open_study", "baseline_params", "enqueue_baselines", "checked_reward", "finished_count", "finished_among",
           "record_failure", "retry_abandoned", "retried_numbers", "INTERRUPTED", "PopulationObjective", "Outcome",
           "RoundRunner", "run_candidate"]

INTERRUPTED = "abandoned: interrupted"  # fail_reason of a trial stopped by SIGINT/SIGTERM: retried on resume
HEARTBEAT_S = 30
ABANDONED_RETRIES = 3  # how often a coordinator re-runs a trial whose process was killed before giving up on it


class SearchError(MarginsearchError):
    """A search that cannot start: unknown backend/sampler/pruner, unusable storage or resources."""


PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
}


def _journal(target: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(target.removeprefix("journal:")).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def write_ahead_log(url: str) -> None:
    """Switch the SQLite file of a `sqlite:///<path>` URL to write-ahead logging (kept in the file; created empty if
    missing): a commit costs one sync instead of the rollback journal's several, and readers do not block the
    writer. Other URLs and in-memory databases are left alone; a file another process holds locked keeps its mode
    (SQLite refuses the switch quietly)."""
    path = url.removeprefix("sqlite:///").partition("?")[0] if url.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # busy: the store works as it is
            pass


def _rdb(url: str, heartbeat: bool) -> BaseStorage:
    write_ahead_log(url)
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
    # journal:<path>: JournalFileBackend (NFS-friendly, no heartbeat)
    "journal": lambda target, heartbeat: _journal(target),
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


def baseline_params(space: SearchSpace,
                    baselines: Sequence[str | MarginSpec] | str) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) per baseline, duplicates (same params) dropped; "named" means every named loss in the space."""
    if isinstance(baselines, str):
        if baselines != "named":
            raise SearchError(f"baselines: give a list of named losses or specs, or 'named'; got {baselines!r}")
        baselines = list(space.baselines())
    out: list[tuple[str, dict[str, Any]]] = []
    for item in baselines:
        spec = baseline_spec(item) if isinstance(item, str) else item
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


def open_study(storage: str | BaseStorage | None, study_name: str, sampler: BaseSampler,
               pruner: optuna.pruners.BasePruner, resume: bool) -> tuple[optuna.Study, BaseStorage | None]:
    """Create (or, with `resume`, load) the maximising study; refuse to overwrite an existing one without resume."""
    built = make_storage(storage)
    try:
        study = optuna.create_study(storage=built, study_name=study_name, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        raise SearchError(f"study {study_name!r} already exists in {storage}; "
                          "pass resume=True or a new study_name") from None
    return study, built


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the FAIL trials that a later trial retries (stale heartbeat or `retry_abandoned`)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def finished_count(study: optuna.Study) -> int:
    """Trials already finished (they count towards n_trials on resume); a retried abandoned trial counts
    once, as its retry."""
    return finished_among(study.get_trials(deepcopy=False))


def finished_among(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """`finished_count` of a list of the study's trials already read."""
    retried = retried_numbers(trials)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def retry_abandoned(study: optuna.Study, reason: str, max_retry: int = ABANDONED_RETRIES) -> list[int]:
    """Fail every RUNNING trial (`fail_reason` = reason) and enqueue it again with its params, as a stale
    heartbeat would.

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
    retried = retried_numbers(study.get_trials(deepcopy=False))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.user_attrs.get(FAIL_REASON, "").startswith(INTERRUPTED) and trial.number not in retried:
            with warnings.catch_warnings():  # interrupted (SIGINT/SIGTERM): as resumable as a kill
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry(study, storage.get_trial(trial._trial_id))
            failed.append(trial.number)
    return failed


def record_failure(set_user_attr: Callable[[str, Any], None], reason: str) -> None:
    """Store why a trial failed in its user attrs (one line)."""
    set_user_attr(FAIL_REASON, reason.splitlines()[0] if reason else "failed")



# ------------------------------------------------------------------ population mode, shared with its Ray runner
PopulationObjective = Callable[[MarginSpec, Any], "tuple[float, Any]"]
Outcome = tuple["float | None", Any, "str | None"]  # (reward, end state, None) or (None, None, fail reason)
RoundRunner = Callable[[Sequence[MarginSpec], Any, int], Iterable[Outcome]]  # (specs, start state, round) → outcomes


def run_candidate(objective: PopulationObjective, spec: MarginSpec, start_state: Any) -> Outcome:
    """One candidate: (finite reward, end state, None), or (None, None, reason) on TrialFailed or a NaN/inf reward."""
    try:
        reward, end_state = objective(spec, start_state)
        return checked_reward(reward), end_state, None
    except TrialFailed as exc:
        return None, None, exc.reason
