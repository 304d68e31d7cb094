"""marginsearch.searchspace: search spaces over `MarginSpec`, the reward-guided sampler, Optuna / Ray Tune backends.

Imports losses and optuna (ray only inside the Ray backend, on use); never trainers. The names
below load their module on first use, so `import marginsearch.searchspace.environment` (which
every entry point runs first) stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import DEFAULT_POPULATION, RayOptions, StudyOptions
    from .population import PopulationResult, run_population
    from .results import SearchResult, TrialFailed, TrialRow
    from .sampler import RewardGuidedSampler
    from .search import PRUNERS, SAMPLERS, SearchError, run_search
    from .space import Fixed, Parameter, SearchSpace, SpaceError, builtin_spaces, load
    from .transforms import TRANSFORMS

_EXPORTS: dict[str, str] = {
    "PopulationResult": "population", "run_population": "population",
    "SearchResult": "results", "TrialFailed": "results", "TrialRow": "results",
    "RewardGuidedSampler": "sampler",
    "DEFAULT_POPULATION": "options", "RayOptions": "options", "StudyOptions": "options",
    "PRUNERS": "search", "SAMPLERS": "search", "SearchError": "search", "run_search": "search",
    "Fixed": "space", "Parameter": "space", "SearchSpace": "space", "SpaceError": "space",
    "builtin_spaces": "space", "load": "space",
    "TRANSFORMS": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
