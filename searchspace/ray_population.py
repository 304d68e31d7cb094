"""Population mode on Ray Tune (ray 2.60): each round's candidates train in parallel, states travel as Tune checkpoints.

The driver keeps the Optuna study and the `RewardGuidedSampler` (`run_population` asks and tells);
this module runs one round: a `tune.Tuner` over a grid of the round's candidates, each trial getting
`{"candidate": i, "spec": spec dict}` as its config and the round's start state through
`tune.with_parameters` (the object store, once per round). A trial trains from the start state and
reports `{"reward": r}` with a checkpoint holding its end state (`torch.save`, so any picklable
state), or `{"fail_reason": ...}` without one. The driver loads every finished trial's end state;
`run_population` carries the best one into the next round (the papers' "copy the best model to all").
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from .environment import set_offline_defaults

set_offline_defaults()  # before ray is imported

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from marginsearch.losses import MarginSpec  # noqa: E402

from ._study import Outcome, PopulationObjective, RoundRunner, run_candidate  # noqa: E402
from .options import RayOptions  # noqa: E402
from .ray_backend import connect_ray, ray_resources  # noqa: E402
from .results import FAIL_REASON  # noqa: E402

__all__ = ["ray_rounds", "STATE_FILE"]

METRIC = "reward"
STATE_FILE = "state.pt"  # the end state inside each trial's checkpoint directory


def _candidate_trainable(config: dict[str, Any], objective: PopulationObjective | None = None,
                         start_state: Any = None) -> None:
    """One candidate in a Ray worker: train from the round's start state, report its reward and end state
    (checkpoint)."""
    objective = cast("PopulationObjective", objective)  # always given, by tune.with_parameters
    reward, end_state, reason = run_candidate(objective, MarginSpec.from_dict(config["spec"]), start_state)
    if reason is not None:
        tune.report({METRIC: -math.inf, FAIL_REASON: reason})
        return
    with tempfile.TemporaryDirectory(prefix="population-state-") as tmp:
        torch.save(end_state, Path(tmp) / STATE_FILE)
        tune.report({METRIC: reward}, checkpoint=tune.Checkpoint.from_directory(tmp))


def _outcome(result: Any) -> Outcome:
    """(reward, end state, None) from a finished Tune result, or (None, None, reason) for a failed or errored trial."""
    if result.error is not None:
        cause = getattr(result.error, "cause", None) or result.error  # a RayTaskError wraps the trainable's exception
        last_line = (str(cause).strip().splitlines() or [""])[-1]
        return None, None, f"the trial raised {type(cause).__name__}: {last_line}"[:500]
    metrics = result.metrics or {}
    if FAIL_REASON in metrics:
        return None, None, str(metrics[FAIL_REASON])
    if result.checkpoint is None:
        return None, None, "the trial reported no checkpoint"
    with result.checkpoint.as_directory() as directory:
        end_state = torch.load(Path(directory) / STATE_FILE, weights_only=False)  # written by this run's trials
    return float(metrics[METRIC]), end_state, None


@contextmanager
def ray_rounds(objective: PopulationObjective, study_name: str, ray_options: RayOptions) -> Iterator[RoundRunner]:
    """A round runner on Ray Tune for a whole population run (Ray started here unless running, and then shut down)."""
    started = connect_ray(ray_options.address)  # a refused token or no cluster: one SearchError line
    try:
        resources, concurrent = ray_resources(ray_options.resources_per_trial, ray_options.max_concurrent)

        def run_round(specs: Sequence[MarginSpec], start_state: Any, round_index: int) -> list[Outcome]:
            trainable = tune.with_parameters(_candidate_trainable, objective=objective, start_state=start_state)
            candidates = [{"candidate": i, "spec": spec.to_dict()} for i, spec in enumerate(specs)]
            tuner = tune.Tuner(
                tune.with_resources(trainable, resources),
                param_space={"candidate": tune.grid_search(list(range(len(specs)))),
                             "spec": tune.sample_from(lambda config: candidates[config["candidate"]]["spec"])},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=False),
                run_config=tune.RunConfig(name=f"{study_name}-round{round_index}",
                                          storage_path=ray_options.storage_path, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)))
            # ResultGrid iterates through __getitem__/__len__, which mypy does not count as iterable
            by_candidate = {result.config["candidate"]: result for result in tuner.fit()}  # type: ignore[attr-defined]
            return [_outcome(by_candidate[i]) for i in range(len(specs))]

        yield run_round
    finally:
        if started:
            ray.shutdown()
