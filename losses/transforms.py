"""Pure transforms of cosine logits: functions of cosines, labels and per-sample values only.

Nothing here owns state or parameters, so the same code serves a full, class-chunked or sampled
(Partial FC) head. Angles are radians, margins carry their units in their names (see `spec.py`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ANGLE_EPS", "angle", "clamp_cos", "angular_target", "sphereface_target", "sphereface_lambda", "chebyshev",
    "piecewise_target", "NEGATIVE_RULE_FNS", "NEGATIVE_RULE_DELTAS",
    "NEGATIVE_RULE_DELTA_GRADS", "transform_negatives", "insert_target",
    "modulation_shift", "probability_shift", "kappa_psi", "adaface_offsets", "magface_margin", "magface_regularizer",
]

# cos θ is clamped to [−1 + ANGLE_EPS, 1 − ANGLE_EPS] before acos: dacos/dc stays finite (≈ 2.2e3).
ANGLE_EPS = 1e-7
CLIP_EPS_RAD = 1e-3  # AdaFace's angle clip, radians


def angle(cos: Tensor) -> Tensor:
    """θ = acos(cos) in radians, on cosines clamped away from ±1 so the gradient stays finite."""
    return torch.acos(cos.clamp(-1.0 + ANGLE_EPS, 1.0 - ANGLE_EPS))


def _fallback(cos_y: Tensor, phi: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    # insightface ArcFace: past π, a CosFace-like penalty m2·sin(m2) keeps f decreasing in θ.
    return torch.where(phi <= math.pi, torch.cos(phi), cos_y - m2 * torch.sin(m2)) - m3


def _easy(cos_y: Tensor, phi: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    return torch.where(cos_y > 0, torch.cos(phi), cos_y) - m3


def _easy_all(cos_y: Tensor, phi: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    return torch.where(cos_y > 0, torch.cos(phi) - m3, cos_y)


def _clip(cos_y: Tensor, phi: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    return torch.cos(phi.clamp(CLIP_EPS_RAD, math.pi - CLIP_EPS_RAD)) - m3


def _unguarded(cos_y: Tensor, phi: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    return torch.cos(phi) - m3


GUARD_FNS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "fallback": _fallback, "easy": _easy, "easy-all": _easy_all, "clip": _clip, "none": _unguarded,
}


def clamp_cos(cos: Tensor, eps: float) -> Tensor:
    """cos clamped to [−1 + eps, 1 − eps] (with clamp's gradient: zero outside); eps = 0 leaves it unchanged."""
    return cos.clamp(-1.0 + eps, 1.0 - eps) if eps > 0 else cos


def angular_target(cos_y: Tensor, m1: float, m2_rad: Tensor | float, m3_cos: Tensor | float,
                   guard: str = "fallback", straight_through: bool = False) -> Tensor:
    """f = cos(m1·θ + m2) − m3 with a guard past π (combined margin, insightface; ArcFace arXiv 1801.07698).

    `m2_rad` and `m3_cos` are scalars or per-sample tensors [B]. With `straight_through` the value
    is f but the gradient is that of cos θ (insightface's torch ArcFace applies its margin under
    no_grad).
    """
    m2 = torch.as_tensor(m2_rad, dtype=cos_y.dtype, device=cos_y.device)
    m3 = torch.as_tensor(m3_cos, dtype=cos_y.dtype, device=cos_y.device)
    if m1 == 1.0 and not isinstance(m2_rad, Tensor) and m2_rad == 0.0 and guard != "clip":
        # a pure cosine margin is cos θ − m3 exactly (CosFace), not cos(acos(·)) of a clamped cosine
        f = torch.where(cos_y > 0, cos_y - m3, cos_y) if guard == "easy-all" else cos_y - m3
    else:
        f = GUARD_FNS[guard](cos_y, m1 * angle(cos_y) + m2, m2, m3)
    return cos_y + (f - cos_y).detach() if straight_through else f


def chebyshev(cos: Tensor, m: int) -> Tensor:
    """cos(m·θ) as the Chebyshev polynomial T_m(cos θ): exact, with a finite gradient at cos = ±1."""
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return cur


def sphereface_lambda(step: int, base: float, gamma: float, power: float, lambda_min: float) -> float:
    """λ = max(lambda_min, base·(1 + gamma·step)^(−power)) (SphereFace's annealing, arXiv 1704.08063)."""
    return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


def sphereface_target(cos_y: Tensor, m: int, lam: float) -> Tensor:
    """f = (ψ(θ) + λ cos θ)/(1 + λ), ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m] (SphereFace,
    arXiv 1704.08063)."""
    c = cos_y.clamp(-1.0, 1.0)
    with torch.no_grad():
        k = torch.floor(m * angle(c) / math.pi).clamp(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    psi = sign * chebyshev(c, m) - 2.0 * k
    return (psi + lam * cos_y) / (1.0 + lam)


def piecewise_target(cos_y: Tensor, slopes: Tensor, intercepts: Tensor) -> Tensor:
    """f(c) = slopes[i]·c + intercepts[i] on the i-th of n equal intervals of [−1, 1] (AM-LFS, arXiv 1905.07375)."""
    n = slopes.numel()
    idx = torch.floor((cos_y.detach() + 1.0) * (n / 2.0)).long().clamp(0, n - 1)
    return slopes[idx] * cos_y + intercepts[idx]


NEGATIVE_RULE_FNS: dict[str, Callable[[Tensor, Tensor | float], Tensor]] = {
    "mv-fixed": lambda cos, t: cos + t,                  # MV-Softmax fixed (arXiv 1912.00833)
    "mv-adaptive": lambda cos, t: (t + 1.0) * cos + t,   # MV-Softmax adaptive = SV-Softmax, t_SV = t + 1
    "curricular": lambda cos, t: cos * (t + cos),        # CurricularFace (arXiv 2004.00288)
}

# The same rules as increments over the plain cosine, δ = g − cos, and their slopes δ' = dg/dcos − 1
# (t carries no gradient): losses.chunked writes g = cos + hard·δ with a float 0/1 mask `hard`,
# which is several times faster on CPU than torch.where over a bool mask.
NEGATIVE_RULE_DELTAS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mv-fixed": lambda cos, t: t,
    "mv-adaptive": lambda cos, t: (cos + 1.0).mul_(t),
    "curricular": lambda cos, t: (cos + (t - 1.0)).mul_(cos),
}
NEGATIVE_RULE_DELTA_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mv-fixed": lambda cos, t: t.new_zeros(()),
    "mv-adaptive": lambda cos, t: t,
    "curricular": lambda cos, t: (2.0 * cos).add_(t - 1.0),
}


