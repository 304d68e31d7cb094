"""The result table both backends return: one row per finished trial, read back from the Optuna study."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from marginsearch.losses import MarginSpec, SpecError, identify

from .space import SearchSpace, SpaceError

__all__ = ["TrialFailed", "TrialRow", "SearchResult", "row_of", "rows_of", "store_spec", "FAIL_REASON", "BASELINE",
           "ROUND", "SPEC", "TrialContext",
           "current_trial", "trial_context", "end_trial_context"]

FAIL_REASON = "fail_reason"   # user attr: why a trial failed
BASELINE = "baseline"         # user attr: the named loss an enqueued baseline trial stands for
ROUND = "round"               # user attr: the round of a population-mode trial
SPEC = "spec"                 # user attr: the trial's MarginSpec (`to_dict`), the one stored copy rows read back

Objective = Callable[[Any, Callable[[int, float], None]], float]


@dataclass(frozen=True)
class TrialContext:
    """The Optuna trial an objective call belongs to, for objectives that record it elsewhere (MLflow run names,
    links)."""

    number: int
    study_name: str
    set_user_attr: Callable[[str, Any], None]
    retry_of: int | None = None                 # the trial this one retries (its process died), else None
    user_attrs: Mapping[str, Any] = field(default_factory=dict)  # at the start (a retry inherits its trial's)


_CURRENT: ContextVar[TrialContext | None] = ContextVar("marginsearch_trial", default=None)


def current_trial() -> TrialContext | None:
    """The trial the running objective call belongs to (set by the in-process Optuna backend), or None."""
    return _CURRENT.get()


def trial_context(context: TrialContext | None) -> Token:
    """Set `current_trial()`; pass the returned token to `end_trial_context` when the objective call ends."""
    return _CURRENT.set(context)


def end_trial_context(token: Token) -> None:
    """Restore `current_trial()` to what it was before `trial_context`."""
    _CURRENT.reset(token)


class TrialFailed(Exception):
    """Raised by an objective for a candidate that cannot be scored (diverged, non-finite reward); the trial is FAIL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class TrialRow:
    """One finished trial: its params, spec, the named loss it equals, reward, state and intermediate rewards."""

    number: int
    params: dict[str, Any]
    spec: MarginSpec | None
    named: str | None
    reward: float | None
    state: str                          # COMPLETE, PRUNED or FAIL
    reason: str = ""
    intermediate: dict[int, float] = field(default_factory=dict)
    baseline: str | None = None         # the named loss this trial was enqueued as
    round: int | None = None            # population mode only
    fields: dict[str, Any] = field(default_factory=dict)  # the spec fields its params set (flat names: target.m2_rad …)


def store_spec(set_user_attr: Callable[[str, Any], None], spec: MarginSpec) -> None:
    """Store a trial's spec once, as the `spec` user attr (`MarginSpec.to_dict`); `row_of` reads it back."""
    set_user_attr(SPEC, spec.to_dict())


def _spec_of(trial: FrozenTrial, space: SearchSpace) -> MarginSpec | None:
    """The stored spec; for a trial that stored none (it failed before its objective ran), the space's spec of
    its params."""
    try:
        if SPEC in trial.user_attrs:
            return MarginSpec.from_dict(trial.user_attrs[SPEC])
        return space.to_spec(trial.params)
    except (SpaceError, SpecError):
        return None


def row_of(trial: FrozenTrial, space: SearchSpace) -> TrialRow:
    """The row of a finished trial, its spec read back from the stored copy."""
    spec = _spec_of(trial, space)
    name = identify(spec) if spec is not None else None
    reason = trial.user_attrs.get(FAIL_REASON, "")
    if trial.state == TrialState.PRUNED and not reason:
        reason = f"pruned after epoch {trial.last_step}" if trial.last_step is not None else "pruned"
    if trial.state == TrialState.FAIL and not reason:
        reason = "error (see the log)"
    retried = trial.system_attrs.get("failed_trial")
    if retried is not None:
        reason = f"{reason}; retry of trial id {retried}".lstrip("; ")
    fields = space.searched_fields(spec, trial.params) if spec is not None else {}
    return TrialRow(trial.number, dict(trial.params), spec, name,
                    trial.value if trial.state == TrialState.COMPLETE else None, trial.state.name, reason,
                    dict(trial.intermediate_values), trial.user_attrs.get(BASELINE), trial.user_attrs.get(ROUND),
                    fields)


def rows_of(study: optuna.Study, space: SearchSpace) -> list[TrialRow]:
    """Rows of every finished trial of a study, by trial number."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [row_of(t, space) for t in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass
class SearchResult:
    """Rows of a search (same table from either backend) and where it lives."""

    rows: list[TrialRow]
    backend: str
    study_name: str
    storage: str | None
    study: optuna.Study | None = field(default=None, repr=False)

    @property
    def best(self) -> TrialRow | None:
        """The COMPLETE row with the highest reward (None if none completed)."""
        done = [r for r in self.rows if r.state == "COMPLETE" and r.reward is not None]
        return max(done, key=lambda r: cast(float, r.reward)) if done else None  # done: rewards not None

    def to_markdown(self, columns: Mapping[str, Callable[[TrialRow], Any]] | None = None) -> str:
        """A markdown table: trial, round, named loss, state, reward, reward per epoch, the spec fields searched,
        reason."""
        columns = columns or {
            "trial": lambda r: r.number,
            "round": lambda r: "" if r.round is None else r.round,
            "loss": lambda r: r.named or ("(" + r.baseline + ")" if r.baseline else ""),
            "state": lambda r: r.state,
            "reward": lambda r: "" if r.reward is None else _fmt(r.reward),
            "per epoch": lambda r: " ".join(_fmt(v) for _, v in sorted(r.intermediate.items())),
            "spec fields": lambda r: ", ".join(f"{k}={_fmt(v)}" for k, v in r.fields.items()),
            "reason": lambda r: r.reason,
        }
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(f(r)).replace("|", "/") for f in columns.values()) + " |" for r in self.rows]
        best = self.best
        if best is not None:
            lines.append(f"\nbest: trial {best.number} ({best.named or 'unnamed'}) reward {_fmt(best.reward)}")
        return "\n".join(lines)

    def print(self) -> None:
        """Print the markdown table."""
        print(self.to_markdown())
