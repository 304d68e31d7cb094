"""The named points of the unified space: a table of published losses, each with its defaults.

`NAMED` is data: one row per loss with its citation, formula, default parameters (their names
are part of the API), their units, and the `MarginSpec` the parameters map to. Each point
defaults to the formula of its official code (the one behind the published numbers); every
deviation from it (the paper's formula, other releases) is a named parameter, listed with the
commit read in `losses.fidelity`. `named(name,
**params)` returns that spec; `identify(spec)` finds the named point a spec equals, if any.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .spec import (
    AdaFaceMargin,
    AngularMargin,
    ElasticMargin,
    KappaMargin,
    MagFaceMargin,
    MarginSpec,
    NegativeTransform,
    PiecewiseLinear,
    ProbabilityModulation,
    RandomModulation,
    SpecError,
    SphereFacePsi,
)

__all__ = ["NamedLoss", "NAMED", "named", "identify"]


@dataclass(frozen=True)
class NamedLoss:
    """One row of the table of named losses."""

    citation: str
    formula: str                        # target logit / s (and negatives where they change)
    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], MarginSpec] = field(repr=False)
    units: Mapping[str, str] = field(default_factory=dict)
    note: str = ""


def _mv_rule(adaptive: bool) -> str:
    return "mv-adaptive" if adaptive else "mv-fixed"


def _easy(easy_margin: bool) -> str:
    if not isinstance(easy_margin, bool):
        raise SpecError(f"easy_margin: must be a bool, got {easy_margin!r}")
    return "easy-all" if easy_margin else "fallback"   # official AM easy margin: no margin where cos θ_y ≤ 0


def _mv(p: Mapping[str, Any], target: AngularMargin, rule: str, t: float) -> MarginSpec:
    return MarginSpec(s=p["s"], target=target,
                      negative=NegativeTransform(rule=rule, t=t, mask_against=p["mask_against"]))


def _sv_t(t_sv: float) -> float:
    # SV-Softmax: h = e^{s(t−1)(c+1)} multiplies a support vector's exponent, i.e. g(c) = t·c + t − 1.
    if t_sv < 1.0:
        raise SpecError(f"t: SV-Softmax needs t ≥ 1 (t = 1 is no re-weighting), got {t_sv}")
    return round(t_sv - 1.0, 12)  # so that sv-am(t=1.2) and mv-am(t=0.2) are the same point


def _search_a(p: Mapping[str, Any]) -> tuple[float, ...]:
    a = p["a"]
    if a is None:
        return (-math.exp(p["s"] / 3.0),)
    return tuple(float(v) for v in a) if isinstance(a, (list, tuple)) else (float(a),)


def _am_lfs(p: Mapping[str, Any]) -> PiecewiseLinear:
    n = p["intervals"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SpecError(f"intervals: must be a positive integer, got {n!r}")
    slopes = (1.0,) * n if p["slopes"] is None else tuple(p["slopes"])
    intercepts = (0.0,) * n if p["intercepts"] is None else tuple(p["intercepts"])
    if len(slopes) != n or len(intercepts) != n:
        raise SpecError(f"slopes/intercepts: need {n} values each (intervals={n}), "
                        f"got {len(slopes)} and {len(intercepts)}")
    return PiecewiseLinear(slopes=slopes, intercepts=intercepts)


NAMED: dict[str, NamedLoss] = {
    "normface": NamedLoss(
        "Wang et al., NormFace, ACM MM 2017, arXiv:1704.06369",
        "s·cos θ_y", {"s": 64.0},
        lambda p: MarginSpec(s=p["s"])),
    "cosface": NamedLoss(
        "Wang et al., CosFace, CVPR 2018, arXiv:1801.09414 (AM-Softmax arXiv:1801.05599)",
        "s·(cos θ_y − m)", {"s": 64.0, "m": 0.35},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m3_cos=p["m"])),
        units={"m": "cosine units"}),
    "arcface": NamedLoss(
        "Deng et al., ArcFace, CVPR 2019, arXiv:1801.07698",
        "s·cos(θ_y + m); θ_y > π − m: s·(cos θ_y − m·sin m)",
        {"s": 64.0, "m": 0.5, "guard": "fallback", "straight_through": False},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m2_rad=p["m"], guard=p["guard"],
                                                             straight_through=p["straight_through"])),
        units={"m": "radians"},
        note="defaults: the paper's MXNet code; "
             "straight_through=True, guard='none' is insightface's current torch head"),
    "combined": NamedLoss(
        "Deng et al., ArcFace, CVPR 2019, arXiv:1801.07698, Sec. 2.3 (insightface combined margin)",
        "s·(cos(m1·θ_y + m2) − m3)",
        {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2, "guard": "none"},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m1=p["m1"], m2_rad=p["m2"], m3_cos=p["m3"],
                                                             guard=p["guard"])),
        units={"m2": "radians", "m3": "cosine units"},
        note="default guard='none' as insightface's mxnet code; guard='fallback' keeps f decreasing past π"),
    "sphereface": NamedLoss(
        "Liu et al., SphereFace, CVPR 2017, arXiv:1704.08063",
        "s·(ψ(θ_y) + λ cos θ_y)/(1 + λ), ψ = (−1)^k cos(mθ) − 2k, λ = max(λ_min, base(1 + γ·step)^−power)",
        {"s": 64.0, "m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0,
         "lambda_step": "current"},
        lambda p: MarginSpec(s=p["s"], target=SphereFacePsi(m=p["m"], base=p["base"], gamma=p["gamma"],
                                                             power=p["power"], lambda_min=p["lambda_min"],
                                                             lambda_step=p["lambda_step"])),
        units={"m": "integer multiplier", "lambda_step": "'current' (Caffe: step counted before λ) or 'previous'"},
        note="normalised features scaled by s; the original scales by |x|"),
    "mv-am": NamedLoss(
        "Wang et al., MV-Softmax, AAAI 2020, arXiv:1912.00833",
        "s·(cos θ_y − m) (easy margin: s·cos θ_y where cos θ_y ≤ 0); mis-classified j (cos θ_j > cos θ_y − m): "
        "s·((t + 1) cos θ_j + t) (fixed: s·(cos θ_j + t))",
        {"s": 32.0, "m": 0.35, "t": 0.2, "adaptive": True, "easy_margin": True, "mask_against": "margin"},
        lambda p: _mv(p, AngularMargin(m3_cos=p["m"], guard=_easy(p["easy_margin"])), _mv_rule(p["adaptive"]), p["t"]),
        units={"m": "cosine units", "t": "cosine units", "mask_against": "'margin' (official) or 'target'"}),
    "mv-arc": NamedLoss(
        "Wang et al., MV-Softmax, AAAI 2020, arXiv:1912.00833",
        "s·cos(θ_y + m) (easy margin); mis-classified j (cos θ_j > cos(θ_y + m)): s·((t + 1) cos θ_j + t)",
        {"s": 32.0, "m": 0.35, "t": 0.2, "adaptive": True, "guard": "easy", "mask_against": "margin"},
        lambda p: _mv(p, AngularMargin(m2_rad=p["m"], guard=p["guard"]), _mv_rule(p["adaptive"]), p["t"]),
        units={"m": "radians", "t": "cosine units", "mask_against": "'margin' (official) or 'target'"}),
    "sv-am": NamedLoss(
        "Wang et al., SV-Softmax, arXiv:1812.11317",
        "s·(cos θ_y − m) (easy margin); support vectors j: exponent × e^{s(t−1)(cos θ_j + 1)}",
        {"s": 32.0, "m": 0.35, "t": 1.2, "easy_margin": True, "mask_against": "margin"},
        lambda p: _mv(p, AngularMargin(m3_cos=p["m"], guard=_easy(p["easy_margin"])), "mv-adaptive", _sv_t(p["t"])),
        units={"m": "cosine units", "t": "SV notation (≥ 1)"},
        note="equals mv-am with t_MV = t − 1"),
    "sv-arc": NamedLoss(
        "Wang et al., SV-Softmax, arXiv:1812.11317",
        "s·cos(θ_y + m) (easy margin); support vectors j: exponent × e^{s(t−1)(cos θ_j + 1)}",
        {"s": 32.0, "m": 0.35, "t": 1.2, "guard": "easy", "mask_against": "margin"},
        lambda p: _mv(p, AngularMargin(m2_rad=p["m"], guard=p["guard"]), "mv-adaptive", _sv_t(p["t"])),
        units={"m": "radians", "t": "SV notation (≥ 1)"}),
    "curricularface": NamedLoss(
        "Huang et al., CurricularFace, CVPR 2020, arXiv:2004.00288",
        "s·cos(θ_y + m) (ArcFace fallback); hard j (cos θ_j > cos(θ_y + m)): s·cos θ_j (t + cos θ_j), "
        "t ← 0.99 t + 0.01 mean cos θ_y",
        {"s": 64.0, "m": 0.5, "mask_against": "margin"},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m2_rad=p["m"]),
                             negative=NegativeTransform(rule="curricular", t=0.0, momentum=0.01,
                                                        mask_against=p["mask_against"])),
        units={"m": "radians", "mask_against": "'margin' (official) or 'target'"}),
    "kappaface": NamedLoss(
        "Oinar et al., KappaFace, arXiv:2201.12100",
        "s·cos(θ_y + ψ_y·m0), ψ from class concentration κ and class size, recomputed each epoch",
        {"s": 64.0, "m0": 0.8, "T": 0.4, "gamma": 0.7, "guard": "none", "r_max": None},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m2_rad=p["m0"], guard=p["guard"]),
                             class_margin=KappaMargin(T=p["T"], gamma=p["gamma"], r_max=p["r_max"])),
        units={"m0": "radians", "r_max": "None (official: no clamp of r̄) or a clamp < 1"},
        note="class statistics are the epoch's running sums, not the official momentum encoder"),
    "search-softmax": NamedLoss(
        "Wang et al., Loss Function Search, ICML 2020, arXiv:2007.06542",
        "p_m = p/(a·p + 1 − a), a ≤ 0: target logit s·cos θ_y − log(1 − a); a per p-bin if 10 values",
        {"s": 32.0, "a": None},
        lambda p: MarginSpec(s=p["s"], modulation=ProbabilityModulation(a=_search_a(p))),
        units={"a": "modulating factor (≤ 0); default −e^{s/3}"},
        note="default a = −e^{s/3} (official code's start; CosFace m ≈ 1/3 at s = 32)"),
    "random-softmax": NamedLoss(
        "Wang et al., Loss Function Search, ICML 2020, arXiv:2007.06542",
        "search-softmax with a = −|x|·e^{s/3}, x ~ N(0, σ) drawn every step",
        {"s": 32.0, "sigma": 0.2},
        lambda p: MarginSpec(s=p["s"], modulation=RandomModulation(sigma=p["sigma"]))),
    "am-lfs": NamedLoss(
        "Li et al., AM-LFS, ICCV 2019, arXiv:1905.07375",
        "s·(a_i cos θ_y + b_i) on the i-th of `intervals` equal intervals of cos θ_y ∈ [−1, 1]",
        {"s": 64.0, "intervals": 6, "slopes": None, "intercepts": None},
        lambda p: MarginSpec(s=p["s"], target=_am_lfs(p)),
        note="default slopes 1, intercepts 0: the identity (normface)"),
    "elasticface-arc": NamedLoss(
        "Boutros et al., ElasticFace, CVPRW 2022, arXiv:2109.09416",
        "s·cos(θ_y + m_i), m_i ~ N(m, σ) per sample per step",
        {"s": 64.0, "m": 0.5, "sigma": 0.05, "guard": "none"},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m2_rad=p["m"], guard=p["guard"]),
                             sample_margin=ElasticMargin(sigma=p["sigma"], on="angular")),
        units={"m": "radians", "sigma": "radians"},
        note="default guard='none' as the official code; guard='fallback' keeps f decreasing past π"),
    "elasticface-cos": NamedLoss(
        "Boutros et al., ElasticFace, CVPRW 2022, arXiv:2109.09416",
        "s·(cos θ_y − m_i), m_i ~ N(m, σ) per sample per step",
        {"s": 64.0, "m": 0.35, "sigma": 0.05},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m3_cos=p["m"]),
                             sample_margin=ElasticMargin(sigma=p["sigma"], on="cosine")),
        units={"m": "cosine units", "sigma": "cosine units"}),
    "adaface": NamedLoss(
        "Kim et al., AdaFace, CVPR 2022, arXiv:2204.00964",
        "s·(cos(θ_y − m·ẑ) − (m + m·ẑ)), ẑ = clip(h(|x| − μ)/(σ + 1e-3), −1, 1), μ, σ EMA of batch norms",
        {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "cos_clamp": 1e-3},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(guard="clip", cos_clamp=p["cos_clamp"]),
                             sample_margin=AdaFaceMargin(m=p["m"], h=p["h"], t_alpha=p["t_alpha"])),
        units={"m": "radians (angular part) and cosine units (additive part)",
               "cos_clamp": "cosine units: every cosine clamped to ±(1 − cos_clamp), official 1e-3"}),
    "magface": NamedLoss(
        "Meng et al., MagFace, CVPR 2021, arXiv:2103.06627",
        "s·cos(θ_y + m(a)), m(a) linear in a = clamp(|x|, l_a, u_a); loss + λ_g·(a/u_a² + 1/a)",
        {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "guard": "easy"},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(guard=p["guard"]),
                             sample_margin=MagFaceMargin(l_a=p["l_a"], u_a=p["u_a"], l_m=p["l_m"],
                                                         u_m=p["u_m"], lambda_g=p["lambda_g"])),
        units={"l_m": "radians", "u_m": "radians"},
        note="default guard='easy' as the official MagLinear (easy_margin=True); the paper has no easy margin"),
}


def named(name: str, **params: Any) -> MarginSpec:
    """The `MarginSpec` of a named loss, its defaults overridden by `params` (names as in `NAMED[name].defaults`)."""
    if name not in NAMED:
        raise SpecError(f"unknown loss {name!r}; named losses: {', '.join(NAMED)}")
    entry = NAMED[name]
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        raise SpecError(f"{name}: unknown parameter(s) {unknown}; accepted: {', '.join(entry.defaults)}")
    return entry.build({**entry.defaults, **params})


def identify(spec: MarginSpec) -> str | None:
    """The named loss whose default spec equals `spec`, or None (first match in table order)."""
    for name in NAMED:
        if named(name) == spec:
            return name
    return None