def insert_target(cos: Tensor, labels: Tensor, f: Tensor) -> Tensor:
    """cos with column y of each row replaced by the transformed target f [B]."""
    return cos.scatter(1, labels[:, None], f[:, None].to(cos.dtype))


def transform_negatives(cos: Tensor, labels: Tensor, f: Tensor, rule: str, t: Tensor | float,
                        threshold: Tensor | None = None) -> Tensor:
    """Apply the rule g to mis-classified negatives (cos θ_j > threshold, default f(θ_y); j ≠ y); the target column
    is f."""
    hard = cos > (f.detach() if threshold is None else threshold)[:, None]
    hard.scatter_(1, labels[:, None], False)
    out = torch.where(hard, NEGATIVE_RULE_FNS[rule](cos, t), cos)
    return insert_target(out, labels, f)


def modulation_shift(z: Tensor, labels: Tensor, a: Tensor) -> Tensor:
    """−log(1 − a) per sample: the target-logit shift equal to p → p/(a·p + 1 − a) (Search-Softmax,
    arXiv 2007.06542 Eq. 8).

    `a` holds one value (global) or n values, one per equal bin of the target probability
    p ∈ [0, 1] of the unshifted scaled logits `z` (p taken without gradient).
    """
    if a.numel() == 1:
        return torch.log1p(-a).expand(z.shape[0])
    with torch.no_grad():
        p = torch.softmax(z, dim=1).gather(1, labels[:, None]).squeeze(1)
    return probability_shift(p, a)


