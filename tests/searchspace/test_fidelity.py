"""rank_agreement against hand-computed rank correlations."""
from __future__ import annotations

import math

import pytest

from marginsearch.searchspace.fidelity import rank_agreement


def test_identical_and_reversed_rankings():
    assert rank_agreement([0.1, 0.5, 0.3], [1.0, 3.0, 2.0]) == {"spearman": 1.0, "kendall": 1.0, "n": 3}
    reversed_ = rank_agreement([1, 2, 3, 4], [4, 3, 2, 1])
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["kendall"] == pytest.approx(-1.0)


def test_one_swap_matches_the_textbook_formulas():
    # ranks (1,2,3,4) vs (1,2,4,3): ρ = 1 − 6·Σd²/(n(n²−1)) = 1 − 12/60 = 0.8; τ = (5 − 1)/6
    out = rank_agreement([0.1, 0.2, 0.3, 0.4], [10, 20, 40, 30])
    assert out["spearman"] == pytest.approx(0.8) and out["kendall"] == pytest.approx(4 / 6) and out["n"] == 4


def test_non_finite_pairs_are_dropped_and_lengths_must_match():
    assert rank_agreement([0.1, math.nan, 0.3, 0.2], [1, 2, 3, 2.5])["n"] == 3
    assert math.isnan(rank_agreement([0.1], [1.0])["spearman"])
    with pytest.raises(ValueError, match="3 proxy rewards but 2 full"):
        rank_agreement([1, 2, 3], [1, 2])
