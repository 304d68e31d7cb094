"""Pictures of a search: reward history, parameter importance, the reward-guided policy's mean over rounds.

Each function returns a matplotlib Figure (no pyplot state, imported lazily) or None when there is
nothing to draw; `trainers.tracking` logs them as PNG artifacts of the campaign's parent run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["search_history", "parameter_importance", "policy_trajectory"]


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A Figure with one Axes, outside pyplot's global state (nothing to close, safe in worker processes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def search_history(rows: Sequence[Any], title: str = "search history") -> Any:
    """Reward of each finished trial (baselines marked, pruned trials at their last reward) and the best so far,
    against trial number."""
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in rows if r.reward is not None and math.isfinite(r.reward)]
    pruned = [(r.number, r.intermediate[max(r.intermediate)]) for r in rows
              if r.state == "PRUNED" and r.intermediate and math.isfinite(r.intermediate[max(r.intermediate)])]
    if not scored and not pruned:
        return None
    fig, ax = _figure(6.4, 3.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are integers
    if pruned:
        ax.scatter([n for n, _ in pruned], [v for _, v in pruned], s=18, marker="x", color="grey",
                   label="pruned (last reward)")
    sampled = [r for r in scored if not r.baseline]
    named = [r for r in scored if r.baseline]
    ax.scatter([r.number for r in sampled], [r.reward for r in sampled], s=18, label="sampled trial")
    ax.scatter([r.number for r in named], [r.reward for r in named], s=36, marker="D", label="named baseline")
    for r in named:
        ax.annotate(r.baseline, (r.number, r.reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    best, xs, ys = -math.inf, [], []
    for r in sorted(scored, key=lambda r: r.number):
        best = max(best, r.reward)
        xs.append(r.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", linewidth=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


IMPORTANCE_MIN_TRIALS = 16  # fewer complete trials give importances that are mostly noise: no chart


def parameter_importance(study: Any) -> Any:
    """Optuna's parameter importances (its default evaluator) as a bar chart, with the trial count; None under 16
    complete trials."""
    import optuna

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if complete < IMPORTANCE_MIN_TRIALS:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few complete trials or a single value
        return None
    if not importances:
        return None
    names = list(importances)[::-1]
    fig, ax = _figure(6.4, 0.4 * len(names) + 1.2)
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance")
    ax.set_title(f"parameter importance (Optuna's default evaluator, {complete} complete trials)", fontsize=9)
    fig.tight_layout()
    return fig


def policy_trajectory(snapshots: Sequence[Mapping[str, Any]]) -> Any:
    """The reward-guided policy's mean μ of each numeric parameter (normalised to [0, 1] of its range) per round."""
    if len(snapshots) < 2 or not snapshots[-1].get("mu_unit"):
        return None
    fig, ax = _figure(6.4, 3.8)
    names = sorted(snapshots[-1]["mu_unit"])
    for name in names:
        points = [(i, s["mu_unit"][name]) for i, s in enumerate(snapshots) if name in s.get("mu_unit", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                label=f"{name} (→ {snapshots[-1]['mu'][name]:.3g})")
    ax.set_xlabel("policy round")
    ax.set_ylabel("μ (0 = low end of range, 1 = high end)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("reward-guided policy mean")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
