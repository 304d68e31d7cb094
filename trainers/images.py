"""How an image becomes a model input, the same way in training, judging, export and the registered model.

1. Colour: any Pillow mode → 8-bit RGB (`to_rgb`). Grey ("L", "1") is copied into three channels;
   16-bit grey ("I;16*") is scaled by 255/65535; 32-bit "I" and float "F" images are scaled the
   same way when their values exceed 255, else taken as 8-bit; alpha is dropped (as cv2.imread
   does); palette, CMYK, YCbCr, LAB and HSV go through Pillow's conversion.
2. Geometry: the uint8 image is fitted to `Preprocess.height × width`: "resize" stretches it
   (bilinear, antialiased), "crop" scales it until it covers the target and cuts the centre.
   Images already at the target size are left as they are.
3. Values: uint8 → float x / 127.5 − 1 in [−1, 1] (insightface's Normalize(0.5, 0.5)).

A model records its `Preprocess` (`to_dict`) in every file it is saved to, and `Preprocess.batch`
prepares images for a loaded model, e.g. `models:/NAME@champion`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["FITS", "Preprocess", "to_rgb", "to_float_images", "ImageBatcher"]

FITS = ("resize", "crop")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image → 8-bit RGB: grey copied to 3 channels, 16-bit scaled by 255/65535, alpha dropped."""
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT or values.max(initial=0.0) > 255.0:
            values = values * (255.0 / 65535.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")  # a loaded copy, also of an RGB image


def _fit(batch: Tensor, size: tuple[int, int], fit: str) -> Tensor:
    """uint8 [B, 3, h, w] → uint8 [B, 3, H, W]: stretched ("resize") or scaled to cover and centre-cut ("crop")."""
    h, w = batch.shape[-2:]
    if (h, w) == size:
        return batch
    height, width = size
    if fit == "crop":
        scale = max(height / h, width / w)
        scaled = (max(height, round(h * scale)), max(width, round(w * scale)))
    else:
        scaled = size
    x = F.interpolate(batch.float(), size=scaled, mode="bilinear", align_corners=False, antialias=True)
    top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Preprocess:
    """The model input: RGB, fitted to height × width (pixels) by `fit`, scaled to [−1, 1] as x / 127.5 − 1."""

    height: int
    width: int
    fit: str = "resize"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"image_fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if not (1 <= self.height <= 4096 and 1 <= self.width <= 4096):
            raise ValueError(f"image size must be within 1..4096 pixels, got {self.height}×{self.width}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.height, self.width

    @classmethod
    def of(cls, image_size: int | Sequence[int] | None, native: tuple[int, int], fit: str = "resize") -> Preprocess:
        """From a budget's `image_size` (an int for a square, [height, width], or None for the data's own size)."""
        if image_size is None:
            height, width = native
        elif isinstance(image_size, int):
            height = width = image_size
        else:
            height, width = (int(v) for v in image_size)
        return cls(int(height), int(width), fit)

    def to_dict(self) -> dict[str, Any]:
        """What a model file records, so a loader prepares images as training did."""
        return {"height": self.height, "width": self.width, "fit": self.fit, "channels": "RGB",
                "values": "x / 127.5 - 1 (insightface Normalize(0.5, 0.5))", "resample": "bilinear, antialiased"}

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> Preprocess:
        """The inverse of `to_dict`."""
        return cls(int(meta["height"]), int(meta["width"]), str(meta.get("fit", "resize")))

    def fit_uint8(self, batch: Tensor) -> Tensor:
        """uint8 [B, 3, h, w] → uint8 [B, 3, height, width]."""
        return _fit(batch, self.size, self.fit)

    def floats(self, batch: Tensor) -> Tensor:
        """uint8 [B, 3, h, w] → the model input, float [B, 3, height, width] in [−1, 1]."""
        return to_float_images(self.fit_uint8(batch))

    def image(self, image: Image.Image | str | Path | np.ndarray) -> Tensor:
        """One image (Pillow, a file path, or an HWC/HW uint8 array) → uint8 [3, height, width]."""
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = to_rgb(opened)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        chw = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)
        return self.fit_uint8(chw[None])[0]

    def batch(self, images: Iterable[Image.Image | str | Path | np.ndarray]) -> Tensor:
        """Images as a loaded model wants them: float32 [B, 3, height, width] in [−1, 1]."""
        return to_float_images(torch.stack([self.image(i) for i in images]))


def to_float_images(batch: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """uint8 [B, 3, H, W] → float in [−1, 1] (insightface's Normalize(0.5, 0.5)), stretched to `size` if asked."""
    if size is not None:
        batch = _fit(batch, (size, size) if isinstance(size, int) else tuple(size), "resize")  # type: ignore[arg-type]
    return batch.float().div_(127.5).sub_(1.0)


class ImageBatcher:
    """A DataLoader's collate_fn: (HWC uint8 RGB array, label) items → (uint8 [B, 3, H, W] fitted, int64 labels).

    It runs in the loader's worker processes, so decoding and fitting are spread over them.
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, items: Sequence[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
        out = torch.empty((len(items), 3, *self.preprocess.size), dtype=torch.uint8)
        for i, (image, _) in enumerate(items):
            chw = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)  # writable for torch
            out[i] = self.preprocess.fit_uint8(chw[None])[0]
        return out, torch.tensor([int(label) for _, label in items], dtype=torch.int64)
