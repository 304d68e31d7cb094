"""A trial's target-logit PNG: drawn over kept backgrounds, the same pixels whatever the painter drew before; its
y-range."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from marginsearch.losses import AngularMargin, MarginSpec, named
from marginsearch.trainers.figures import Y_STEP, TargetLogitPainter, target_logit_png, y_limits


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_the_png_is_the_figure_size_and_shows_the_curve():
    png = target_logit_png(named("cosface"), "cosface")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (550, 385)  # 5 × 3.5 in at 110 dpi
    other = _pixels(target_logit_png(MarginSpec(s=30.0, target=AngularMargin(m2_rad=0.9, m3_cos=0.3)), "trial"))
    assert (_pixels(png) != other).any(axis=2).mean() > 0.01


def test_kept_backgrounds_give_the_pixels_of_a_fresh_drawing():
    low = MarginSpec(s=30.0, target=AngularMargin(m2_rad=1.5, m3_cos=0.5))  # reaches further down: another y-range
    painter = TargetLogitPainter(keep=1)
    first = painter.png(named("sphereface"), "trial")
    kept = set(painter._backgrounds)
    painter.png(low, "low")
    assert set(painter._backgrounds).isdisjoint(kept)  # the first background was dropped
    assert painter.png(named("sphereface"), "trial") == first  # drawn again from scratch
    assert painter.png(named("sphereface"), "trial") == first  # and from the kept background
    assert TargetLogitPainter().png(named("sphereface"), "trial") == first
    assert painter.png(named("sphereface"), "other label") != first


def test_y_limits_widen_to_steps_and_ignore_non_finite_values():
    bottom, top = y_limits([np.array([-1.3, 0.0, 0.9, math.nan, -math.inf])])
    assert (bottom, top) == (-1.5, 1.25)  # −1.3 − 5 % of 2.2 = −1.41 → −1.5; 0.9 + 0.11 = 1.01 → 1.25
    assert bottom % Y_STEP == 0 and top % Y_STEP == 0
    assert y_limits([np.array([math.nan])]) == (-1.0, 1.0)
    flat = y_limits([np.full(5, 0.5)])
    assert flat[0] == 0.5 and flat[1] == pytest.approx(0.75)
