"""Partial FC class sampling (An et al., Partial FC, ICCVW 2021, arXiv 2010.05222; insightface recipe).

Each training step keeps every class present in the batch (positives) and fills up to
ceil(rate·C) classes with others drawn uniformly without replacement; labels are remapped into
the sorted sample. Draws come from torch's generator (`generator`, else the default one).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_sample_rate", "sample_classes"]


def check_sample_rate(rate: float) -> float:
    """The rate as a float, or a ValueError naming it when it is not in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
        raise ValueError(f"sample_rate must be a number in (0, 1], got {rate!r}")
    return float(rate)


def sample_classes(labels: Tensor, num_classes: int, rate: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(sorted class index [k], labels remapped into it [B]), k = max(ceil(rate·C), #positives, 2) ≤ C.

    One `torch.rand(C)` draw per call: positives get score 2, the k highest scores are kept.
    """
    rate = check_sample_rate(rate)
    positives = torch.unique(labels)
    k = min(num_classes, max(math.ceil(rate * num_classes), positives.numel(), 2))
    score = torch.rand(num_classes, generator=generator, device=labels.device)
    score[positives] = 2.0
    index = score.topk(k, sorted=False).indices.sort().values
    return index, torch.searchsorted(index, labels)