def probability_shift(p: Tensor, a: Tensor) -> Tensor:
    """−log(1 − a) per sample from the target probabilities p [B] (no gradient): a[i] of p's bin of n equal bins of
    [0, 1]."""
    if a.numel() == 1:
        return torch.log1p(-a).expand(p.shape[0])
    idx = torch.floor(p.detach() * a.numel()).long().clamp(0, a.numel() - 1)
    return torch.log1p(-a[idx])


def kappa_psi(feature_sum: Tensor, count: Tensor, T: float, gamma: float,
              r_max: float | None = 0.999) -> tuple[Tensor, Tensor]:
    """KappaFace per-class margin scale ψ (arXiv 2201.12100) and the mask of classes it is defined for.

    r̄_c = |Σ normalised features|/n_c (clamped to `r_max`), κ_c = r̄(d − r̄²)/(1 − r̄²) with d the
    feature dimension, κ̃ standardised over the classes seen, w^κ = 1 − sigmoid(T·κ̃),
    w^n = (cos(π·n_c/K) + 1)/2 with K = 1.05·max n_c, ψ = gamma·w^κ + (1 − gamma)·w^n.
    `r_max=None` is the official code: no clamp, κ = +∞ replaced by the largest other κ of a seen class.
    """
    seen = count > 0
    d = feature_sum.shape[1]
    n = count.to(feature_sum.dtype)
    r = feature_sum.norm(dim=1) / n.clamp_min(1.0)
    if r_max is not None:
        r = r.clamp(0.0, r_max)
    kappa = r * (d - r * r) / (1.0 - r * r)
    if r_max is None:
        infinite = torch.isposinf(kappa)
        finite = kappa[seen & ~infinite]
        replace = finite.max() if finite.numel() else kappa.new_zeros(())
        kappa = torch.where(infinite, replace, kappa).nan_to_num(nan=0.0)
    ks = kappa[seen]
    if ks.numel() >= 2:
        std = ks.std()
        ktilde = (kappa - ks.mean()) / std if std > 0 else torch.zeros_like(kappa)
    else:
        ktilde = torch.zeros_like(kappa)
    w_kappa = 1.0 - torch.sigmoid(T * ktilde)
    big_k = 1.05 * n[seen].max() if bool(seen.any()) else torch.ones((), dtype=n.dtype)
    w_count = (torch.cos(math.pi * n / big_k) + 1.0) / 2.0
    return gamma * w_kappa + (1.0 - gamma) * w_count, seen


def adaface_offsets(norms: Tensor, mean: Tensor, std: Tensor, m: float, h: float) -> tuple[Tensor, Tensor]:
    """AdaFace (arXiv 2204.00964): (Δm2 = −m·ẑ, Δm3 = m + m·ẑ), ẑ = clip(h·(|x| − μ)/(σ + 1e-3), −1, 1), no gradient."""
    z = (h * (norms.detach().clamp(0.001, 100.0) - mean) / (std + 1e-3)).clamp(-1.0, 1.0)
    return -m * z, m + m * z


def magface_margin(norms: Tensor, l_a: float, u_a: float, l_m: float, u_m: float) -> Tensor:
    """m(a) in radians, linear from l_m at a = l_a to u_m at a = u_a, a = clamp(|x|, l_a, u_a) (MagFace,
    arXiv 2103.06627)."""
    a = norms.clamp(l_a, u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(norms: Tensor, l_a: float, u_a: float) -> Tensor:
    """g(a) = a/u_a² + 1/a averaged over the batch, a = clamp(|x|, l_a, u_a) (MagFace, arXiv 2103.06627)."""
    a = norms.clamp(l_a, u_a)
    return (a / u_a**2 + 1.0 / a).mean()
