"""Search objectives that train: `TrainingObjective` (spec, report) → reward, `PopulationObjective` (spec, start
state) → (reward, end state).

Both are small picklable callables (they hold a data source string and a budget), so Ray can ship
them to workers; each process loads the data once and keeps it (`_DATA`).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from marginsearch.losses import MarginSoftmax, MarginSpec, WithAuxiliary, build_auxiliary
from marginsearch.searchspace.results import TrialFailed

from .budget import Budget
from .sources import Split, training_data
from .train import Auxiliary, TrainData, train

__all__ = ["TrainingObjective", "PopulationObjective", "data_for"]

_DATA: dict[tuple[str, str | None, Split | None], TrainData] = {}


def data_for(source: str, cache_dir: str | Path | None = None, split: Split | None = None) -> TrainData:
    """The training data of a source string (with its identity `split`), loaded once per process."""
    key = (source, None if cache_dir is None else str(cache_dir), split)
    if key not in _DATA:
        _DATA[key] = training_data(source, cache_dir=cache_dir, split=split)
    return _DATA[key]


def _final_reward(status: str, reason: str, reward: float, metric: str) -> float:
    if status == "diverged":
        raise TrialFailed(f"diverged: {reason}")
    if not math.isfinite(reward):
        raise TrialFailed(f"reward {metric} is {reward} (too few validation pairs for this metric?)")
    return reward


class TrainingObjective:
    """objective(spec, report) for `searchspace.run_search`: train under `budget`, report each epoch's reward,
    return the last."""

    def __init__(self, data_source: str, budget: Budget, auxiliary: Auxiliary | None = None,
                 cache_dir: str | Path | None = None, device: str | None = None, split: Split | None = None) -> None:
        self.data_source, self.budget, self.auxiliary = data_source, budget, auxiliary
        self.cache_dir, self.device, self.split = cache_dir, device, split

    def __call__(self, spec: MarginSpec, report: Callable[[int, float], None]) -> float:
        """Train `spec`; `report(epoch, reward)` may raise to prune; TrialFailed if it diverges or its reward is not
        finite."""
        data = data_for(self.data_source, self.cache_dir, self.split)
        result = train(spec, data, self.budget, auxiliary=self.auxiliary, device=self.device,
                       on_epoch=lambda r: report(r.epoch, r.reward))
        return _final_reward(result.status, result.reason, result.reward, self.budget.reward_metric)


class PopulationObjective:
    """objective(spec, start_state) → (reward, end_state) for `searchspace.run_population` (AM-LFS / Search-Softmax
    rounds).

    A state is the trainer's checkpoint dict (backbone, head, optimizer, schedule, RNG, history).
    Each call trains `epochs_per_round` more epochs of `budget` (set budget.epochs to rounds ×
    epochs_per_round so the learning-rate schedule spans the whole search) from `start_state`
    (from scratch when None) with the head of `spec`: head entries that exist in both heads
    (the class centres `weight`, running statistics of the same kind) carry over, the others start
    fresh. The optimizer state (momentum) of the start model carries over too; the papers copy
    only the weights.
    """

    def __init__(self, data_source: str, budget: Budget, epochs_per_round: int = 1, auxiliary: Auxiliary | None = None,
                 cache_dir: str | Path | None = None, device: str | None = None, split: Split | None = None) -> None:
        if epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be ≥ 1, got {epochs_per_round}")
        self.data_source, self.budget, self.epochs_per_round = data_source, budget, epochs_per_round
        self.auxiliary, self.cache_dir, self.device, self.split = auxiliary, cache_dir, device, split

    def _fresh_head_state(self, spec: MarginSpec, data: TrainData) -> dict[str, torch.Tensor]:
        classes = data.subset(self.budget.identities).num_classes
        head: torch.nn.Module = MarginSoftmax(spec, self.budget.embedding_size, classes)
        if self.auxiliary:
            terms = {name: (float(w), build_auxiliary(name, classes, self.budget.embedding_size, **dict(params)))
                     for name, (w, params) in self.auxiliary.items()}
            head = WithAuxiliary(head, terms)
        return head.state_dict()

    def _carried(self, start: Mapping[str, Any], spec: MarginSpec, data: TrainData) -> dict[str, Any]:
        fresh = self._fresh_head_state(spec, data)
        old = start["head"]
        head = {k: old[k] if k in old and old[k].shape == v.shape else v for k, v in fresh.items()}
        return {**start, "spec": spec.to_dict(), "head": head}

    def __call__(self, spec: MarginSpec, start_state: Mapping[str, Any] | None) -> tuple[float, dict[str, Any]]:
        """Train one round of `spec` from `start_state`; (reward, end state). TrialFailed if it diverges."""
        data = data_for(self.data_source, self.cache_dir, self.split)
        done = len(start_state["history"]) if start_state is not None else 0
        if done + self.epochs_per_round > self.budget.epochs:
            raise ValueError(f"population: the start state has trained {done} of {self.budget.epochs} epochs; "
                             f"no room for {self.epochs_per_round} more (raise budget.epochs)")
        stop_at = done + self.epochs_per_round
        with tempfile.TemporaryDirectory(prefix="population-") as tmp:
            path = Path(tmp) / "state.pt"
            if start_state is not None:
                torch.save(self._carried(start_state, spec, data), path)
            result = train(spec, data, self.budget, auxiliary=self.auxiliary, device=self.device, checkpoint=path,
                           on_epoch=lambda r: r.epoch >= stop_at)
            reward = _final_reward(result.status, result.reason, result.reward, self.budget.reward_metric)
            end_state = torch.load(path, weights_only=True)
        return reward, end_state
