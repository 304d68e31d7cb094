"""marginsearch.searchspace: search spaces over `MarginSpec`, the reward-guided sampler, Optuna / Ray Tune backends.

Imports losses and optuna (ray only inside the Ray backend, on use); never trainers.
"""
from .population import PopulationResult, run_population
from .results import SearchResult, TrialFailed, TrialRow
from .sampler import RewardGuidedSampler
from .search import PRUNERS, SAMPLERS, SearchError, run_search
from .space import Fixed, Parameter, SearchSpace, SpaceError, builtin_spaces, load
from .transforms import TRANSFORMS

__all__ = ["PopulationResult", "run_population", "SearchResult", "TrialFailed", "TrialRow", "RewardGuidedSampler",
           "PRUNERS", "SAMPLERS", "SearchError", "run_search", "Fixed", "Parameter", "SearchSpace", "SpaceError",
           "builtin_spaces", "load", "TRANSFORMS"]
