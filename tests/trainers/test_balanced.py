"""Verification on labelled images draws as many genuine as impostor pairs, so accuracy does not reward the
class ratio; too few pairs for 10 folds are refused (evaluate) or NaN with a reason (judge)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from marginsearch.trainers import evaluate as ev
from marginsearch.trainers.judge import FOLD_METRICS, LabelledImages, judge, undefined_because


def no_signal(identities: int, per_identity: int, seed: int = 0) -> tuple[nn.Module, LabelledImages]:
    """Random images with labels unrelated to them and a random linear model: embeddings carry no identity."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(identities).repeat_interleave(per_identity)
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32)), LabelledImages(images, labels)


def test_scarce_genuine_pairs_give_equal_counts_of_each_kind():
    labels = np.repeat(np.arange(40), 3)  # 120 genuine pairs, 7020 impostor
    assert ev.pair_counts(labels) == (120, 7020)
    i1, i2, same = ev.pairs_from_labels(labels, 3000, seed=1)
    assert same.sum() == 120 and (~same).sum() == 120
    assert np.array_equal(labels[i1] == labels[i2], same) and np.all(i1 != i2)
    assert len({(min(a, b), max(a, b)) for a, b in zip(i1.tolist(), i2.tolist())}) == 240
    _, _, capped = ev.pairs_from_labels(labels, 50, seed=1)
    assert capped.sum() == 50 and (~capped).sum() == 50


def test_scarce_impostor_pairs_give_equal_counts_of_each_kind():
    labels = np.repeat(np.arange(2), 20)  # 380 genuine pairs, 400 impostor: nearly all impostor pairs drawn
    i1, i2, same = ev.pairs_from_labels(labels, 3000, seed=2)
    assert same.sum() == 380 and (~same).sum() == 380
    assert np.array_equal(labels[i1] == labels[i2], same)
    assert len({(min(a, b), max(a, b)) for a, b in zip(i1.tolist(), i2.tolist())}) == 760


def test_judge_balances_and_a_model_without_signal_scores_one_half():
    model, data = no_signal(40, 3)  # 120 genuine pairs: the old draw took 120 genuine and 3000 impostor
    m = judge(model, data, pairs=3000, seed=0)
    assert abs(m["auc"] - 0.5) < 0.05  # no signal indeed
    # unbalanced, calling every pair 'different' scored 3000 / 3120 = 0.96 (the old value here)
    assert abs(m["accuracy"] - 0.5) < 0.1, m["accuracy"]
    assert m["pairs_per_class"] == 120


def test_judge_and_pairs_are_deterministic_for_a_seed():
    labels = np.repeat(np.arange(25), 4)
    first, again = ev.pairs_from_labels(labels, 80, seed=3), ev.pairs_from_labels(labels, 80, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = ev.pairs_from_labels(labels, 80, seed=4)
    assert not np.array_equal(first[0], other[0])
    model, data = no_signal(25, 4, seed=1)
    np.testing.assert_equal(judge(model, data, pairs=80, seed=3), judge(model, data, pairs=80, seed=3))  # NaN = NaN


def test_too_few_pairs_for_ten_folds_is_one_line_error_or_nan_with_reason():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(39, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    same = np.r_[np.ones(9, bool), np.zeros(30, bool)]
    with pytest.raises(ev.EvaluationError, match="needs at least 10 genuine and 10 impostor pairs") as info:
        ev.verification_accuracy(e, e[::-1], same)
    assert "got 9 and 30" in str(info.value) and "\n" not in str(info.value)

    model, data = no_signal(3, 3)  # 9 genuine pairs, 27 impostor
    labels = data.labels.numpy()
    m = judge(model, data, pairs=3000, seed=0)
    assert m["pairs_per_class"] == 9 and all(math.isnan(m[k]) for k in FOLD_METRICS)
    assert not math.isnan(m["auc"])
    for metric in ("accuracy", "val@far=1e-3", "hard_accuracy"):
        why = undefined_because(metric, labels, 3000)
        assert why is not None and why.startswith(f"{metric} needs at least 10 genuine and 10 impostor pairs")
        assert "give 9 and 27" in why
    assert undefined_because("auc", labels, 3000) is None
    big = np.repeat(np.arange(10), 5)
    assert undefined_because("accuracy", big, 3000) is None
    assert "pairs = 5 caps each kind" in str(undefined_because("accuracy", big, 5))
