"""Reward-guided sampler: the REINFORCE policy of AM-LFS (arXiv 1905.07375) and Search-Softmax (arXiv 2007.06542)
as an Optuna sampler.

Policy. Each numeric parameter has a Gaussian N(μ, σ_k) in a normalised coordinate u ∈ [0, 1] of its
range (of log(range) for log parameters); a draw z is clipped to [0, 1], mapped to native units
(rounded for ints). Each categorical has softmax(logits). μ starts at the space's default for the
parameter (centre of the range without a space), logits at 0 (uniform). σ_k = max(sigma_min,
sigma·sigma_decay^k) in round k (constant 0.2 by default, as in both papers).

Rounds. Trial number n belongs to round n // population. Round k is sampled from the policy after
rounds 0..k−1, each updated once, in order, with the trials of that round finished at the time of
the call: rewards R (the objective value, negated for minimisation) are normalised within the round
as r = 2(R − mean)/(max − min + 1e-6) (Search-Softmax code; `normalise="std"` gives AM-LFS's
(R − mean)/(std + 1e-8)); a FAILED trial (or a non-finite value) gets the round's worst reward;
a PRUNED trial counts with its last intermediate value only if `use_pruned`, else not at all.
The gradient is of −mean_i r_i·log N(z_i; μ, σ) at the sample z_i actually drawn (before clipping;
no −|x|) and of −mean_i r_i·log softmax(logits)[c_i]; Adam (lr 0.05, betas (0.5, 0.999)) steps μ
(then clipped to [0, 1]) and the logits.

Baselines. Parameters the sampler did not draw (enqueued trials, retried trials' fixed params)
have no draw record: they count in their round's normalisation but give no gradient.

State. The draws are stored in trial system attrs (``reward_guided:draw:<name>``, and the round in
``reward_guided:round``); the policy is replayed from `study.get_trials` at each trial's first
parameter (cached only by the trials it saw) and kept for that trial's other parameters, so a study
resumes from storage, several workers can share it, and one trial's parameters come from one policy. Draws
are seeded by (seed, trial number, parameter name), so the same study gives the same samples.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from .options import DEFAULT_POPULATION

__all__ = ["RewardGuidedSampler", "NORMALISERS", "DRAW_ATTR", "ROUND_ATTR"]

DRAW_ATTR = "reward_guided:draw:"
ROUND_ATTR = "reward_guided:round"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_Numeric = FloatDistribution | IntDistribution  # the distribution of every non-categorical parameter

NORMALISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "range": lambda R: 2.0 * (R - R.mean()) / (R.max() - R.min() + 1e-6),  # Search-Softmax official code
    "std": lambda R: (R - R.mean()) / (R.std() + 1e-8),                    # AM-LFS reproduction
}


def _bounds(dist: FloatDistribution | IntDistribution) -> tuple[float, float]:
    if dist.log:
        return math.log(dist.low), math.log(dist.high)
    return float(dist.low), float(dist.high)


def to_unit(value: float, dist: FloatDistribution | IntDistribution) -> float:
    """Native value → normalised coordinate in [0, 1] (log range for log distributions)."""
    lo, hi = _bounds(dist)
    if hi == lo:
        return 0.5
    x = math.log(value) if dist.log else float(value)
    return min(1.0, max(0.0, (x - lo) / (hi - lo)))


def from_unit(u: float, dist: FloatDistribution | IntDistribution) -> float | int:
    """Normalised coordinate (clipped to [0, 1]) → native value, on the step grid, rounded for ints."""
    lo, hi = _bounds(dist)
    x = lo + min(1.0, max(0.0, u)) * (hi - lo)
    value = math.exp(x) if dist.log else x
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    value = min(dist.high, max(dist.low, value))
    return int(round(value)) if isinstance(dist, IntDistribution) else float(value)


@dataclass
class _Adam:
    """Adam state of one parameter (scalar μ or a logits vector)."""

    m: np.ndarray
    v: np.ndarray
    t: int = 0

    def step(self, grad: np.ndarray, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> np.ndarray:
        self.t += 1
        self.m = betas[0] * self.m + (1 - betas[0]) * grad
        self.v = betas[1] * self.v + (1 - betas[1]) * grad * grad
        m_hat = self.m / (1 - betas[0] ** self.t)
        v_hat = self.v / (1 - betas[1] ** self.t)
        return lr * m_hat / (np.sqrt(v_hat) + eps)


@dataclass
class _Policy:
    """μ (unit coordinate) per numeric parameter, logits per categorical, their Adam states."""

    mu: dict[str, float] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    adam: dict[str, _Adam] = field(default_factory=dict)
    dists: dict[str, BaseDistribution] = field(default_factory=dict)
    rounds: int = 0

    def probs(self, name: str) -> np.ndarray:
        e = np.exp(self.logits[name] - self.logits[name].max())
        return e / e.sum()


def _single_objective(study: optuna.Study) -> None:
    if len(study.directions) > 1:
        raise ValueError("RewardGuidedSampler is single-objective: its REINFORCE reward is one value per trial")


class RewardGuidedSampler(BaseSampler):
    """REINFORCE over a Gaussian / softmax policy per parameter, in rounds of `population` trials (see module doc)."""

    def __init__(self, *, space: Any = None, population: int = DEFAULT_POPULATION, sigma: float = 0.2,
                 sigma_decay: float = 1.0, sigma_min: float = 0.0, lr: float = 0.05,
                 betas: tuple[float, float] = (0.5, 0.999),
                 normalise: str = "range", use_pruned: bool = False, seed: int | None = None) -> None:
        if population < 1:
            raise ValueError(f"population must be ≥ 1, got {population}")
        if sigma <= 0 or not 0 < sigma_decay <= 1 or sigma_min < 0:
            raise ValueError(f"need sigma > 0, 0 < sigma_decay ≤ 1, sigma_min ≥ 0; "
                             f"got {sigma}, {sigma_decay}, {sigma_min}")
        if normalise not in NORMALISERS:
            raise ValueError(f"unknown normalise {normalise!r}; choose one of {', '.join(NORMALISERS)}")
        self._space = space
        self.population, self.sigma, self.sigma_decay, self.sigma_min = population, sigma, sigma_decay, sigma_min
        self.lr, self.normalise, self.use_pruned = lr, normalise, use_pruned
        self.betas = cast("tuple[float, float]", tuple(betas))
        # SeedSequence(None).entropy is a fresh int (numpy annotates the entropy a caller may pass)
        self._seed = int(cast(int, np.random.SeedSequence(seed).entropy) % (2**32)) if seed is None else int(seed)
        self._cache: tuple[Any, _Policy] | None = None
        self._trial_cache: tuple[Any, _Policy] | None = None

    # ------------------------------------------------------------------ optuna interface
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        _single_objective(study)
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study._storage.set_trial_system_attr(trial._trial_id, ROUND_ATTR, trial.number // self.population)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        _single_objective(study)
        k = trial.number // self.population
        policy = self._trial_policy(study, trial, k)
        self._ensure(policy, param_name, param_distribution)
        rng = np.random.default_rng([self._seed, trial.number, zlib.crc32(param_name.encode())])
        if isinstance(param_distribution, CategoricalDistribution):
            index = int(rng.choice(len(param_distribution.choices), p=policy.probs(param_name)))
            study._storage.set_trial_system_attr(trial._trial_id, DRAW_ATTR + param_name, index)
            return param_distribution.choices[index]
        z = float(rng.normal(policy.mu[param_name], self.sigma_at(k)))
        study._storage.set_trial_system_attr(trial._trial_id, DRAW_ATTR + param_name, z)
        return from_unit(z, cast(_Numeric, param_distribution))

    def reseed_rng(self) -> None:
        """Nothing to reseed: draws are seeded by trial number, so parallel copies never repeat each other."""

    # ------------------------------------------------------------------ policy
    def sigma_at(self, round_index: int) -> float:
        """σ of round `round_index` (normalised units)."""
        return max(self.sigma_min, self.sigma * self.sigma_decay ** round_index)

    def policy(self, study: optuna.Study) -> dict[str, Any]:
        """The policy after every round with finished trials: μ in native units, σ, categorical probabilities,
        rounds."""
        return self._describe(self._policy_before(study, self._rounds_seen(study)))

    def trajectory(self, study: optuna.Study) -> list[dict[str, Any]]:
        """`policy`-style snapshots before round 0 and after each round (for plotting μ against rounds)."""
        trials = self._finished(study)
        policy, snapshots = _Policy(), []
        rounds = self._group(trials, self._rounds_seen(study))
        for name, dist in self._first_dists(trials).items():
            self._ensure(policy, name, dist)
        snapshots.append(self._describe(policy))
        for k in range(self._rounds_seen(study)):
            self._update(policy, rounds.get(k, []), k, study.direction)
            snapshots.append(self._describe(policy))
        return snapshots

    def _describe(self, policy: _Policy) -> dict[str, Any]:
        mu = {n: from_unit(u, cast(_Numeric, policy.dists[n])) for n, u in policy.mu.items()}
        probs = {n: dict(zip(cast(CategoricalDistribution, policy.dists[n]).choices, map(float, policy.probs(n))))
                 for n in policy.logits}
        return {"rounds": policy.rounds, "sigma": self.sigma_at(policy.rounds), "mu": mu,
                "mu_unit": dict(policy.mu), "probs": probs}

    def _rounds_seen(self, study: optuna.Study) -> int:
        trials = self._finished(study)
        return 1 + max(t.number for t in trials) // self.population if trials else 0

    def _finished(self, study: optuna.Study) -> list[FrozenTrial]:
        return sorted(study.get_trials(deepcopy=False, states=_FINISHED), key=lambda t: t.number)

    def _group(self, trials: Sequence[FrozenTrial], before: int) -> dict[int, list[FrozenTrial]]:
        rounds: dict[int, list[FrozenTrial]] = {}
        for t in trials:
            if t.number // self.population < before:
                rounds.setdefault(t.number // self.population, []).append(t)
        return rounds

    @staticmethod
    def _first_dists(trials: Sequence[FrozenTrial]) -> dict[str, BaseDistribution]:
        dists: dict[str, BaseDistribution] = {}
        for t in trials:
            for name, dist in t.distributions.items():
                dists.setdefault(name, dist)
        return dists

    def _trial_policy(self, study: optuna.Study, trial: FrozenTrial, k: int) -> _Policy:
        """The policy `trial` samples from: replayed at its first parameter, kept for its others (no storage read)."""
        key = (study.study_name, trial._trial_id, trial.number, k)
        cached = self._trial_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        policy = self._policy_before(study, k)
        self._trial_cache = (key, policy)
        return policy

    def _policy_before(self, study: optuna.Study, k: int) -> _Policy:
        """Replay rounds 0..k−1 from the study's finished trials (cached on exactly those trials)."""
        trials = [t for t in self._finished(study) if t.number // self.population < k]
        key = (k, study.direction, tuple((t.number, t.state, tuple(t.values or ()),
                                          tuple(sorted(t.intermediate_values.items()))) for t in trials))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        policy = _Policy()
        rounds = self._group(trials, k)
        for r in range(k):
            self._update(policy, rounds.get(r, []), r, study.direction)
        self._cache = (key, policy)
        return policy

    def _ensure(self, policy: _Policy, name: str, dist: BaseDistribution) -> None:
        """Start a parameter's policy: μ at the space's default (else the range's centre), uniform logits."""
        if name in policy.dists:
            return
        policy.dists[name] = dist
        if isinstance(dist, CategoricalDistribution):
            policy.logits[name] = np.zeros(len(dist.choices))
            policy.adam[name] = _Adam(np.zeros(len(dist.choices)), np.zeros(len(dist.choices)))
            return
        params = getattr(self._space, "parameters", {})
        default = params[name].default if name in params else None
        policy.mu[name] = to_unit(default, cast(_Numeric, dist)) if default is not None else 0.5
        policy.adam[name] = _Adam(np.zeros(()), np.zeros(()))

    def _rewards(self, trials: Sequence[FrozenTrial],
                 direction: optuna.study.StudyDirection) -> list[tuple[FrozenTrial, float]]:
        sign = 1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        scored: list[tuple[FrozenTrial, float | None]] = []
        for t in trials:
            value = None
            if t.state == TrialState.COMPLETE and t.values:
                value = t.values[0]
            elif t.state == TrialState.PRUNED:
                if not (self.use_pruned and t.intermediate_values):
                    continue
                value = t.intermediate_values[max(t.intermediate_values)]
            scored.append((t, sign * value if value is not None and math.isfinite(value) else None))
        finite = [v for _, v in scored if v is not None]
        if not finite:
            return []
        worst = min(finite)
        return [(t, worst if v is None else v) for t, v in scored]

    def _update(self, policy: _Policy, trials: Sequence[FrozenTrial], k: int,
                direction: optuna.study.StudyDirection) -> None:
        """One REINFORCE + Adam step from round k's finished trials."""
        policy.rounds = k + 1
        scored = self._rewards(trials, direction)
        if not scored:
            return
        r = NORMALISERS[self.normalise](np.array([v for _, v in scored], dtype=float))
        sigma = self.sigma_at(k)
        draws: dict[str, list[tuple[float, Any]]] = {}
        for (t, _), r_i in zip(scored, r):
            for name, dist in t.distributions.items():
                if DRAW_ATTR + name in t.system_attrs:
                    self._ensure(policy, name, dist)
                    draws.setdefault(name, []).append((float(r_i), t.system_attrs[DRAW_ATTR + name]))
        for name, pairs in draws.items():
            rs = np.array([p[0] for p in pairs])
            if name in policy.logits:
                onehot = np.eye(len(policy.logits[name]))[[int(p[1]) for p in pairs]]
                grad = -np.mean(rs[:, None] * (onehot - policy.probs(name)), axis=0)
                policy.logits[name] = policy.logits[name] - policy.adam[name].step(grad, self.lr, self.betas)
            else:
                z = np.array([float(p[1]) for p in pairs])
                grad = -np.mean(rs * (z - policy.mu[name]) / sigma**2)
                step = float(policy.adam[name].step(np.asarray(grad), self.lr, self.betas))
                policy.mu[name] = float(np.clip(policy.mu[name] - step, 0.0, 1.0))
