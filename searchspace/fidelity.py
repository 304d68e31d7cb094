"""Proxy fidelity: does the cheap proxy budget rank candidates as the full budget does?"""
from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

__all__ = ["rank_agreement"]


def rank_agreement(proxy_rewards: Sequence[float], full_rewards: Sequence[float]) -> dict[str, float]:
    """Spearman ρ and Kendall τ between proxy and full rewards of the same candidates (pairs with a
    non-finite value dropped)."""
    if len(proxy_rewards) != len(full_rewards):
        raise ValueError(f"rank_agreement: {len(proxy_rewards)} proxy rewards but {len(full_rewards)} full rewards")
    pairs = [(float(p), float(f)) for p, f in zip(proxy_rewards, full_rewards) if math.isfinite(p) and math.isfinite(f)]
    if len(pairs) < 2:
        return {"spearman": math.nan, "kendall": math.nan, "n": len(pairs)}
    proxy, full = zip(*pairs)
    return {"spearman": float(stats.spearmanr(proxy, full).statistic),
            "kendall": float(stats.kendalltau(proxy, full).statistic), "n": len(pairs)}
