"""Grouped options of a search: where its study lives (`StudyOptions`) and how Ray runs it (`RayOptions`),
and the search defaults.

`run_search` and `run_population` take these instead of a long list of keywords; each backend
reads only its own group (the Optuna backend never sees `RayOptions`). `DEFAULT_POPULATION` is the
one default of the reward-guided round size, used by the sampler, both search modes and the
campaign config.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

    from marginsearch.losses import MarginSpec

    from .results import Objective, TrialRow
    from .space import SearchSpace

__all__ = ["DEFAULT_POPULATION", "StudyOptions", "RayOptions", "SearchPlan"]

DEFAULT_POPULATION = 8  # candidates per policy round: AM-LFS / Search-Softmax train 8 models per round


@dataclass(frozen=True)
class StudyOptions:
    """The Optuna study: storage (None: in memory; a SQLite path, a SQLAlchemy URL or journal:<path>), name, resume."""

    storage: Any = None          # str | optuna.storages.BaseStorage | None
    name: str = "marginsearch"
    resume: bool = True          # load the study if it exists (top it up to n_trials), else refuse to overwrite it

    @property
    def label(self) -> str | None:
        """The storage as text, for results and logs (None in memory)."""
        return None if self.storage is None else str(self.storage)


@dataclass(frozen=True)
class RayOptions:
    """Ray Tune: the cluster address (None: a local Ray), per-trial resources, concurrency, where Tune writes
    results."""

    address: str | None = None                                   # None, "auto", "host:6379" or "ray://host:10001"
    resources_per_trial: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_concurrent: int | None = None                            # None: as many as the cluster's resources fit
    storage_path: str | None = None                              # Tune's results and checkpoints (None: Ray's default)


@dataclass
class SearchPlan:
    """What every backend runs: the space, the objective, the built sampler, the trial count, pruner, study,
    baselines, callbacks."""

    space: SearchSpace
    objective: Objective
    sampler: BaseSampler
    n_trials: int
    pruner: str
    study: StudyOptions
    baselines: Sequence[str | MarginSpec] | str
    callbacks: Sequence[Callable[[TrialRow], Any]]
