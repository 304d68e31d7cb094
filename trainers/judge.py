"""Judge a model on labelled held-out identities with the protocols the field publishes."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from . import evaluate as ev
from .data.errors import DataError, one_line
from .images import ImageBatcher, Preprocess

__all__ = ["LabelledImages", "embed", "model_preprocess", "judge", "judge_pairs", "judge_long_tail", "FARS", "METRICS",
           "FOLDS", "FOLD_METRICS", "undefined_because"]

FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# what `judge` measures on labelled images: the names a reward metric (and a promotion metric) may take
METRICS = (*(f"tar@far={far:.0e}".replace("e-0", "e-") for far in FARS), "auc", "accuracy", "val@far=1e-3",
           "hard_accuracy", "rank1", "hard_sample_tar@far=1e-3")
FOLDS = 10  # insightface's verification folds
# what the 10-fold protocol on balanced sampled pairs gives: NaN with fewer than FOLDS pairs of a kind
FOLD_METRICS = ("accuracy", "accuracy_std", "val@far=1e-3", "hard_accuracy")


@dataclass
class LabelledImages:
    """Held-out images (uint8 [N, 3, H, W], or a Dataset of HWC uint8 RGB items) with identity labels and optional
    hard-sample flags."""

    images: Tensor | Dataset
    labels: Tensor
    hard: Tensor | None = None
    name: str = "val"


@torch.no_grad()
def embed(model: nn.Module, images: Tensor | Dataset, preprocess: Preprocess | None = None, batch_size: int = 512,
          device: torch.device | str = "cpu", flip: bool = True, workers: int = 0) -> np.ndarray:
    """L2-normalised embeddings [N, D] (float64), each the normalised sum of the image's and its mirror's
    (insightface).

    `images`: uint8 [N, 3, H, W], or a Dataset of (HWC uint8 RGB array, label) read in batches;
    prepared by `preprocess` (default: the model's own, `model_preprocess`).
    """
    preprocess = preprocess or model_preprocess(model, images)
    was_training = model.training
    _set_training(model, False)
    if isinstance(images, Tensor):
        batches: Any = (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
    else:
        batches = _loaded(torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                                      collate_fn=ImageBatcher(preprocess)))
    out = []
    for batch in batches:
        x = preprocess.floats(batch).to(device).contiguous(memory_format=torch.channels_last)
        e = model(x).float()
        if flip:
            e = e + model(x.flip(-1)).float()
        out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    _set_training(model, was_training)
    return torch.cat(out).double().numpy()


def _loaded(loader: torch.utils.data.DataLoader) -> Iterator[Tensor]:
    """The image batches of a loader; a worker's DataError as its one line."""
    try:
        for batch, _ in loader:
            yield batch
    except DataError as exc:
        raise one_line(exc) from None


def model_preprocess(model: nn.Module, images: Tensor | Dataset | None = None) -> Preprocess:
    """How a model wants its images: its `preprocess` (set by training and by the loaders), else its backbone's input
    size stretched, else the images' own size."""
    recorded = getattr(model, "preprocess", None)
    if isinstance(recorded, Preprocess):
        return recorded
    size = getattr(model, "input_size", None) or getattr(getattr(model, "backbone", model), "input_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        return Preprocess(int(height), int(width))
    if isinstance(images, Tensor):
        return Preprocess(int(images.shape[-2]), int(images.shape[-1]))
    if images is not None:
        first = images[0][0]
        return Preprocess(int(first.shape[0]), int(first.shape[1]))
    raise ValueError("the model records no input size and no images were given")


def _set_training(model: nn.Module, mode: bool) -> None:
    """model.train(mode), except for torch.export programs (MLflow pt2 models): exported in eval mode, they refuse
    it."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def undefined_because(metric: str, labels: np.ndarray, pairs: int | None = None,
                      hard: bool = True) -> str | None:
    """Why `judge` cannot give `metric` a value on images with these identity labels, or None if it can.

    TAR@FAR=f needs floor(f·negatives) ≥ 1 impostor pairs (all pairs); every verification metric needs genuine
    and impostor pairs; the 10-fold metrics (accuracy, accuracy_std, val@far=1e-3, hard_accuracy) need at least
    10 pairs of each kind among the balanced sample of min(pairs, genuine, impostor) each (pairs=None: no cap);
    rank-1 needs an identity with two images; hard_sample_tar@far=1e-3 needs hard-sample flags (`hard`: the images
    have them, as the synthetic benchmark's do).
    """
    if metric.startswith("hard_sample_") and not hard:
        return f"{metric} needs hard-sample flags, which only the synthetic benchmark's images carry"
    labels = np.asarray(labels)
    identities = len(np.unique(labels))
    n = len(labels)
    positives, negatives = ev.pair_counts(labels)
    given = f"the {identities} identities ({n} images) give"
    if metric.startswith("tar@far=") or metric.startswith("hard_sample_tar@far="):
        far = float(metric.rpartition("=")[2])
        needed = int(np.ceil(1.0 / far))
        if negatives < needed:
            return f"{metric} needs at least {needed} impostor pairs, {given} {negatives}"
    if positives == 0 or negatives == 0:
        return f"{metric} needs genuine and impostor pairs, {given} {positives} and {negatives}"
    if metric == "rank1" and len(labels) == identities:
        return f"rank1 needs an identity with two images, {given} one image each"
    if metric in FOLD_METRICS:
        per_class = min(positives, negatives, pairs if pairs is not None else positives)
        if per_class < FOLDS:
            cap = f" (pairs = {pairs} caps each kind)" if pairs is not None and pairs < min(positives, negatives) \
                else ""
            return (f"{metric} needs at least {FOLDS} genuine and {FOLDS} impostor pairs for {FOLDS} folds, {given} "
                    f"{positives} and {negatives}, so {per_class} of each are drawn{cap}")
    return None


def judge(model: nn.Module, data: LabelledImages, pairs: int = 3000, seed: int = 0,
          device: torch.device | str = "cpu", workers: int = 0) -> dict[str, float]:
    """Verification (all-pairs TAR@FAR, ROC AUC; 10-fold accuracy on balanced sampled pairs), hard pairs, rank-1.

    The 10-fold protocol runs on min(pairs, genuine available, impostor available) genuine pairs and as many
    impostor pairs (seeded), so accuracy is 0.5 for a model without signal whatever the class ratio of the set.
    Keys: tar@far=1e-2 … 1e-6 (NaN where there are too few negative pairs), auc, accuracy,
    accuracy_std, val@far=1e-3, hard_accuracy (NaN with fewer than 10 pairs of a kind: `undefined_because`
    says why), pairs_per_class (that n), rank1, and hard_sample_tar@far=1e-3 when the data flags hard samples.
    """
    emb = embed(model, data.images, device=device, workers=workers)
    labels = data.labels.cpu().numpy()
    metrics: dict[str, float] = {}

    iu, ju = np.triu_indices(len(labels), k=1)
    scores = _pair_scores(emb)
    same = labels[iu] == labels[ju]
    for far, tar in ev.tar_at_far(scores, same, FARS).items():
        metrics[_far_key(far)] = float(tar)
    metrics["auc"] = float(ev.roc_auc(scores, same))
    if data.hard is not None and bool(data.hard.any()):
        involves_hard = data.hard.cpu().numpy()[iu] | data.hard.cpu().numpy()[ju]
        tar = ev.tar_at_far(scores[involves_hard | ~same], same[involves_hard | ~same], (1e-3,))
        metrics["hard_sample_tar@far=1e-3"] = float(tar[1e-3])

    metrics.update(_balanced_verification(emb, labels, pairs, seed))

    first = np.unique(labels, return_index=True)[1]
    probe = np.setdiff1d(np.arange(len(labels)), first)
    if len(probe):
        metrics["rank1"] = float(ev.identification_rank1(emb[first], labels[first], emb[probe], labels[probe]))
    return metrics


def _balanced_verification(emb: np.ndarray, labels: np.ndarray, pairs: int, seed: int) -> dict[str, float]:
    """accuracy, accuracy_std, val@far=1e-3 and hard_accuracy on balanced sampled pairs (NaN when too few for 10
    folds), and pairs_per_class."""
    i1, i2, issame = ev.pairs_from_labels(labels, pairs, seed=seed)
    per_class = {"pairs_per_class": float(issame.sum())}
    if undefined_because("accuracy", labels, pairs) is not None:
        return {**{metric: math.nan for metric in FOLD_METRICS}, **per_class}
    ver = ev.verification_accuracy(emb[i1], emb[i2], issame, n_folds=FOLDS)
    pair_scores = np.einsum("ij,ij->i", emb[i1], emb[i2])
    threshold = 1.0 - float(np.mean(ver["best_thresholds"])) / 2.0  # squared L2 → cosine
    hard = ev.hard_pair_mask(pair_scores, issame, 0.1)
    return {"accuracy": float(ver["accuracy"]), "accuracy_std": float(ver["accuracy_std"]),
            "val@far=1e-3": float(ver["val"]),
            "hard_accuracy": float(ev.accuracy_at_threshold(pair_scores[hard], issame[hard], threshold)), **per_class}


def judge_pairs(model: nn.Module, images: Tensor, issame: np.ndarray,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """A verification pair list (.bin or pairs.txt; pair i = images 2i, 2i+1): insightface 10-fold accuracy, VAL,
    TAR@FAR, AUC, on the pairs as listed (EvaluationError with fewer than 10 of a kind)."""
    emb = embed(model, images, device=device)
    e1, e2 = emb[0::2], emb[1::2]
    issame = np.asarray(issame, dtype=bool)
    ver = ev.verification_accuracy(e1, e2, issame)
    scores = np.einsum("ij,ij->i", e1, e2)
    metrics = {"accuracy": float(ver["accuracy"]), "accuracy_std": float(ver["accuracy_std"]),
               "val@far=1e-3": float(ver["val"]), "auc": float(ev.roc_auc(scores, issame))}
    for far, tar in ev.tar_at_far(scores, issame, FARS).items():
        metrics[_far_key(far)] = float(tar)
    return metrics


def judge_long_tail(model: nn.Module, probe: LabelledImages, train_counts: Tensor | np.ndarray,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Leave-one-out rank-1 on held-out images of the training identities, per head / middle / tail third of
    training frequency.

    Keys: head_rank1, middle_rank1, tail_rank1 (the long-tail view of Range loss, KappaFace).
    """
    emb = embed(model, probe.images, device=device)
    counts = np.asarray(train_counts.cpu() if isinstance(train_counts, Tensor) else train_counts)
    buckets = ev.accuracy_by_frequency(emb, probe.labels.cpu().numpy(), counts)
    return {f"{bucket}_rank1": value for bucket, value in buckets.items()}


def _far_key(far: float) -> str:
    return f"tar@far={far:.0e}".replace("e-0", "e-")


def _pair_scores(emb: np.ndarray, block_floats: int = 1 << 22) -> np.ndarray:
    """Cosine of every pair i < j, in np.triu_indices order: row blocks of the Gram matrix (~32 MB each), upper
    parts kept."""
    n = len(emb)
    rows = max(1, block_floats // max(n, 1))
    parts = []
    for start in range(0, n, rows):
        gram = emb[start:start + rows] @ emb[start:].T          # row r holds pairs (start + r, start + c)
        parts.append(gram[np.triu(np.ones(gram.shape, dtype=bool), k=1)])
    return np.concatenate(parts) if parts else np.empty(0)
