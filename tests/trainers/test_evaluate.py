"""The evaluator equals a plain reimplementation of the insightface protocol and brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from marginsearch.trainers import evaluate as ev


def random_pairs(n: int, seed: int, dim: int = 32):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim))
    same = rng.random(n) < 0.5
    b = np.where(same[:, None], a + rng.normal(scale=0.9, size=(n, dim)), rng.normal(size=(n, dim)))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a, b, same


def insightface_reference(e1, e2, issame, n_folds=10, far_target=1e-3):
    """Written plainly from the protocol: folds as ranges, loops over thresholds."""
    dist = [float(np.sum((x - y) ** 2)) for x, y in zip(e1, e2)]
    n = len(dist)
    thresholds = [i * 0.01 for i in range(400)]
    folds, start = [], 0
    for k in range(n_folds):
        size = n // n_folds + (1 if k < n % n_folds else 0)
        folds.append(list(range(start, start + size)))
        start += size

    def acc(t, idx):
        return sum((dist[i] < t) == bool(issame[i]) for i in idx) / len(idx)

    def far_val(t, idx):
        same = [i for i in idx if issame[i]]
        diff = [i for i in idx if not issame[i]]
        return (sum(dist[i] < t for i in same) / len(same), sum(dist[i] < t for i in diff) / len(diff))

    accs, bests, vals = [], [], []
    for test in folds:
        train = [i for i in range(n) if i not in set(test)]
        scores = [acc(t, train) for t in thresholds]
        best = thresholds[scores.index(max(scores))]
        bests.append(best)
        accs.append(acc(best, test))
        fars = [far_val(t, train)[1] for t in thresholds]
        if max(fars) >= far_target:
            # FAR is non-decreasing in the threshold: interpolate between its distinct values
            points = {}
            for t, f in zip(thresholds, fars):
                points.setdefault(f, t)
            xs = sorted(points)
            ys = [points[x] for x in xs]
            t = float(np.interp(far_target, xs, ys))
        else:
            t = 0.0
        vals.append(far_val(t, test)[0])
    return np.mean(accs), np.std(accs), np.array(bests), np.mean(vals)


@pytest.mark.parametrize("n, seed", [(600, 0), (605, 1), (97, 2)])
def test_verification_equals_the_plain_insightface_protocol(n, seed):
    a, b, same = random_pairs(n, seed)
    got = ev.verification_accuracy(a, b, same)
    acc, std, bests, val = insightface_reference(a, b, same)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(std, abs=1e-12)
    np.testing.assert_allclose(got["best_thresholds"], bests, atol=1e-12)
    assert got["val"] == pytest.approx(val, abs=1e-12)
    assert 0.5 < got["accuracy"] < 1.0  # the pairs are informative but not trivial


def test_kfold_sizes_match_sklearn_convention():
    assert [len(f) for f in ev.kfold_indices(23, 10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(ev.kfold_indices(23, 10)), np.arange(23))


def test_verification_input_errors():
    a, b, same = random_pairs(20, 0)
    with pytest.raises(ValueError, match="one entry per pair"):
        ev.verification_accuracy(a, b, same[:-1])
    with pytest.raises(ValueError, match="one shape"):
        ev.verification_accuracy(a, b[:, :5], same)
    with pytest.raises(ValueError, match="n_folds"):
        ev.verification_accuracy(a, b, same, n_folds=40)


def brute_tar(scores, same, far):
    neg = scores[~same]
    best = None
    for t in sorted(set(scores.tolist()) | {-np.inf}):
        if np.sum(neg > t) <= far * len(neg):  # FAR within target
            best = t
            break
    return float(np.mean(scores[same] > best))


def test_tar_at_far_matches_brute_force_and_nan_rule():
    rng = np.random.default_rng(3)
    same = rng.random(3000) < 0.3
    scores = np.round(rng.normal(loc=same * 1.5), 2)  # ties included
    got = ev.tar_at_far(scores, same, (1e-1, 1e-2, 1e-3, 1e-4))
    for far in (1e-1, 1e-2, 1e-3):
        assert got[far] == pytest.approx(brute_tar(scores, same, far))
    assert math.isnan(got[1e-4])  # ~2100 negatives cannot resolve 1e-4
    with pytest.raises(ValueError, match="both positive and negative"):
        ev.tar_at_far(scores[same], same[same], (1e-2,))


def test_roc_auc_equals_pairwise_count():
    rng = np.random.default_rng(4)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(loc=same * 1.0), 1)
    pos, neg = scores[same], scores[~same]
    expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert ev.roc_auc(scores, same) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = ev.roc_curve(scores, same)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)


def test_pairs_from_labels_is_deterministic_distinct_and_correct():
    labels = np.repeat(np.arange(30), 4)
    i1, i2, same = ev.pairs_from_labels(labels, 100, seed=5)
    j1, j2, _ = ev.pairs_from_labels(labels, 100, seed=5)
    assert np.array_equal(i1, j1) and np.array_equal(i2, j2)
    assert same.sum() == 100 and (~same).sum() == 100
    assert np.all(i1 != i2) and np.array_equal(labels[i1] == labels[i2], same)
    assert len({(min(a, b), max(a, b)) for a, b in zip(i1, i2)}) == 200
    small = np.array([0, 0, 1])
    a, b, s = ev.pairs_from_labels(small, 10, seed=0)
    assert s.sum() == 1 and (~s).sum() == 1  # the one genuine pair, and one of the two impostor pairs
    with pytest.raises(ValueError, match="two images"):
        ev.pairs_from_labels(np.arange(5), 3)
    with pytest.raises(ValueError, match="one identity only"):
        ev.pairs_from_labels(np.zeros(4, dtype=int), 3)


def test_hard_pairs_rank1_and_frequency_buckets():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7])
    same = np.array([True, True, True, False, False, False])
    mask = ev.hard_pair_mask(scores, same, 0.34)
    assert mask.tolist() == [False, True, False, True, False, False]
    assert ev.accuracy_at_threshold(scores, same, 0.6) == pytest.approx(2 / 6)  # right: pairs 0 and 4
    g = np.eye(3)
    probes = np.array([[0.9, 0.1, 0], [0, 0.2, 0.9], [0.1, 0.9, 0]])
    assert ev.identification_rank1(g, np.array([0, 1, 2]), probes, np.array([0, 2, 0])) == pytest.approx(2 / 3)
    emb = np.repeat(np.eye(6), 2, axis=0)
    labels = np.repeat(np.arange(6), 2)
    emb[11] = emb[0]              # one image of identity 5 sits on identity 0
    counts = np.array([50, 40, 10, 8, 2, 1])
    buckets = ev.split_by_frequency(counts)
    assert buckets["head"].tolist() == [0, 1] and buckets["tail"].tolist() == [4, 5]
    acc = ev.accuracy_by_frequency(emb, labels, counts)
    assert acc["middle"] == 1.0 and acc["tail"] == 0.5  # images 10 and 11 of identity 5 find no match


def test_judge_long_tail_buckets_equal_a_hand_computed_leave_one_out():
    import torch
    from torch import nn

    from marginsearch.trainers.judge import LabelledImages, judge_long_tail

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (30, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(15).repeat_interleave(2)
    counts = np.arange(15, 0, -1)  # identity 0 most frequent
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16))
    torch.manual_seed(0)
    out = judge_long_tail(model, LabelledImages(images, labels), counts)
    # reference: flip-sum normalised embeddings, nearest other image, thirds by count
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        e = model(x) + model(x.flip(-1))
        e = torch.nn.functional.normalize(e, dim=1).double().numpy()
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    correct = labels.numpy()[sims.argmax(1)] == labels.numpy()
    for name, ids in (("head", range(0, 5)), ("middle", range(5, 10)), ("tail", range(10, 15))):
        mask = np.isin(labels.numpy(), list(ids))
        assert out[f"{name}_rank1"] == pytest.approx(correct[mask].mean())


@pytest.mark.parametrize("n, block_floats", [(1, 8), (2, 8), (57, 8), (57, 1000), (57, 1 << 22)])
def test_pair_scores_are_every_pair_in_triu_order(n, block_floats):
    from marginsearch.trainers.judge import _pair_scores

    emb = np.random.default_rng(n).normal(size=(n, 6))
    iu, ju = np.triu_indices(n, k=1)
    np.testing.assert_allclose(_pair_scores(emb, block_floats), np.einsum("ij,ij->i", emb[iu], emb[ju]), atol=1e-12)


def test_average_ranks_share_ties():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(ev._average_ranks(x), [5.0, 1.5, 5.0, 3.0, 5.0, 1.5])
