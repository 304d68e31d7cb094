"""Image folders (one sub-folder per identity), the Pillow decoding every reader shares, and stacking into tensors."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, features
from torch import Tensor
from torch.utils.data import Dataset

from ..images import to_rgb
from .errors import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "decode_image", "to_labelled_tensor", "stack_rgb"]

# what Pillow reads here; .webp only where Pillow was built with it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".pnm", ".tif", ".tiff", ".gif",
                  *((".webp",) if features.check("webp") else ()))
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes (any format and mode Pillow reads) → 8-bit RGB Pillow image (`images.to_rgb`); `where`
    (file, key) names the source in the DataError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise DataError(f"{where}: image does not decode ({_one_line(exc)})") from exc


def read_image_file(path: Path) -> Image.Image:
    """An image file → RGB Pillow image (DataError naming the file when it cannot be read or decoded)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from exc
    return decode_image(data, str(path))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HWC uint8 → HWC uint8 of (height, width) `size`, bilinear."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _as_hwc_uint8(image: Any, where: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{where}: expected an HWC uint8 RGB image, got {array.dtype} of shape {array.shape} "
                        "(build the dataset without a transform)")
    return array


def _target_size(first: np.ndarray, size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return int(first.shape[0]), int(first.shape[1])
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def stack_rgb(images: Iterable[np.ndarray], count: int, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """`count` HWC uint8 images → one [count, H, W, 3] uint8 array, resized to `size` or else to the first's size."""
    out: np.ndarray | None = None
    for i, image in enumerate(images):
        if out is None:
            height, width = _target_size(image, size)
            out = np.empty((count, height, width, 3), dtype=np.uint8)
        out[i] = _resize(image, out.shape[1:3])
    if out is None:
        raise DataError("no images to stack")
    return out


class ImageFolderDataset(Dataset):
    """`root/<identity>/<image>` with identities sorted by name → labels 0..K−1; items (HWC uint8 RGB array, label).

    With a `transform`, items are (transform(RGB Pillow image), label), as torchvision's ImageFolder.
    Images are .jpg/.jpeg/.png/.bmp (any case) directly inside each identity folder; hidden entries are ignored.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{self.root}: no identity sub-folders (expected root/<identity>/<image>)")
        self.classes = [p.name for p in folders]
        samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{folder}: identity folder holds no {'/'.join(IMAGE_SUFFIXES)} image")
            samples.extend((path, label) for path in files)
        # paths as one bytes array and labels as one int array, not a list of Path objects: a forked loader worker
        # that reads them copies no refcounted objects
        self._paths = np.array([os.fsencode(path) for path, _ in samples], dtype=np.bytes_)
        self._labels = np.array([label for _, label in samples], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """Number of identities (sub-folders)."""
        return len(self.classes)

    def check_headers(self) -> None:
        """Open every image's header (no pixels are decoded, ~50 µs a file): a file Pillow cannot identify raises
        DataError naming it before training starts."""
        for path in map(self._path, range(len(self))):
            try:
                with Image.open(path):
                    pass
            except _DECODE_ERRORS as exc:
                raise DataError(f"{path}: image does not decode ({_one_line(exc)})") from exc

    @property
    def labels(self) -> np.ndarray:
        """Every image's identity label (int64), in item order."""
        return self._labels

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(image file, label) of every item, as torchvision's ImageFolder."""
        return [(self._path(i), int(self._labels[i])) for i in range(len(self))]

    def _path(self, index: int) -> Path:
        return Path(os.fsdecode(self._paths[index]))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self._path(index), int(self._labels[index])
        image = read_image_file(path)
        return (self.transform(image) if self.transform is not None else np.asarray(image)), label


def to_labelled_tensor(dataset: Dataset, size: int | tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """All items of an (image, label) dataset → (uint8 [N, 3, H, W], int64 [N]).

    Items must be HWC uint8 RGB arrays (a dataset without transform). Images whose size differs are
    resized (bilinear) to `size` (int or (height, width)) when given, else to the first image's size.
    """
    n = len(dataset)
    if n == 0:
        raise DataError(f"{type(dataset).__name__}: the dataset is empty")
    first, _ = dataset[0]
    height, width = _target_size(_as_hwc_uint8(first, f"{type(dataset).__name__} item 0"), size)
    images = np.empty((n, 3, height, width), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        image, label = dataset[i]
        hwc = _resize(_as_hwc_uint8(image, f"{type(dataset).__name__} item {i}"), (height, width))
        images[i] = hwc.transpose(2, 0, 1)
        labels[i] = int(label)
    return torch.from_numpy(images), torch.from_numpy(labels)
