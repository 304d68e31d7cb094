"""Verification and identification protocols the field publishes, on L2-normalised embeddings (numpy).

- `verification_accuracy`: insightface's LFW/CFP-FP/AgeDB protocol (arcface_torch
  eval/verification.py): squared-L2 distance, thresholds arange(0, 4, 0.01), 10 unshuffled folds,
  threshold picked on the other 9, mean ± std accuracy; VAL@FAR on the same folds.
- `pairs_from_labels`: balanced pairs for that protocol on labelled images (as many genuine as impostor).
- `tar_at_far`, `roc_auc`: over all pairs (IJB-style TAR at FAR = 1e-2 … 1e-6).
- `identification_rank1`, `accuracy_by_frequency`: 1:N closed-set rank-1, per long-tail bucket.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from marginsearch.losses.errors import MarginsearchError

__all__ = ["EvaluationError", "THRESHOLDS", "kfold_indices", "verification_accuracy", "tar_at_far", "roc_auc",
           "roc_curve", "pair_counts", "pairs_from_labels", "hard_pair_mask", "accuracy_at_threshold",
           "identification_rank1", "split_by_frequency", "accuracy_by_frequency"]


class EvaluationError(MarginsearchError):
    """Pairs or labels a protocol cannot be measured on: one class of pairs only, too few pairs for the folds, no
    identity with two images."""


THRESHOLDS = np.arange(0, 4, 0.01)  # squared-L2 distance thresholds of the insightface protocol


def kfold_indices(n: int, n_folds: int) -> list[np.ndarray]:
    """Contiguous unshuffled folds; the first n % n_folds folds hold one extra item (sklearn KFold's split)."""
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    ends = np.cumsum(sizes)
    return [np.arange(e - s, e) for s, e in zip(sizes, ends)]


def _rates(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TPR, FPR, accuracy) at each threshold when pairs with distance < threshold are called 'same' (0 for an
    empty class)."""
    same, diff = np.sort(dist[issame]), np.sort(dist[~issame])
    tp = np.searchsorted(same, thresholds, side="left")   # how many same-pair distances lie strictly below
    fp = np.searchsorted(diff, thresholds, side="left")
    tpr = tp / len(same) if len(same) else np.zeros(len(thresholds))
    fpr = fp / len(diff) if len(diff) else np.zeros(len(thresholds))
    return tpr, fpr, (tp + len(diff) - fp) / dist.size


def _check_pairs(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray, n_folds: int) -> None:
    if e1.shape != e2.shape or e1.ndim != 2:
        raise ValueError(f"verification needs two [N, D] embedding arrays of one shape, got {e1.shape} and {e2.shape}")
    if issame.shape != (e1.shape[0],):
        raise ValueError(f"issame must have one entry per pair ({e1.shape[0]}), got shape {issame.shape}")
    if not 2 <= n_folds <= e1.shape[0]:
        raise ValueError(f"n_folds must lie in [2, number of pairs = {e1.shape[0]}], got {n_folds}")
    genuine, impostor = int(issame.sum()), int((~issame).sum())
    if min(genuine, impostor) < n_folds:
        raise EvaluationError(f"{n_folds}-fold verification needs at least {n_folds} genuine and {n_folds} impostor "
                              f"pairs (as many of each as folds), got {genuine} and {impostor}")


def verification_accuracy(embeddings1: np.ndarray, embeddings2: np.ndarray, issame: Iterable[bool],
                          n_folds: int = 10, far_target: float = 1e-3) -> dict[str, object]:
    """insightface 10-fold verification: accuracy and accuracy_std (fractions), VAL@FAR, best thresholds
    (squared L2).

    Raises EvaluationError when either kind of pair has fewer than n_folds members.
    """
    e1, e2 = np.asarray(embeddings1, dtype=np.float64), np.asarray(embeddings2, dtype=np.float64)
    same = np.asarray(list(issame) if not isinstance(issame, np.ndarray) else issame).astype(bool)
    _check_pairs(e1, e2, same, n_folds)
    dist = np.sum((e1 - e2) ** 2, axis=1)
    n_t = len(THRESHOLDS)
    folds = kfold_indices(len(same), n_folds)
    tprs, fprs = np.zeros((n_folds, n_t)), np.zeros((n_folds, n_t))
    accuracy, best, val, far = (np.zeros(n_folds) for _ in range(4))
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(same)), test)
        _, far_train, train_acc = _rates(THRESHOLDS, dist[train], same[train])
        i_best = int(np.argmax(train_acc))
        tprs[k], fprs[k], test_acc = _rates(THRESHOLDS, dist[test], same[test])
        best[k] = THRESHOLDS[i_best]
        accuracy[k] = test_acc[i_best]
        if far_train.max() >= far_target:
            far_u, first = np.unique(far_train, return_index=True)  # the threshold where each FAR first appears
            threshold = float(np.interp(far_target, far_u, THRESHOLDS[first]))
        else:
            threshold = 0.0
        val_k, far_k, _ = _rates(np.array([threshold]), dist[test], same[test])
        val[k], far[k] = val_k[0], far_k[0]
    return {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
            "fold_accuracies": accuracy, "best_thresholds": best,
            "val": float(val.mean()), "val_std": float(val.std()), "far": float(far.mean()),
            "tpr": tprs.mean(0), "fpr": fprs.mean(0)}


def _check_scores(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(issame).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and issame differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not y.any() or y.all():
        raise EvaluationError("need both positive and negative pairs to measure TAR@FAR / AUC")
    return s, y


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Iterable[float]) -> dict[float, float]:
    """TAR at each FAR over all pairs (similarity scores); NaN where the negatives are too few (n_neg·FAR < 1)."""
    s, y = _check_scores(scores, issame)
    neg = np.sort(s[~y])[::-1]
    pos = s[y]
    out: dict[float, float] = {}
    for f in fars:
        k = int(np.floor(f * len(neg)))
        if k < 1:
            out[f] = float("nan")
            continue
        threshold = neg[k] if k < len(neg) else -np.inf  # the (k+1)-th largest: at most k negatives above it
        out[f] = float(np.mean(pos > threshold))
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # where each run of equal values starts (and the end)
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    lo, hi = bounds[:-1], bounds[1:]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(0.5 * (lo + 1 + hi), hi - lo)
    return ranks


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Area under the ROC curve by the Mann–Whitney U statistic (ties count one half)."""
    s, y = _check_scores(scores, issame)
    ranks = _average_ranks(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) for 'same' = score ≥ threshold, thresholds descending."""
    s, y = _check_scores(scores, issame)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, s[last]]


def pair_counts(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor): how many distinct same-identity and different-identity pairs the labels give."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1].astype(np.int64)
    n = int(counts.sum())
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


def pairs_from_labels(labels: np.ndarray, pairs: int, *,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced verification pairs: n = min(pairs, genuine available, impostor available) distinct same-identity
    pairs and n distinct different-identity pairs, shuffled (seeded); returns (index1, index2, issame).

    Balanced so that accuracy measures the model rather than the class ratio: with more impostor than genuine
    pairs, answering 'different' always would score above 0.5.
    """
    labels = np.asarray(labels)
    if pairs < 1:
        raise ValueError(f"pairs must be ≥ 1, got {pairs}")
    genuine, impostor = pair_counts(labels)
    if genuine == 0:
        raise EvaluationError("no identity has two images: cannot form a positive pair")
    if impostor == 0:
        raise EvaluationError("one identity only: cannot form a negative pair")
    want = min(pairs, genuine, impostor)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    pos = np.array([(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1:]], dtype=np.int64).reshape(-1, 2)
    pos = pos[rng.choice(len(pos), size=want, replace=False)]
    neg = _impostor_pairs(labels, want, impostor, rng)
    both = np.concatenate([pos, neg])
    same = np.r_[np.ones(want, bool), np.zeros(want, bool)]
    order = rng.permutation(len(both))
    return both[order, 0], both[order, 1], same[order]


def _impostor_pairs(labels: np.ndarray, want: int, available: int, rng: np.random.Generator) -> np.ndarray:
    """`want` distinct different-identity pairs (i < j) [want, 2]: drawn from all of them when they are few (under
    2·want, so never more than ~3× the genuine pairs already listed), else by rejection sampling."""
    n = len(labels)
    if available < 2 * want:
        iu, ju = np.triu_indices(n, k=1)
        diff = labels[iu] != labels[ju]
        every = np.stack([iu[diff], ju[diff]], axis=1).astype(np.int64)
        return every[np.sort(rng.choice(len(every), size=want, replace=False))]
    seen: set[tuple[int, int]] = set()
    while len(seen) < want:
        a, b = rng.integers(0, n, size=(2, 2 * (want - len(seen)) + 16))
        for i, j in zip(a.tolist(), b.tolist()):
            if labels[i] != labels[j]:
                seen.add((min(i, j), max(i, j)))
                if len(seen) == want:
                    break
    return np.array(sorted(seen), dtype=np.int64).reshape(-1, 2)


def hard_pair_mask(scores: np.ndarray, issame: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """The hardest `fraction` of positives (lowest scores) and of negatives (highest), at least one each."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(issame).astype(bool)
    mask = np.zeros(len(s), bool)
    for keep, sign in ((y, 1.0), (~y, -1.0)):
        idx = np.flatnonzero(keep)
        if len(idx):
            k = max(1, int(round(fraction * len(idx))))
            mask[idx[np.argsort(sign * s[idx], kind="mergesort")[:k]]] = True
    return mask


def accuracy_at_threshold(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided right when score > threshold means 'same'."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(issame).astype(bool)
    return float(np.mean((s > threshold) == y)) if len(s) else float("nan")


def identification_rank1(gallery_emb: np.ndarray, gallery_labels: np.ndarray, probe_emb: np.ndarray,
                         probe_labels: np.ndarray, chunk: int = 4096) -> float:
    """1:N closed-set identification: fraction of probes whose most similar gallery item shares their label."""
    gallery_labels, probe_labels = np.asarray(gallery_labels), np.asarray(probe_labels)
    hits = 0
    for s in range(0, len(probe_emb), chunk):
        nearest = np.argmax(probe_emb[s:s + chunk] @ gallery_emb.T, axis=1)
        hits += int(np.sum(gallery_labels[nearest] == probe_labels[s:s + chunk]))
    return hits / max(1, len(probe_emb))


def split_by_frequency(counts: Mapping[int, int] | np.ndarray) -> dict[str, np.ndarray]:
    """Identities in thirds by training image count: head (most images), middle, tail."""
    if isinstance(counts, Mapping):
        ids, n = np.array(list(counts.keys())), np.array(list(counts.values()))
    else:
        ids, n = np.arange(len(counts)), np.asarray(counts)
    order = ids[np.argsort(-n, kind="mergesort")]
    head, middle, tail = np.array_split(order, 3)
    return {"head": head, "middle": middle, "tail": tail}


def accuracy_by_frequency(embeddings: np.ndarray, labels: np.ndarray,
                          train_counts: Mapping[int, int] | np.ndarray) -> dict[str, float]:
    """Leave-one-out rank-1 (nearest other image) per head / middle / tail bucket of training frequency."""
    labels = np.asarray(labels)
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    correct = labels[np.argmax(sims, axis=1)] == labels
    out = {}
    for bucket, ids in split_by_frequency(train_counts).items():
        mask = np.isin(labels, ids)
        out[bucket] = float(correct[mask].mean()) if mask.any() else float("nan")
    return out
