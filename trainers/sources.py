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
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from marginsearch.losses.errors import MarginsearchError

from .judge import LabelledImages
from .train import TrainData

__all__ = ["SourceError", "PairSet", "Split", "ImageView", "parse_source", "check_source", "check_pair_list",
           "training_data", "evaluation_data", "SOURCE_KINDS"]

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
        _check_both_kinds(self.issame, self.name)


def _check_both_kinds(issame: np.ndarray, name: str) -> None:
    """Accuracy, AUC and TAR@FAR need genuine and impostor pairs: refuse a list of one kind."""
    if issame.all() or not issame.any():
        kind = "genuine (same-person)" if issame.all() else "impostor"
        raise SourceError(f"{name}: all {len(issame)} pairs are {kind}; verification needs both kinds")


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


def check_pair_list(source: str) -> None:
    """A bin: or pairs: source read and checked without decoding an image (a list of one kind of pair is refused),
    so a campaign refuses it before any store opens."""
    from .data import read_bin, read_pairs

    kind, rest = check_source(source)
    if kind == "bin":
        _check_both_kinds(read_bin(rest)[1], Path(rest).stem)
    elif kind == "pairs":
        pairs, _, root = rest.partition("@")
        _check_both_kinds(read_pairs(pairs, root)[1], Path(pairs).stem)


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


class ImageView(Dataset):
    """Some items of an image dataset with new labels: item i is (base[indices[i]] image, labels[i]), decoded on
    demand."""

    def __init__(self, base: Dataset, indices: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        self.base, self.classes = base, classes
        self.indices, self.labels_array = np.asarray(indices), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[int(self.indices[i])][0], int(self.labels_array[i])

    def take(self, rows: np.ndarray) -> ImageView:
        """The items at `rows` of this view, labels unchanged."""
        return ImageView(self.base, self.indices[rows], self.labels_array[rows], self.classes)


@dataclass(frozen=True)
class Split:
    """Which identities of a folder or RecordIO source are used, and which of them give the reward (validation).

    Identities are named by folder name (ImageFolder) or label number (RecordIO); a string instead
    of a list is a file with one name per line. Validation: `val` (a separate source), else
    `val_identities`, else the last `val_fraction` of the identities in name order (at least 2).
    """

    identities: tuple[str, ...] | str = ()
    val_fraction: float = 0.1
    val_identities: tuple[str, ...] | str = ()
    val: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise SourceError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")

    def names(self, field: str) -> tuple[str, ...]:
        """The identity names of `identities` or `val_identities`, read from the file when one is named."""
        value = getattr(self, field)
        if not isinstance(value, str):
            return tuple(str(v) for v in value)
        path = Path(value).expanduser()
        if not path.is_file():
            raise SourceError(f"data.{field}: identity list file {path} does not exist")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"data.{field}: cannot read {path} as text ({type(exc).__name__})") from None
        return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))

    def check(self) -> None:
        """Refuse a missing identity file or validation source before anything loads."""
        for field in ("identities", "val_identities"):
            self.names(field)  # reads the file a string names, refusing a missing one
        if self.val:
            kind, _ = check_source(self.val)
            if kind not in ("imagefolder", "recordio"):
                raise SourceError(f"data.val: {self.val} must be an imagefolder: or recordio: source")


def _image_dataset(kind: str, rest: str) -> Any:
    """The reader of a folder or RecordIO source (items: HWC uint8 RGB array, label; `labels`, `classes`)."""
    from .data import ImageFolderDataset, RecordDataset

    if kind == "recordio":
        return RecordDataset(rest)  # every record's label is read (and checked) when the split is made
    folder = ImageFolderDataset(rest)
    folder.check_headers()
    return folder


def _indices_of(names: tuple[str, ...], classes: list[str], what: str, source: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise SourceError(f"{what}: {len(unknown)} identit{'y' if len(unknown) == 1 else 'ies'} not in {source}: "
                          + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return np.array(sorted({index[n] for n in names}), dtype=np.int64)


def _view(dataset: Any, labels: np.ndarray, keep_ids: np.ndarray) -> ImageView:
    """The images of identities `keep_ids`, relabelled 0..K−1 in that order."""
    rows = np.flatnonzero(np.isin(labels, keep_ids))
    dense = np.searchsorted(keep_ids, labels[rows])
    return ImageView(dataset, rows, dense, [dataset.classes[i] for i in keep_ids])


def _identities(source: str, split: Split | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(reader, every image's label, the identity ids kept) of a folder or RecordIO source: those `split` names, else
    all."""
    kind, rest = check_source(source)
    dataset = _image_dataset(kind, rest)
    labels = np.asarray(dataset.labels)
    present = np.unique(labels)
    chosen = split.names("identities") if split is not None else ()
    ids = _indices_of(chosen, dataset.classes, "data.identities", source) if chosen else present
    missing = np.setdiff1d(ids, present)
    if len(missing):
        raise SourceError(f"data.identities: identity {dataset.classes[missing[0]]} has no image in {source}")
    return dataset, labels, ids


def training_data(source: str, cache_dir: str | Path | None = None, split: Split | None = None) -> TrainData:
    """A `TrainData` from a training source string: the synthetic benchmark in memory, folders and RecordIO
    streamed."""
    kind, rest = parse_source(source)
    split = split or Split()
    if kind == "synthetic":
        if split != Split():
            raise SourceError("data.identities, val_fraction, val_identities and val apply to imagefolder: and "
                              "recordio: sources; the synthetic benchmark has its own validation split")
        from .data.synthetic import load_synthetic
        return TrainData.from_benchmark(load_synthetic(rest, cache_dir=cache_dir), rest)
    if kind in ("bin", "pairs"):
        raise SourceError(f"{source}: a verification pair list cannot be trained on; use it with evaluate")
    split.check()
    dataset, labels, ids = _identities(source, split)
    name = Path(rest).name
    if split.val:
        return _train_data(_view(dataset, labels, ids), _view(*_identities(split.val)), name)
    if split.names("val_identities"):
        val_ids = _indices_of(split.names("val_identities"), dataset.classes, "data.val_identities", source)
        outside = np.setdiff1d(val_ids, ids)
        if len(outside):
            raise SourceError(f"data.val_identities: {dataset.classes[outside[0]]} is not among data.identities")
    else:
        val_ids = ids[-max(2, int(round(len(ids) * split.val_fraction))):]
    train_ids = np.setdiff1d(ids, val_ids)
    if len(train_ids) < 2:
        raise SourceError(f"{name}: {len(ids)} identities are too few to hold {len(val_ids)} out for validation "
                          "and train on the rest")
    return _train_data(_view(dataset, labels, train_ids), _view(dataset, labels, val_ids), name)


def _train_data(train_view: ImageView, val_view: ImageView, name: str) -> TrainData:
    val = LabelledImages(val_view, torch.from_numpy(val_view.labels_array), None, "val")
    labels = torch.from_numpy(train_view.labels_array)
    return TrainData(train_view, labels, len(train_view.classes), val, name)


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
    view = _view(*_identities(source))
    return LabelledImages(view, torch.from_numpy(view.labels_array), None, Path(rest).name)

