"""A point of the unified margin-softmax space: `MarginSpec` and its components.

Every loss is cross-entropy on scaled, transformed cosine logits (Loss Function Search,
arXiv 2007.06542, Sec. 3). A `MarginSpec` names each transform explicitly, with units in the
field names: ``*_rad`` are radians, ``*_cos`` are cosine units, everything else is unitless.

    target logit      s · f(θ_y)          f chosen by `target` (one of three kinds)
    target margins    m2, m3 of f scaled per class (`class_margin`) and per sample (`sample_margin`)
    negatives         s · g(cos θ_j)      for mis-classified j (`negative`)
    modulating factor target logit shifted by −log(1 − a), a ≤ 0 (`modulation`)

Specs are immutable and hashable, validate on construction (`SpecError`) and round-trip through
plain dicts / JSON with `to_dict` / `from_dict`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import MarginsearchError

__all__ = [
    "SpecError", "AngularMargin", "SphereFacePsi", "PiecewiseLinear", "ProbabilityModulation",
    "RandomModulation", "NegativeTransform", "KappaMargin", "ElasticMargin", "AdaFaceMargin",
    "MagFaceMargin", "MarginSpec", "GUARDS", "NEGATIVE_RULES", "MASKS", "LAMBDA_STEPS",
]


class SpecError(MarginsearchError):
    """A margin spec value is out of range, of the wrong type, or unknown."""


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise SpecError(f"{where}: {message}")


def _finite(value: float, where: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
           where, f"must be a finite number, got {value!r}")


# How the target transform behaves where m1·θ + m2 leaves [0, π] and cos(·) stops decreasing.
GUARDS: dict[str, str] = {
    "fallback": "where m1·θ + m2 > π use cos θ − m2·sin(m2) − m3 (insightface ArcFace)",
    "easy": "apply the angular part only where cos θ > 0, else cos θ − m3 (easy margin)",
    "easy-all": "no margin at all where cos θ ≤ 0: cos θ there, cos(m1·θ + m2) − m3 elsewhere "
                "(MV-Softmax's official AM easy_margin)",
    "clip": "clip m1·θ + m2 to [ε, π − ε], ε = 1e-3 rad (AdaFace)",
    "none": "no guard: cos(m1·θ + m2) − m3 everywhere (non-monotone past π; mxnet combined margin)",
}


@dataclass(frozen=True)
class AngularMargin:
    """Target f(θ) = cos(m1·θ + m2) − m3 (combined margin, insightface; ArcFace arXiv 1801.07698)."""

    kind: ClassVar[str] = "margin"
    m1: float = 1.0          # multiplicative angular margin, unitless (SphereFace-like ≈ 1.35)
    m2_rad: float = 0.0      # additive angular margin, radians (ArcFace m)
    m3_cos: float = 0.0      # additive cosine margin, cosine units (CosFace m)
    guard: str = "fallback"  # one of GUARDS
    straight_through: bool = False  # insightface torch: margin applied without its gradient
    # cosine units: clamp every cosine (target and negatives) to ±(1 − cos_clamp) first (AdaFace 1e-3)
    cos_clamp: float = 0.0

    def validate(self, where: str) -> None:
        _finite(self.m1, f"{where}.m1")
        _finite(self.m2_rad, f"{where}.m2_rad")
        _finite(self.m3_cos, f"{where}.m3_cos")
        _check(0 < self.m1 <= 8, f"{where}.m1", f"must be in (0, 8], got {self.m1}")
        _check(abs(self.m2_rad) < math.pi, f"{where}.m2_rad",
               f"angular margin must be in (−π, π) radians, got {self.m2_rad}")
        _check(-1.0 < self.m3_cos < 2.0, f"{where}.m3_cos",
               f"cosine margin must be in (−1, 2) cosine units, got {self.m3_cos}")
        _check(self.guard in GUARDS, f"{where}.guard",
               f"unknown guard {self.guard!r}; choose one of {sorted(GUARDS)}")
        _check(isinstance(self.straight_through, bool), f"{where}.straight_through", "must be a bool")
        _finite(self.cos_clamp, f"{where}.cos_clamp")
        _check(0.0 <= self.cos_clamp < 1.0, f"{where}.cos_clamp",
               f"must be in [0, 1) cosine units, got {self.cos_clamp}")


LAMBDA_STEPS = ("previous", "current")


@dataclass(frozen=True)
class SphereFacePsi:
    """Target f = (ψ(θ) + λ cos θ)/(1 + λ), ψ = (−1)^k cos(mθ) − 2k (SphereFace, arXiv 1704.08063).

    λ = max(lambda_min, base·(1 + gamma·step)^(−power)); `lambda_step` says which step: "previous"
    (training steps before this one) or "current" (this step counted, as the official Caffe layer,
    which increments its iteration before λ). Features are normalised and scaled by s (the
    normalised variant), unlike the original which used |x|.
    """

    kind: ClassVar[str] = "sphereface"
    m: int = 4
    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0
    lambda_step: str = "previous"  # "previous" | "current" (official Caffe)

    def validate(self, where: str) -> None:
        _check(self.lambda_step in LAMBDA_STEPS, f"{where}.lambda_step",
               f"must be one of {sorted(LAMBDA_STEPS)}, got {self.lambda_step!r}")
        _check(isinstance(self.m, int) and not isinstance(self.m, bool) and 1 <= self.m <= 8,
               f"{where}.m", f"must be an integer in [1, 8], got {self.m!r}")
        for name in ("base", "gamma", "power", "lambda_min"):
            _finite(getattr(self, name), f"{where}.{name}")
            _check(getattr(self, name) >= 0, f"{where}.{name}", f"must be ≥ 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class PiecewiseLinear:
    """Target f(c) = slopes[i]·c + intercepts[i] on the i-th of n equal intervals of c ∈ [−1, 1] (AM-LFS,
    arXiv 1905.07375)."""

    kind: ClassVar[str] = "piecewise"
    slopes: tuple[float, ...] = (1.0,) * 6
    intercepts: tuple[float, ...] = (0.0,) * 6

    def __post_init__(self) -> None:
        object.__setattr__(self, "slopes", tuple(self.slopes))
        object.__setattr__(self, "intercepts", tuple(self.intercepts))

    def validate(self, where: str) -> None:
        _check(len(self.slopes) >= 1 and len(self.slopes) == len(self.intercepts), where,
               f"slopes and intercepts need the same length ≥ 1, got {len(self.slopes)} and {len(self.intercepts)}")
        for i, (a, b) in enumerate(zip(self.slopes, self.intercepts)):
            _finite(a, f"{where}.slopes[{i}]")
            _finite(b, f"{where}.intercepts[{i}]")


@dataclass(frozen=True)
class ProbabilityModulation:
    """Modulating factor a ≤ 0: p_m = p/(a·p + 1 − a), a target-logit shift of −log(1 − a) (Search-Softmax,
    arXiv 2007.06542 Eq. 8).

    One value of a is the global space (a constant a equals CosFace with m = log(1 − a)/s);
    n values are the local space: a[i] applies where the target probability p falls in the i-th
    of n equal bins of [0, 1] (p of the logits before the shift, without gradient).
    """

    kind: ClassVar[str] = "search"
    a: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", tuple(self.a) if isinstance(self.a, (list, tuple)) else (self.a,))

    def validate(self, where: str) -> None:
        _check(len(self.a) >= 1, f"{where}.a", "needs at least one value")
        for i, value in enumerate(self.a):
            _finite(value, f"{where}.a[{i}]")
            _check(value <= 0, f"{where}.a[{i}]", f"modulating factor must be ≤ 0, got {value}")


@dataclass(frozen=True)
class RandomModulation:
    """Random-Softmax (arXiv 2007.06542): each training step draws x ~ N(0, sigma), a = −|x|·e^{s/3}; eval uses
    E|x| = sigma·√(2/π)."""

    kind: ClassVar[str] = "random"
    sigma: float = 0.2

    def validate(self, where: str) -> None:
        _finite(self.sigma, f"{where}.sigma")
        _check(self.sigma >= 0, f"{where}.sigma", f"must be ≥ 0, got {self.sigma}")


NEGATIVE_RULES: dict[str, str] = {
    "mv-fixed": "g(c) = c + t (MV-Softmax fixed, arXiv 1912.00833)",
    "mv-adaptive": "g(c) = (t + 1)·c + t (MV-Softmax adaptive = SV-Softmax with t_SV = t + 1)",
    "curricular": "g(c) = c·(t + c), t ← (1 − momentum)·t + momentum·mean(cos θ_y) (CurricularFace, arXiv 2004.00288)",
}


MASKS: dict[str, str] = {
    "target": "cos θ_j > f(θ_y), the target cosine used (papers)",
    "margin": "cos θ_j > cos(m1·θ_y + m2) − m3 without guard (official MV-Softmax, CurricularFace code)",
}


@dataclass(frozen=True)
class NegativeTransform:
    """Re-weights mis-classified negatives j with g from NEGATIVE_RULES (MV-Softmax arXiv 1912.00833).

    j is mis-classified where cos θ_j exceeds, by `mask_against`: "target", the target cosine
    actually used f(θ_y) (the papers' definition), or "margin", the margin formula
    cos(m1·θ_y + m2) − m3 without the guard (the official MV-Softmax and CurricularFace code,
    which differ where a guard or easy margin changed the target).
    """

    kind: ClassVar[str] = "negative"
    rule: str = "mv-adaptive"  # one of NEGATIVE_RULES
    t: float = 0.2           # MV: fixed t (cosine units); curricular: initial t (0 in the paper)
    momentum: float = 0.01   # curricular only: EMA weight of the batch mean of cos θ_y
    mask_against: str = "target"  # one of MASKS

    def validate(self, where: str) -> None:
        _check(self.mask_against in MASKS, f"{where}.mask_against",
               f"must be one of {sorted(MASKS)}, got {self.mask_against!r}")
        _check(self.rule in NEGATIVE_RULES, f"{where}.rule",
               f"unknown negative rule {self.rule!r}; choose one of {sorted(NEGATIVE_RULES)}")
        _finite(self.t, f"{where}.t")
        _finite(self.momentum, f"{where}.momentum")
        _check(0.0 <= self.t <= 2.0, f"{where}.t", f"must be in [0, 2], got {self.t}")
        _check(0.0 <= self.momentum <= 1.0, f"{where}.momentum", f"must be in [0, 1], got {self.momentum}")


@dataclass(frozen=True)
class KappaMargin:
    """Per-class margin scale ψ_c = gamma·w^κ_c + (1 − gamma)·w^n_c multiplying m2 and m3 (KappaFace, arXiv 2201.12100).

    w^κ_c = 1 − sigmoid(T·κ̃_c), κ̃ the standardised vMF concentration of class c's normalised
    features; w^n_c = (cos(π·n_c/K) + 1)/2, K = 1.05·max n_c, n_c the class's sample count.
    Recomputed at each `end_epoch()` from the epoch's running class statistics; ψ starts at 1.
    `r_max`: r̄ is clamped to it (0.999: κ stays finite); None follows the official code: no clamp,
    κ = +∞ (r̄ = 1, e.g. a one-sample class) replaced by the largest finite κ, NaN by 0.
    `gamma` weighs the concentration term, as in the official code (a paper note puts it on the
    population term: set gamma to 1 − γ_paper to follow that reading).
    """

    kind: ClassVar[str] = "kappa"
    T: float = 0.4
    gamma: float = 0.7
    r_max: float | None = 0.999  # mean resultant length clamp (unitless); None: official (no clamp)

    def validate(self, where: str) -> None:
        if self.r_max is not None:
            _finite(self.r_max, f"{where}.r_max")
            _check(0.0 < self.r_max < 1.0, f"{where}.r_max", f"must be in (0, 1) or None, got {self.r_max}")
        _finite(self.T, f"{where}.T")
        _finite(self.gamma, f"{where}.gamma")
        _check(self.T >= 0, f"{where}.T", f"temperature must be ≥ 0, got {self.T}")
        _check(0.0 <= self.gamma <= 1.0, f"{where}.gamma", f"must be in [0, 1], got {self.gamma}")


@dataclass(frozen=True)
class ElasticMargin:
    """ElasticFace (arXiv 2109.09416): the margin is drawn per sample per step, m_i = m + sigma·N(0, 1); eval uses m."""

    kind: ClassVar[str] = "elastic"
    sigma: float = 0.05      # same units as the margin it perturbs
    on: str = "angular"      # "angular": perturbs m2_rad (ElasticFace-Arc); "cosine": m3_cos (-Cos)

    def validate(self, where: str) -> None:
        _finite(self.sigma, f"{where}.sigma")
        _check(self.sigma >= 0, f"{where}.sigma", f"must be ≥ 0, got {self.sigma}")
        _check(self.on in ("angular", "cosine"), f"{where}.on",
               f"must be 'angular' or 'cosine', got {self.on!r}")


@dataclass(frozen=True)
class AdaFaceMargin:
    """AdaFace (arXiv 2204.00964): adds −m·ẑ to m2 and m + m·ẑ to m3, ẑ = clip(h·(|x| − μ)/(σ + 1e-3), −1, 1).

    μ, σ: EMA (weight t_alpha) of the batch mean / std of the feature norms clipped to
    [0.001, 100], updated before use in each training step; they start at 20 and 100.
    """

    kind: ClassVar[str] = "adaface"
    m: float = 0.4           # margin size; angular part in radians, additive part in cosine units
    h: float = 0.333
    t_alpha: float = 0.01

    def validate(self, where: str) -> None:
        for name in ("m", "h", "t_alpha"):
            _finite(getattr(self, name), f"{where}.{name}")
        _check(0 <= self.m < math.pi / 2, f"{where}.m", f"must be in [0, π/2), got {self.m}")
        _check(self.h >= 0, f"{where}.h", f"must be ≥ 0, got {self.h}")
        _check(0 <= self.t_alpha <= 1, f"{where}.t_alpha", f"must be in [0, 1], got {self.t_alpha}")


@dataclass(frozen=True)
class MagFaceMargin:
    """MagFace (arXiv 2103.06627): adds m(a) radians to m2, a = clamp(|x|, l_a, u_a), m linear from l_m to u_m;
    loss += lambda_g·mean(a/u_a² + 1/a)."""

    kind: ClassVar[str] = "magface"
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45        # radians
    u_m: float = 0.8         # radians
    lambda_g: float = 35.0

    def validate(self, where: str) -> None:
        for name in ("l_a", "u_a", "l_m", "u_m", "lambda_g"):
            _finite(getattr(self, name), f"{where}.{name}")
        _check(0 < self.l_a < self.u_a, f"{where}", f"needs 0 < l_a < u_a, got l_a={self.l_a}, u_a={self.u_a}")
        _check(0 <= self.l_m <= self.u_m < math.pi, f"{where}",
               f"needs 0 ≤ l_m ≤ u_m < π radians, got l_m={self.l_m}, u_m={self.u_m}")
        _check(self.lambda_g >= 0, f"{where}.lambda_g", f"must be ≥ 0, got {self.lambda_g}")


TargetTransform = AngularMargin | SphereFacePsi | PiecewiseLinear
Modulation = ProbabilityModulation | RandomModulation
SampleMargin = ElasticMargin | AdaFaceMargin | MagFaceMargin

# Which component types each slot of a MarginSpec accepts, by their `kind` (data, not code paths).
SLOTS: dict[str, dict[str, type]] = {
    "target": {c.kind: c for c in (AngularMargin, SphereFacePsi, PiecewiseLinear)},
    "modulation": {c.kind: c for c in (ProbabilityModulation, RandomModulation)},
    "negative": {NegativeTransform.kind: NegativeTransform},
    "class_margin": {KappaMargin.kind: KappaMargin},
    "sample_margin": {c.kind: c for c in (ElasticMargin, AdaFaceMargin, MagFaceMargin)},
}


@dataclass(frozen=True)
class MarginSpec:
    """One point of the unified margin-softmax space (Loss Function Search, arXiv 2007.06542)."""

    s: float = 64.0                          # logit scale, unitless (fixed, or the initial value if learnable)
    learnable_scale: bool = False            # NormFace (arXiv 1704.06369): learn s
    target: TargetTransform = field(default_factory=AngularMargin)
    modulation: Modulation | None = None
    negative: NegativeTransform | None = None
    class_margin: KappaMargin | None = None
    sample_margin: SampleMargin | None = None

    def __post_init__(self) -> None:
        _finite(self.s, "s")
        _check(0 < self.s <= 1024, "s", f"scale must be in (0, 1024], got {self.s}")
        _check(isinstance(self.learnable_scale, bool), "learnable_scale", "must be a bool")
        for slot, kinds in SLOTS.items():
            value = getattr(self, slot)
            if value is None and slot != "target":
                continue
            _check(type(value) in kinds.values(), slot,
                   f"expected one of {[c.__name__ for c in kinds.values()]}, got {type(value).__name__}")
            value.validate(slot)
        if not isinstance(self.target, AngularMargin):
            _check(self.class_margin is None and self.sample_margin is None, "target",
                   f"class and sample margins scale m2/m3 and need target kind 'margin', not {self.target.kind!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict; each component carries its `kind`."""
        out: dict[str, Any] = {"s": self.s, "learnable_scale": self.learnable_scale}
        for slot in SLOTS:
            value = getattr(self, slot)
            if value is None:
                out[slot] = None
                continue
            entry = {"kind": value.kind}
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                entry[f.name] = list(v) if isinstance(v, tuple) else v
            out[slot] = entry
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MarginSpec:
        """Inverse of `to_dict`; unknown keys or kinds raise SpecError naming them."""
        if not isinstance(data, Mapping):
            raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
        known = {"s", "learnable_scale", *SLOTS}
        unknown = sorted(set(data) - known)
        _check(not unknown, "spec", f"unknown key(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {k: data[k] for k in ("s", "learnable_scale") if k in data}
        for slot, kinds in SLOTS.items():
            if slot in data and data[slot] is not None:
                kwargs[slot] = _component_from_dict(slot, kinds, data[slot])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong field types that dataclasses rejects
            raise SpecError(f"spec: {exc}") from None

    def flat(self) -> dict[str, Any]:
        """Dotted single-level view (``target.m2_rad`` …) for tracking params; None slots are omitted."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            elif value is not None:
                out[key] = value
        return out


def _component_from_dict(slot: str, kinds: Mapping[str, type], data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise SpecError(f"{slot}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in kinds:
        raise SpecError(f"{slot}.kind: unknown kind {kind!r}; choose one of {sorted(kinds)}")
    cls_ = kinds[kind]
    names = {f.name for f in dataclasses.fields(cls_)}
    unknown = sorted(set(data) - names)
    _check(not unknown, slot, f"unknown key(s) {unknown} for kind {kind!r}; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls_(**values)
    except TypeError as exc:
        raise SpecError(f"{slot}: {exc}") from None
