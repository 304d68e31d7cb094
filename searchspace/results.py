"""The result table both backends return: one row per finished trial, read back from the Optuna study."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from marginsearch.losses import identify

from .space import SearchSpace, SpaceError

__all__ = ["TrialFailed", "TrialRow", "SearchResult", "row_of", "rows_of", "FAIL_REASON", "BASELINE", "ROUND"]

FAIL_REASON = "fail_reason"   # user attr: why a trial failed
BASELINE = "baseline"         # user attr: the named loss an enqueued baseline trial stands for
ROUND = "round"               # user attr: the round of a population-mode trial

Objective = Callable[[Any, Callable[[int, float], None]], float]


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
    spec: dict[str, Any] | None
    named: str | None
    reward: float | None
    state: str                          # COMPLETE, PRUNED or FAIL
    reason: str = ""
    intermediate: dict[int, float] = field(default_factory=dict)
    baseline: str | None = None         # the named loss this trial was enqueued as
    round: int | None = None            # population mode only


def row_of(trial: FrozenTrial, space: SearchSpace) -> TrialRow:
    """The row of a finished trial (spec rebuilt from its params)."""
    try:
        spec = space.to_spec(trial.params)
        spec_dict, name = spec.to_dict(), identify(spec)
    except SpaceError:
        spec_dict, name = None, None
    reason = trial.user_attrs.get(FAIL_REASON, "")
    if trial.state == TrialState.PRUNED and not reason:
        reason = f"pruned after epoch {trial.last_step}" if trial.last_step is not None else "pruned"
    if trial.state == TrialState.FAIL and not reason:
        reason = "error (see the log)"
    retried = trial.system_attrs.get("failed_trial")
    if retried is not None:
        reason = f"{reason}; retry of trial id {retried}".lstrip("; ")
    return TrialRow(trial.number, dict(trial.params), spec_dict, name,
                    trial.value if trial.state == TrialState.COMPLETE else None, trial.state.name, reason,
                    dict(trial.intermediate_values), trial.user_attrs.get(BASELINE), trial.user_attrs.get(ROUND))


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
        return max(done, key=lambda r: r.reward) if done else None

    def to_markdown(self, columns: Mapping[str, Callable[[TrialRow], Any]] | None = None) -> str:
        """A markdown table: trial, round, named loss, state, reward, reward per epoch, params, reason."""
        columns = columns or {
            "trial": lambda r: r.number,
            "round": lambda r: "" if r.round is None else r.round,
            "loss": lambda r: r.named or ("(" + r.baseline + ")" if r.baseline else ""),
            "state": lambda r: r.state,
            "reward": lambda r: "" if r.reward is None else _fmt(r.reward),
            "per epoch": lambda r: " ".join(_fmt(v) for _, v in sorted(r.intermediate.items())),
            "params": lambda r: ", ".join(f"{k}={_fmt(v)}" for k, v in r.params.items()),
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
