"""One behaviour object per `MarginSpec` component, looked up in the table `COMPONENTS`.

In the style of pytorch-metric-learning (each loss overrides one hook), a component's whole
behaviour lives in one class: its buffers on the head (`register`, same names as the state_dict
keys), which of them are per-rank sums (`summed_buffers`, the trainer all-reduces those without
averaging), whether the sharded head supports it (`sharded`), its per-step statistics
(`update`, training only, before use), its epoch hook (`end_epoch`) and its transform, one hook
per slot of the spec:

    slot            hook                                        default
    target          transform(head, step, m2, m3) -> Target      (must override)
    class_margin    margins(head, step, m2, m3) -> (m2, m3)      unchanged
    sample_margin   margins(...) and extra_loss(head, step)      unchanged, 0
    negative        rule(head) -> (rule name, t) and threshold   (must override)
    modulation      factor(head, step, scale) -> a               (must override)

`plan(head, step)` runs the hooks in one fixed order for every head (full, chunked, sampled,
sharded; `forward` and `logits`), so per-step randomness is drawn in one order: the sample
margins, then the modulating factor. The arithmetic stays in the pure functions of
`losses.transforms`. A new component is one class registered with `register_component`
(see docs/architecture.md, "Adding a component").
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import transforms as T
from .spec import (
    SLOTS,
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
    SphereFacePsi,
)

__all__ = ["Step", "Target", "Plan", "Component", "COMPONENTS", "components_of", "register_component",
           "register_buffers", "summed_buffers", "unsupported_by_sharded", "plan", "update_statistics",
           "end_epoch"]


@dataclass
class Step:
    """What the components see of one step: per-sample values (no gradient) and the step's draw.

    `labels` index the head's classes (global, also in sampled mode); `draw(shape)` returns
    float32 N(0, 1) values (the sharded head broadcasts rank 0's).
    """

    labels: Tensor
    norms: Tensor
    x_unit: Tensor
    cos_y: Tensor
    training: bool
    draw: Callable[[tuple[int, ...]], Tensor]


@dataclass
class Target:
    """A target transform of this step: `f` (cos θ_y [B] → target cosine), `mask` (the margin formula
    without guard, which mis-classification may be judged against) and `cos_clamp` (every cosine is
    clamped to ±(1 − cos_clamp) before use; 0: only to ±1)."""

    f: Callable[[Tensor], Tensor]
    mask: Callable[[Tensor], Tensor]
    cos_clamp: float = 0.0


@dataclass
class Plan:
    """All a head needs besides the cosines: target transform, negative rule and threshold, factor a, extra loss."""

    f: Callable[[Tensor], Tensor]
    rule: str | None
    t: Tensor | float
    threshold: Tensor | None
    a: Tensor | None
    extra: Tensor
    cos_clamp: float = 0.0


class Component:
    """Behaviour of one spec component `p`; override the hook of its slot (see the module docstring)."""

    name: ClassVar[str] = "component"
    sharded: ClassVar[bool] = True                 # the sharded head computes it exactly
    summed_buffers: ClassVar[tuple[str, ...]] = ()  # buffers that are per-rank sums, not means

    def __init__(self, p: Any) -> None:
        self.p = p

    def validate(self, where: str) -> None:
        """Check a registered component's own fields (raise SpecError naming f"{where}.field"); none by default."""

    def register(self, head: nn.Module, num_classes: int, embedding_size: int) -> None:
        """Register this component's buffers on `head`."""

    def update(self, head: nn.Module, step: Step) -> None:
        """Per-step statistics, called under no_grad in training mode before the transform."""

    def end_epoch(self, head: nn.Module) -> None:
        """Epoch hook, called under no_grad."""

    def for_curve(self, head: nn.Module, feature_norm: float | None) -> float | None:
        """Put `head` in the state papers plot (`target_logit_curve`); returns the feature norm to plot at."""
        return feature_norm

    # slot hooks
    def margins(self, head: nn.Module, step: Step, m2: Tensor | float, m3: Tensor | float
                ) -> tuple[Tensor | float, Tensor | float]:
        return m2, m3

    def extra_loss(self, head: nn.Module, step: Step) -> Tensor | float:
        return 0.0

    def transform(self, head: nn.Module, step: Step, m2: Tensor | float, m3: Tensor | float) -> Target:
        raise NotImplementedError

    def base_margins(self) -> tuple[Tensor | float, Tensor | float]:
        return 0.0, 0.0

    def rule(self, head: nn.Module) -> tuple[str, Tensor | float]:
        raise NotImplementedError

    def threshold(self, target: Target, cos_y: Tensor) -> Tensor:
        """The row threshold a negative must exceed to count as mis-classified (no gradient)."""
        return target.f(cos_y)

    def factor(self, head: nn.Module, step: Step, scale: Tensor) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------- targets
class AngularTarget(Component):
    """f = cos(m1·θ + m2) − m3 with a guard past π (combined margin; ArcFace arXiv 1801.07698)."""

    name = "angular margin"

    def base_margins(self) -> tuple[float, float]:
        return self.p.m2_rad, self.p.m3_cos

    def transform(self, head, step, m2, m3) -> Target:
        p, eps = self.p, self.p.cos_clamp
        return Target(lambda c: T.angular_target(T.clamp_cos(c, eps), p.m1, m2, m3, p.guard, p.straight_through),
                      lambda c: T.angular_target(T.clamp_cos(c, eps), p.m1, m2, m3, "none"), eps)


class SphereFaceTarget(Component):
    """f = (ψ(θ) + λ cos θ)/(1 + λ), λ annealed over the steps in buffer `step` (SphereFace arXiv 1704.08063)."""

    name = "SphereFace ψ"

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("step", torch.zeros((), dtype=torch.long))

    def update(self, head, step):
        head.step.add_(1)

    def for_curve(self, head, feature_norm):
        head.step.fill_(2**62)  # annealed: λ = lambda_min, the curve SphereFace trains towards
        return feature_norm

    def transform(self, head, step, m2, m3) -> Target:
        p = self.p
        # "previous": λ of the steps before this one; "current": this step counted (official Caffe)
        n = int(head.step) - (1 if step.training and p.lambda_step == "previous" else 0)
        lam = T.sphereface_lambda(n, p.base, p.gamma, p.power, p.lambda_min)
        fn = lambda c: T.sphereface_target(c, p.m, lam)  # noqa: E731
        return Target(fn, fn)


class PiecewiseTarget(Component):
    """f(c) = a_i·c + b_i on n equal intervals of [−1, 1] (AM-LFS arXiv 1905.07375); buffers `slopes`, `intercepts`."""

    name = "piecewise-linear target"

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("slopes", torch.tensor(self.p.slopes, dtype=torch.float64), persistent=False)
        head.register_buffer("intercepts", torch.tensor(self.p.intercepts, dtype=torch.float64), persistent=False)

    def transform(self, head, step, m2, m3) -> Target:
        slopes, intercepts = head.slopes.to(step.cos_y.dtype), head.intercepts.to(step.cos_y.dtype)
        fn = lambda c: T.piecewise_target(c, slopes, intercepts)  # noqa: E731
        return Target(fn, fn)


# ---------------------------------------------------------------------- class and sample margins
class KappaClassMargin(Component):
    """m2, m3 × ψ_y, ψ per class from the epoch's class statistics (KappaFace arXiv 2201.12100)."""

    name = "KappaFace class margins"
    sharded = False
    summed_buffers = ("kappa_feature_sum", "kappa_count")

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("kappa_psi", torch.ones(num_classes))
        head.register_buffer("kappa_feature_sum", torch.zeros(num_classes, embedding_size))
        head.register_buffer("kappa_count", torch.zeros(num_classes))

    def update(self, head, step):
        head.kappa_feature_sum.index_add_(0, step.labels, step.x_unit.to(head.kappa_feature_sum.dtype))
        head.kappa_count.index_add_(0, step.labels, torch.ones_like(step.labels, dtype=head.kappa_count.dtype))

    def end_epoch(self, head):
        psi, seen = T.kappa_psi(head.kappa_feature_sum.double(), head.kappa_count.double(), self.p.T, self.p.gamma,
                                self.p.r_max)
        head.kappa_psi.copy_(torch.where(seen, psi.to(head.kappa_psi.dtype), head.kappa_psi))
        head.kappa_feature_sum.zero_()
        head.kappa_count.zero_()

    def margins(self, head, step, m2, m3):
        psi = head.kappa_psi.to(step.cos_y.dtype)[step.labels]
        return psi * m2, psi * m3


class ElasticSampleMargin(Component):
    """m_i = m + σ·N(0, 1) per sample and step, on m2 (radians) or m3 (cosine units) (ElasticFace 2109.09416)."""

    name = "ElasticFace sample margins"

    def margins(self, head, step, m2, m3):
        n = step.cos_y.shape[0]
        noise = step.draw((n,)).to(step.cos_y.dtype) if step.training else step.cos_y.new_zeros(n)
        if self.p.on == "angular":
            return m2 + self.p.sigma * noise, m3
        return m2, m3 + self.p.sigma * noise


class AdaFaceSampleMargin(Component):
    """Δm2 = −m·ẑ radians, Δm3 = m + m·ẑ cosine units, ẑ from |x| and EMAs `norm_mean`, `norm_std` (AdaFace)."""

    name = "AdaFace sample margins"

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("norm_mean", torch.tensor(20.0))
        head.register_buffer("norm_std", torch.tensor(100.0))

    def for_curve(self, head, feature_norm):
        return 20.0 if feature_norm is None else feature_norm  # ẑ = 0 at the initial statistics

    def update(self, head, step):
        if step.norms.numel() < 2:
            return
        safe, alpha = step.norms.clamp(0.001, 100.0), self.p.t_alpha
        head.norm_mean.mul_(1.0 - alpha).add_(alpha * safe.mean().to(head.norm_mean.dtype))
        head.norm_std.mul_(1.0 - alpha).add_(alpha * safe.std().to(head.norm_std.dtype))

    def margins(self, head, step, m2, m3):
        dtype = step.cos_y.dtype
        d2, d3 = T.adaface_offsets(step.norms, head.norm_mean.to(dtype), head.norm_std.to(dtype), self.p.m, self.p.h)
        return m2 + d2, m3 + d3


class MagFaceSampleMargin(Component):
    """Δm2 = m(a) radians, a = clamp(|x|, l_a, u_a); regulariser λ_g·mean(a/u_a² + 1/a) (MagFace arXiv 2103.06627)."""

    name = "MagFace sample margins"
    sharded = False

    def for_curve(self, head, feature_norm):
        return (self.p.l_a + self.p.u_a) / 2.0 if feature_norm is None else feature_norm

    def margins(self, head, step, m2, m3):
        p = self.p
        return m2 + T.magface_margin(step.norms, p.l_a, p.u_a, p.l_m, p.u_m), m3

    def extra_loss(self, head, step):
        return self.p.lambda_g * T.magface_regularizer(step.norms, self.p.l_a, self.p.u_a)


# ---------------------------------------------------------------------- negatives
class NegativeRule(Component):
    """Negatives above a threshold re-weighted; threshold f(θ_y) or the unguarded margin (mask_against='margin')."""

    def threshold(self, target: Target, cos_y: Tensor) -> Tensor:
        return target.mask(cos_y) if self.p.mask_against == "margin" else target.f(cos_y)


class MVNegatives(NegativeRule):
    """Mis-classified negatives g(c) = c + t (fixed) or (t + 1)·c + t (adaptive) (MV-Softmax arXiv 1912.00833)."""

    name = "MV-Softmax negatives"

    def rule(self, head):
        return self.p.rule, self.p.t


class CurricularNegatives(NegativeRule):
    """Hard negatives g(c) = c·(t + c), t an EMA of cos θ_y in buffer `curricular_t` (CurricularFace 2004.00288)."""

    name = "CurricularFace negatives"

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("curricular_t", torch.tensor(float(self.p.t)))

    def update(self, head, step):
        mom = self.p.momentum
        head.curricular_t.mul_(1.0 - mom).add_(mom * step.cos_y.mean().to(head.curricular_t.dtype))

    def rule(self, head):
        return "curricular", head.curricular_t


NEGATIVE_RULES: dict[str, type[Component]] = {
    "mv-fixed": MVNegatives, "mv-adaptive": MVNegatives, "curricular": CurricularNegatives,
}


# ---------------------------------------------------------------------- modulation
class SearchModulation(Component):
    """Fixed a ≤ 0 (one, or one per bin of p) in buffer `modulation_a` (Search-Softmax arXiv 2007.06542 Eq. 8)."""

    name = "Search-Softmax modulation"

    def register(self, head, num_classes, embedding_size):
        head.register_buffer("modulation_a", torch.tensor(self.p.a, dtype=torch.float64), persistent=False)

    def factor(self, head, step, scale):
        return head.modulation_a.to(scale.dtype)


class RandomSoftmaxModulation(Component):
    """a = −|σ·N(0, 1)|·e^{s/3} drawn each training step, its mean in eval (Random-Softmax arXiv 2007.06542)."""

    name = "Random-Softmax modulation"

    def factor(self, head, step, scale):
        if step.training:
            x = self.p.sigma * step.draw(()).abs().to(scale.dtype)
        else:
            x = scale.new_tensor(self.p.sigma * math.sqrt(2.0 / math.pi))  # E|N(0, sigma)|
        return (-x * torch.exp(scale.detach() / 3.0)).reshape(1)


# ---------------------------------------------------------------------- the table
COMPONENTS: dict[type, Callable[[Any], Component]] = {
    AngularMargin: AngularTarget,
    SphereFacePsi: SphereFaceTarget,
    PiecewiseLinear: PiecewiseTarget,
    ProbabilityModulation: SearchModulation,
    RandomModulation: RandomSoftmaxModulation,
    NegativeTransform: lambda p: NEGATIVE_RULES[p.rule](p),
    KappaMargin: KappaClassMargin,
    ElasticMargin: ElasticSampleMargin,
    AdaFaceMargin: AdaFaceSampleMargin,
    MagFaceMargin: MagFaceSampleMargin,
}

# Hook order of one step (and of its random draws).
ORDER = ("target", "class_margin", "sample_margin", "negative", "modulation")


def register_component(slot: str) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass that is its own `Component` joins `slot` of `MarginSpec` under its `kind`."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")

    def decorate(cls: type) -> type:
        if not issubclass(cls, Component):
            raise TypeError(f"{cls.__name__} must subclass losses.components.Component")
        SLOTS[slot][getattr(cls, "kind")] = cls  # noqa: B009  (a ClassVar of the dataclass)
        COMPONENTS[cls] = lambda p: p   # the spec value is its own behaviour; hooks read self.p
        cls.p = property(lambda self: self)
        return cls
    return decorate


