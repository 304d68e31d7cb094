"""Data sources named by one string: `synthetic:<preset>`, `imagefolder:<dir>`, `recordio:<file.rec>`,
`bin:<file.bin>`, `pairs:<pairs.txt>@<root>`.

Training sources (synthetic, imagefolder, recordio) give a `TrainData` whose validation
identities are disjoint from the training ones; evaluation sources give either labelled images
(judged with all-pairs TAR@FAR, 10-fold accuracy on sampled pairs, rank-1) or a pair list
(`bin`, `pairs`: the insightface 10-fold protocol on the listed pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from marginsearch.losses.errors import MarginsearchError

from .judge import LabelledImages
from .train import TrainData

__all__ = ["SourceError", "PairSet", "parse_source", "check_source", "training_data", "evaluation_data", "SOURCE_KINDS"]

SOURCE_KINDS = ("synthetic", "imagefolder", "recordio", "bin", "pairs")


class SourceError(MarginsearchError):
    """A data source string that cannot be used (unknown kind, missing file, wrong use)."""


@dataclass
class PairSet:
    """A verification pair list: images [2N, 3, H, W] uint8 where pair i is (2i, 2i+1), and issame [N]."""

    images: Tensor
    issame: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.issame.all() or not self.issame.any():  # accuracy, AUC and TAR@FAR need both kinds of pair
            kind = "genuine (same-person)" if self.issame.all() else "impostor"
            raise SourceError(f"{self.name}: all {len(self.issame)} pairs are {kind}; verification needs both kinds")


def parse_source(source: str) -> tuple[str, str]:
    """'kind:rest' → (kind, rest); a bare preset name means synthetic."""
    kind, sep, rest = source.partition(":")
    if not sep:
        kind, rest = "synthetic", source
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown data source kind {kind!r} in {source!r}; use one of "
                          + ", ".join(f"{k}:..." for k in SOURCE_KINDS))
    if not rest:
        raise SourceError(f"data source {source!r} names no preset or path")
    return kind, rest


def check_source(source: str) -> tuple[str, str]:
    """`parse_source`, then refuse a file or folder the source names that does not exist, before anything loads."""
    kind, rest = parse_source(source)
    _check_paths(kind, rest, source)
    return kind, rest


def _check_paths(kind: str, rest: str, source: str) -> None:
    if kind == "pairs":
        pairs, _, root = rest.partition("@")
        if not root:
            raise SourceError(f"pairs source needs an image root: pairs:<pairs.txt>@<image root>, got {source!r}")
        from .data import check_pairs_paths
        check_pairs_paths(pairs, root)
    elif kind != "synthetic" and not Path(rest).exists():
        raise SourceError(f"{kind}: {rest} does not exist")


def _hwc_to_nchw(images: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(np.ascontiguousarray(images))
    return t.permute(0, 3, 1, 2).contiguous()


def _labelled(kind: str, rest: str) -> tuple[Tensor, Tensor]:
    """All images (uint8 NCHW) and labels of a folder or RecordIO source."""
    from .data import ImageFolderDataset, RecordDataset, to_labelled_tensor

    dataset = ImageFolderDataset(rest) if kind == "imagefolder" else RecordDataset(rest)
    images, labels = to_labelled_tensor(dataset)
    return images, labels


def _split_identities(images: Tensor, labels: Tensor, val_fraction: float, name: str) -> TrainData:
    """Hold out the last `val_fraction` of identities (at least 2) for the reward; relabel both parts densely."""
    ids = torch.unique(labels)
    n_val = max(2, int(round(len(ids) * val_fraction)))
    if len(ids) - n_val < 2:
        raise SourceError(f"{name}: {len(ids)} identities are too few to hold {n_val} out for validation")
    val_ids = ids[-n_val:]
    is_val = torch.isin(labels, val_ids)
    train_labels = torch.unique(labels[~is_val], return_inverse=True)[1]
    val_labels = torch.unique(labels[is_val], return_inverse=True)[1]
    val = LabelledImages(images[is_val], val_labels, None, "val")
    return TrainData(images[~is_val], train_labels, int(train_labels.max()) + 1, val, name)


def training_data(source: str, cache_dir: str | Path | None = None, val_fraction: float = 0.1) -> TrainData:
    """A `TrainData` from a training source string."""
    kind, rest = parse_source(source)
    if kind == "synthetic":
        from .data.synthetic import load_synthetic
        return TrainData.from_benchmark(load_synthetic(rest, cache_dir=cache_dir), rest)
    if kind in ("bin", "pairs"):
        raise SourceError(f"{source}: a verification pair list cannot be trained on; use it with evaluate")
    _check_paths(kind, rest, source)
    images, labels = _labelled(kind, rest)
    return _split_identities(images, labels, val_fraction, Path(rest).name)


def evaluation_data(source: str, split: str = "test", cache_dir: str | Path | None = None) -> LabelledImages | PairSet:
    """Labelled images (synthetic split, folder, RecordIO) or a pair list (bin, pairs) to judge a model on."""
    kind, rest = check_source(source)
    if kind == "synthetic":
        from .data.synthetic import load_synthetic
        bench = load_synthetic(rest, cache_dir=cache_dir)
        if split not in ("val", "test"):
            raise SourceError(f"split must be 'val' or 'test', got {split!r}")
        s = getattr(bench, split)
        return LabelledImages(s.images, s.labels, s.hard, f"{rest}/{split}")
    if kind == "bin":
        from .data import load_bin
        images, issame = load_bin(rest)
        return PairSet(_hwc_to_nchw(images), np.asarray(issame, dtype=bool), Path(rest).stem)
    if kind == "pairs":
        from .data import load_pairs
        pairs, _, root = rest.partition("@")
        images, issame = load_pairs(pairs, root)
        return PairSet(_hwc_to_nchw(images), np.asarray(issame, dtype=bool), Path(pairs).stem)
    images, labels = _labelled(kind, rest)
    return LabelledImages(images, labels, None, Path(rest).name)

