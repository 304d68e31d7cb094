"""The picture of every paper in this field: the target logit f(θ) against θ for a set of specs."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .head import target_logit_curve
from .named import identify
from .spec import MarginSpec

__all__ = ["plot_target_logits"]


def plot_target_logits(specs: Mapping[str, MarginSpec] | Sequence[MarginSpec], path: str | os.PathLike | None = None,
                       ax: Any = None, points: int = 361) -> Any:
    """Plot f(θ) (target logit / s, cosine units) against θ in degrees, as in ArcFace (arXiv 1801.07698) Fig. 4.

    `specs` maps labels to specs (a sequence is labelled by `identify` or its position). Writes a
    PNG to `path` if given; returns the matplotlib Axes. matplotlib is imported here, lazily.
    """
    import matplotlib
    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(specs, Mapping):
        specs = {identify(s) or f"spec {i}": s for i, s in enumerate(specs)}
    theta = torch.linspace(0.0, math.pi, points, dtype=torch.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, spec in specs.items():
        ax.plot(torch.rad2deg(theta).numpy(), target_logit_curve(spec, theta).numpy(), label=label, lw=1.4)
    ax.set_xlabel("θ between feature and target centre (degrees)")
    ax.set_ylabel("target logit / s (cosine units)")
    ax.set_xlim(0, 180)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax
