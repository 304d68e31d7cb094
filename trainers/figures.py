"""Pictures of a search: reward history, parameter importance, the reward-guided policy's mean over rounds; and
each trial's target-logit curve.

Each search picture is a matplotlib Figure (no pyplot state, imported lazily) or None when there is
nothing to draw; `trainers.tracking` logs them as PNG artifacts of the campaign's parent run.
`target_logit_png` draws the small picture every trial run holds, fast enough to pay per trial
(see `TargetLogitPainter`).
"""
from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from marginsearch.losses import MarginSpec, named

__all__ = ["search_history", "parameter_importance", "policy_trajectory", "target_logit_png", "TargetLogitPainter",
           "CURVE_REFERENCES"]

CURVE_REFERENCES = ("arcface", "cosface")  # named losses drawn under each trial's target-logit curve
CURVE_POINTS = 181                          # θ from 0 to 180 degrees, one point a degree
Y_STEP = 0.25                               # y-limits widen outwards to multiples of this (cosine units)
LEGEND_LOC = "upper right"                  # every curve falls with θ: the corner they leave free
PNG_COLOURS = 256                           # the PNG is palette-coded (fast octree): half the bytes, half the time


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A Figure with one Axes, outside pyplot's global state (nothing to close, safe in worker processes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def search_history(rows: Sequence[Any], title: str = "search history") -> Any:
    """Reward of each finished trial (baselines marked, pruned trials at their last reward) and the best so far,
    against trial number."""
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in rows if r.reward is not None and math.isfinite(r.reward)]
    pruned = [(r.number, r.intermediate[max(r.intermediate)]) for r in rows
              if r.state == "PRUNED" and r.intermediate and math.isfinite(r.intermediate[max(r.intermediate)])]
    if not scored and not pruned:
        return None
    fig, ax = _figure(6.4, 3.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are integers
    if pruned:
        ax.scatter([n for n, _ in pruned], [v for _, v in pruned], s=18, marker="x", color="grey",
                   label="pruned (last reward)")
    sampled = [r for r in scored if not r.baseline]
    named = [r for r in scored if r.baseline]
    ax.scatter([r.number for r in sampled], [r.reward for r in sampled], s=18, label="sampled trial")
    ax.scatter([r.number for r in named], [r.reward for r in named], s=36, marker="D", label="named baseline")
    for r in named:
        ax.annotate(r.baseline, (r.number, r.reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    best, xs, ys = -math.inf, [], []
    for r in sorted(scored, key=lambda r: r.number):
        best = max(best, r.reward)
        xs.append(r.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", linewidth=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


IMPORTANCE_MIN_TRIALS = 16  # fewer complete trials give importances that are mostly noise: no chart


def parameter_importance(study: Any) -> Any:
    """Optuna's parameter importances (its default evaluator) as a bar chart, with the trial count; None under 16
    complete trials."""
    import optuna

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if complete < IMPORTANCE_MIN_TRIALS:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few complete trials or a single value
        return None
    if not importances:
        return None
    names = list(importances)[::-1]
    fig, ax = _figure(6.4, 0.4 * len(names) + 1.2)
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance")
    ax.set_title(f"parameter importance (Optuna's default evaluator, {complete} complete trials)", fontsize=9)
    fig.tight_layout()
    return fig


def policy_trajectory(snapshots: Sequence[Mapping[str, Any]]) -> Any:
    """The reward-guided policy's mean μ of each numeric parameter (normalised to [0, 1] of its range) per round."""
    if len(snapshots) < 2 or not snapshots[-1].get("mu_unit"):
        return None
    fig, ax = _figure(6.4, 3.8)
    names = sorted(snapshots[-1]["mu_unit"])
    for name in names:
        points = [(i, s["mu_unit"][name]) for i, s in enumerate(snapshots) if name in s.get("mu_unit", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                label=f"{name} (→ {snapshots[-1]['mu'][name]:.3g})")
    ax.set_xlabel("policy round")
    ax.set_ylabel("μ (0 = low end of range, 1 = high end)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("reward-guided policy mean")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- a trial's target-logit curve
@lru_cache(maxsize=1)
def _theta() -> tuple[Any, Any]:
    """θ in radians (float64 tensor) and in degrees (ndarray), `CURVE_POINTS` points over [0, π]."""
    import torch

    theta = torch.linspace(0.0, math.pi, CURVE_POINTS, dtype=torch.float64)
    return theta, torch.rad2deg(theta).numpy()


def _curve(spec: MarginSpec) -> Any:
    """f(θ) (target logit / s, cosine units) of `spec` at the `_theta` points, as an ndarray."""
    from marginsearch.losses.head import target_logit_curve

    return target_logit_curve(spec, _theta()[0]).numpy()


@lru_cache(maxsize=16)
def _reference_curve(name: str) -> Any:
    """The curve of a named loss (computed once per process)."""
    return _curve(named(name))


def y_limits(curves: Sequence[Any], step: float = Y_STEP) -> tuple[float, float]:
    """The y-range of the curves with matplotlib's 5 % margins, widened outwards to multiples of `step`."""
    import numpy as np

    values = np.concatenate([np.asarray(c, dtype=float).ravel() for c in curves]) if curves else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return -1.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo)
    bottom, top = math.floor((lo - pad) / step) * step, math.ceil((hi + pad) / step) * step
    return bottom, max(top, bottom + step)


@dataclass
class _Background:
    """A figure with the axes, grid, labels and reference curves drawn, its pixels, and its legends' pixels by
    label."""

    figure: Any
    canvas: Any
    axes: Any
    pixels: Any
    references: list[Any]
    legends: dict[str, Any] = field(default_factory=dict)


class TargetLogitPainter:
    """PNGs of target-logit curves over fixed reference curves, drawn with Agg blitting.

    What does not change between trials (axes, ticks, labels, grid, the reference curves, the
    layout) is drawn once per y-range and kept (the last `keep` ranges), and the legend (upper
    right) once per label on it; each picture restores those pixels, draws the trial's curve and
    puts the legend back on top (opaque: a curve under it is hidden, where matplotlib's 0.8 alpha
    frame would show it faintly). The y-range is the curves' range widened outwards to multiples
    of `Y_STEP`, so nearby specs share a background. Thread-safe (one lock); no pyplot state.
    """

    def __init__(self, references: Sequence[str] = CURVE_REFERENCES, size: tuple[float, float] = (5.0, 3.5),
                 dpi: int = 110, keep: int = 8) -> None:
        self.references, self.size, self.dpi, self.keep = tuple(references), size, dpi, keep
        self._backgrounds: OrderedDict[tuple[Any, ...], _Background] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, spec: MarginSpec, label: str) -> bytes:
        """The PNG of `spec`'s curve (labelled `label`) over the references it does not equal."""
        from PIL import Image

        curve = _curve(spec)
        references = [name for name in self.references if named(name) != spec]
        limits = y_limits([curve, *(_reference_curve(name) for name in references)])
        with self._lock:
            background = self._background(limits, tuple(references))
            legend = self._legend(background, label)
            canvas = background.canvas
            canvas.restore_region(background.pixels)
            (line,) = background.axes.plot(_theta()[1], curve, lw=1.4, color="C0", label=label)
            background.axes.draw_artist(line)
            canvas.restore_region(legend)
            line.remove()
            image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
            image = image.convert("RGB")
        out = io.BytesIO()
        image.quantize(PNG_COLOURS, method=Image.Quantize.FASTOCTREE).save(out, format="png", compress_level=1)
        return out.getvalue()

    def _legend(self, background: _Background, label: str) -> Any:
        """The pixels of the legend (the trial's `label` first, then the references) over the bare background."""
        if label not in background.legends:
            from matplotlib.lines import Line2D

            background.canvas.restore_region(background.pixels)
            handle = Line2D([], [], lw=1.4, color="C0", label=label)
            legend = background.axes.legend(handles=[handle, *background.references], loc=LEGEND_LOC, fontsize=7,
                                            ncol=2)
            background.axes.draw_artist(legend)
            if len(background.legends) >= 16:  # a campaign has few labels: "trial" and its named baselines
                background.legends.clear()
            background.legends[label] = background.canvas.copy_from_bbox(legend.get_window_extent().padded(2))
            legend.remove()
        return background.legends[label]

    def _background(self, limits: tuple[float, float], references: tuple[str, ...]) -> _Background:
        """The kept background of these y-limits and references (drawn now if missing; the oldest is dropped)."""
        key = (limits, references)
        if key in self._backgrounds:
            self._backgrounds.move_to_end(key)
            return self._backgrounds[key]
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=self.size, dpi=self.dpi)
        canvas = FigureCanvasAgg(figure)
        axes = figure.subplots()
        lines = [axes.plot(_theta()[1], _reference_curve(name), lw=1.4, color=f"C{i + 1}", label=name)[0]
                 for i, name in enumerate(references)]
        axes.set_xlabel("θ between feature and target centre (degrees)")
        axes.set_ylabel("target logit / s (cosine units)")
        axes.set_xlim(0, 180)
        axes.set_ylim(*limits)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        canvas.draw()
        self._backgrounds[key] = _Background(figure, canvas, axes, canvas.copy_from_bbox(figure.bbox), lines)
        while len(self._backgrounds) > self.keep:
            self._backgrounds.popitem(last=False)
        return self._backgrounds[key]


_PAINTER = TargetLogitPainter()


def target_logit_png(spec: MarginSpec, label: str) -> bytes:
    """A small PNG of the spec's target-logit curve over ArcFace and CosFace (the process's `TargetLogitPainter`)."""
    return _PAINTER.png(spec, label)
