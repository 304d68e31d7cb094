"""How images are prepared for a backbone: uint8 RGB [B, 3, H, W] → float in [−1, 1] (insightface's
Normalize(0.5, 0.5)).

One function, used by training, judging and export alike, so a model is always fed the way it was trained.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_float_images"]


def to_float_images(batch: Tensor, size: int | None = None) -> Tensor:
    """uint8 [B, 3, H, W] → float in [−1, 1] (insightface's Normalize(0.5, 0.5)), resized if asked."""
    x = batch.float().div_(127.5).sub_(1.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x