def components_of(spec: MarginSpec) -> dict[str, Component]:
    """The behaviour object of each non-empty slot of `spec`, in hook order."""
    out = {}
    for slot in ORDER:
        part = getattr(spec, slot)
        if part is not None:
            out[slot] = COMPONENTS[type(part)](part)
    return out


def register_buffers(head: nn.Module, parts: dict[str, Component], num_classes: int, embedding_size: int) -> None:
    """Every component's buffers on `head`."""
    for part in parts.values():
        part.register(head, num_classes, embedding_size)


def summed_buffers(parts: dict[str, Component]) -> tuple[str, ...]:
    """Names of the head's buffers that are per-rank sums (all-reduce without averaging)."""
    return tuple(name for part in parts.values() for name in part.summed_buffers)


def unsupported_by_sharded(parts: dict[str, Component]) -> list[str]:
    """Names of the components the sharded head does not compute exactly."""
    return [part.name for part in parts.values() if not part.sharded]


@torch.no_grad()
def update_statistics(head: nn.Module, parts: dict[str, Component], step: Step) -> None:
    """Each component's per-step statistics (training mode only, before use)."""
    for part in parts.values():
        part.update(head, step)


@torch.no_grad()
def end_epoch(head: nn.Module, parts: dict[str, Component]) -> None:
    """Each component's epoch hook."""
    for part in parts.values():
        part.end_epoch(head)


def plan(head: nn.Module, parts: dict[str, Component], step: Step, scale: Tensor) -> Plan:
    """One step's plan: update the statistics (training), then margins, target, negatives and factor in `ORDER`."""
    if step.training:
        update_statistics(head, parts, step)
    target = parts["target"]
    m2, m3 = target.base_margins()
    extra: Tensor | float = 0.0
    for slot in ("class_margin", "sample_margin"):
        if slot in parts:
            m2, m3 = parts[slot].margins(head, step, m2, m3)
            extra = extra + parts[slot].extra_loss(head, step)
    tgt = target.transform(head, step, m2, m3)
    rule: str | None = None
    t: Tensor | float = 0.0
    threshold: Tensor | None = None
    if "negative" in parts:
        rule, t = parts["negative"].rule(head)
        with torch.no_grad():
            threshold = parts["negative"].threshold(tgt, step.cos_y)
    a = parts["modulation"].factor(head, step, scale) if "modulation" in parts else None
    extra_t = extra if isinstance(extra, Tensor) else step.cos_y.new_tensor(extra)
    return Plan(tgt.f, rule, t, threshold, a, extra_t, tgt.cos_clamp)
