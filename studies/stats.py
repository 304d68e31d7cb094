"""Paired statistics for the studies: per-unit differences, bootstrap intervals, the exact sign-flip test, Spearman ρ.

numpy only: an exact permutation test needs no distribution tables, and with n ≤ 20 paired units
it enumerates all 2**n sign flips.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Paired", "paired", "spearman", "bootstrap_ci", "sign_flip_p"]


def bootstrap_ci(diffs: Sequence[float], resamples: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (resampling units with replacement)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided exact p of the paired sign-flip permutation test of mean(diffs) = 0 (all 2**n flips)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or d.size > 20:
        return math.nan
    observed = abs(d.mean())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    stats = np.abs((flips * d).mean(axis=1))
    return float(np.mean(stats >= observed - 1e-12))


@dataclass(frozen=True)
class Paired:
    """Arm a − arm b over the units both have: mean difference, its bootstrap interval, sign-flip p, wins."""

    n: int
    mean: float
    ci: tuple[float, float]
    p: float
    wins: int

    def text(self, percent: bool = True) -> str:
        """'+1.2 [−0.3, +2.6], p = 0.19, 4/6 pairs positive'."""
        f = (lambda v: f"{100 * v:+.1f}") if percent else (lambda v: f"{v:+.3f}")
        if self.n == 0:
            return "n/a"
        return f"{f(self.mean)} [{f(self.ci[0])}, {f(self.ci[1])}], p = {self.p:.3g}, {self.wins}/{self.n} positive"


def paired(a: dict[object, float], b: dict[object, float], resamples: int = 10000) -> Paired:
    """Pair `a` and `b` (unit → value) on their common units with finite values both."""
    units = [u for u in a if u in b and math.isfinite(a[u]) and math.isfinite(b[u])]
    diffs = [a[u] - b[u] for u in units]
    if not diffs:
        return Paired(0, math.nan, (math.nan, math.nan), math.nan, 0)
    return Paired(len(diffs), float(np.mean(diffs)), bootstrap_ci(diffs, resamples), sign_flip_p(diffs),
                  sum(d > 0 for d in diffs))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ (average ranks for ties) over the pairs where both are finite; NaN under 3 pairs or no spread."""
    pairs = [(float(u), float(v)) for u, v in zip(x, y) if math.isfinite(u) and math.isfinite(v)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = (_ranks([p[i] for p in pairs]) for i in (0, 1))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values)
    order = v.argsort(kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # ties share their mean rank
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks
