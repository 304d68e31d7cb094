"""`MarginSoftmax`: the unified margin-softmax head (Loss Function Search, arXiv 2007.06542).

The head owns the class centres and any running statistics; the arithmetic lives in the pure
functions of `losses.transforms`. One call of `forward` (or `logits`) in training mode is one
step: stateful points (SphereFace's λ, CurricularFace's t, KappaFace's class statistics,
AdaFace's norm statistics) update their buffers then, before use, as their papers do.

Randomness (ElasticFace, Random-Softmax, Partial FC) draws from torch's default generator in a
fixed order: the Partial FC class sample `torch.rand(C)` (training `forward` with sample_rate < 1)
first, then per-sample margins `torch.randn(B)`, then the modulating factor `torch.randn(())`,
float32 on the embeddings' device. In eval mode draws are replaced by their means.

Speed and scale: `forward` never builds normalised centres or a one-hot; it computes the
log-sum-exp of the negative logits in one `torch.autograd.Function` (`losses.chunked`) with the
target transform under autograd outside it. `class_chunk=N` bounds the live logits to [B, N]
(values and gradients equal to the full head up to rounding); `sample_rate=r` trains each step on
the batch's classes plus uniformly sampled others, ceil(r·C) in all (Partial FC, `losses.partial_fc`;
eval uses every class). `logits()` always materialises all C classes, whatever the two options.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transforms as T
from .chunked import inverse_norms, negative_logsumexp, target_cosines
from .partial_fc import check_sample_rate, sample_classes
from .spec import (
    AdaFaceMargin,
    AngularMargin,
    ElasticMargin,
    MagFaceMargin,
    MarginSpec,
    PiecewiseLinear,
    ProbabilityModulation,
    RandomModulation,
    SphereFacePsi,
)

__all__ = ["MarginSoftmax", "target_logit_curve"]


def register_spec_buffers(module: nn.Module, spec: MarginSpec, num_classes: int, embedding_size: int) -> None:
    """The buffers a spec's components need: running state (saved in state_dict) and tabulated constants (not saved)."""
    target, neg = spec.target, spec.negative
    if isinstance(target, SphereFacePsi):
        module.register_buffer("step", torch.zeros((), dtype=torch.long))
    if isinstance(target, PiecewiseLinear):
        module.register_buffer("slopes", torch.tensor(target.slopes, dtype=torch.float64), persistent=False)
        module.register_buffer("intercepts", torch.tensor(target.intercepts, dtype=torch.float64), persistent=False)
    if isinstance(spec.modulation, ProbabilityModulation):
        module.register_buffer("modulation_a", torch.tensor(spec.modulation.a, dtype=torch.float64), persistent=False)
    if neg is not None and neg.rule == "curricular":
        module.register_buffer("curricular_t", torch.tensor(float(neg.t)))
    if spec.class_margin is not None:
        module.register_buffer("kappa_psi", torch.ones(num_classes))
        module.register_buffer("kappa_feature_sum", torch.zeros(num_classes, embedding_size))
        module.register_buffer("kappa_count", torch.zeros(num_classes))
    if isinstance(spec.sample_margin, AdaFaceMargin):
        module.register_buffer("norm_mean", torch.tensor(20.0))
        module.register_buffer("norm_std", torch.tensor(100.0))


def margin_loss(z_y: Tensor, lse_neg: Tensor, a: Tensor | None) -> Tensor:
    """Mean −log p_m from the scaled target logit and the negatives' log-sum-exp; a modulating factor a shifts the target (arXiv 2007.06542 Eq. 8)."""
    if a is not None:
        with torch.no_grad():
            p = torch.exp(z_y - torch.logaddexp(lse_neg, z_y))
        z_y = z_y - T.probability_shift(p, a)
    return (torch.logaddexp(lse_neg, z_y) - z_y).mean()


def add_sample_margins(head: nn.Module, m2: Tensor | float, m3: Tensor | float, norms: Tensor, like: Tensor,
                       draw: Callable[[], Tensor]) -> tuple[Tensor | float, Tensor | float, Tensor]:
    """m2 (radians) and m3 (cosine units) plus the spec's per-sample margins, and MagFace's regulariser (else 0).

    ElasticFace (arXiv 2109.09416) perturbs them by sigma·`draw()` in training (its mean, 0, in eval);
    AdaFace (arXiv 2204.00964) shifts them by the feature norm against the head's running norm
    statistics; MagFace (arXiv 2103.06627) adds a norm-dependent angular margin.
    """
    sm, extra = head.spec.sample_margin, like.new_zeros(())
    if isinstance(sm, ElasticMargin):
        noise = draw().to(like.dtype) if head.training else like.new_zeros(like.shape[0])
        if sm.on == "angular":
            m2 = m2 + sm.sigma * noise
        else:
            m3 = m3 + sm.sigma * noise
    elif isinstance(sm, AdaFaceMargin):
        d2, d3 = T.adaface_offsets(norms, head.norm_mean.to(like.dtype), head.norm_std.to(like.dtype), sm.m, sm.h)
        m2, m3 = m2 + d2, m3 + d3
    elif isinstance(sm, MagFaceMargin):
        m2 = m2 + T.magface_margin(norms, sm.l_a, sm.u_a, sm.l_m, sm.u_m)
        extra = sm.lambda_g * T.magface_regularizer(norms, sm.l_a, sm.u_a)
    return m2, m3, extra


def modulation_factor(head: nn.Module, scale: Tensor, draw: Callable[[], Tensor]) -> Tensor | None:
    """This step's modulating factor a ≤ 0 (arXiv 2007.06542): Search-Softmax's (one, or one per bin of p), Random-Softmax's −|σ·draw()|·e^{s/3} (eval: its mean), or None."""
    mod = head.spec.modulation
    if isinstance(mod, ProbabilityModulation):
        return head.modulation_a.to(scale.dtype)
    if isinstance(mod, RandomModulation):
        if head.training:
            x = mod.sigma * draw().abs().to(scale.dtype)
        else:
            x = scale.new_tensor(mod.sigma * math.sqrt(2.0 / math.pi))  # E|N(0, sigma)|
        return (-x * torch.exp(scale.detach() / 3.0)).reshape(1)
    return None


class MarginSoftmax(nn.Module):
    """Cross-entropy on margin-transformed cosine logits for any `MarginSpec` (arXiv 2007.06542).

    `weight` [num_classes, embedding_size] holds the class centres. Cosines and the
    cross-entropy are computed in float32 (float64 if the inputs are float64), autocast or not.
    `class_chunk`: classes per step of the loss (None: all at once); `sample_rate`: Partial FC
    fraction of classes per training step (1: all). Both change memory and speed, not the loss.
    """

    def __init__(self, spec: MarginSpec, embedding_size: int, num_classes: int, *,
                 class_chunk: int | None = None, sample_rate: float = 1.0) -> None:
        super().__init__()
        if not isinstance(spec, MarginSpec):
            raise TypeError(f"spec must be a MarginSpec, got {type(spec).__name__}")
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(f"need embedding_size ≥ 1 and num_classes ≥ 2, got {embedding_size}, {num_classes}")
        if class_chunk is not None and (isinstance(class_chunk, bool) or not isinstance(class_chunk, int)
                                        or class_chunk < 1):
            raise ValueError(f"class_chunk must be a positive integer or None, got {class_chunk!r}")
        self.class_chunk = class_chunk
        self.sample_rate = check_sample_rate(sample_rate)
        self.spec = spec
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))
        if spec.learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(spec.s)))
        else:
            self.register_buffer("scale", torch.tensor(float(spec.s)), persistent=False)
        register_spec_buffers(self, spec, num_classes, embedding_size)

    def extra_repr(self) -> str:
        options = "".join([f", class_chunk={self.class_chunk}" if self.class_chunk is not None else "",
                           f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else ""])
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}{options}, spec={self.spec}"

    # ------------------------------------------------------------------ public API
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the batch from un-normalised embeddings [B, D] and labels [B]."""
        x, w, labels = self._checked_inputs(embeddings, labels)
        with torch.autocast(device_type=x.device.type, enabled=False):
            norms = x.norm(dim=1)
            x_unit = x / norms.clamp_min(1e-12)[:, None]
            local = labels
            if self.training and self.sample_rate < 1.0:
                index, local = sample_classes(labels, self.num_classes, self.sample_rate)
                w = w.index_select(0, index)
            with torch.no_grad():
                cos_y = target_cosines(x_unit, w, local)
            if self.training:
                self._update_statistics(x_unit, norms, cos_y, labels)
            target_fn, extra = self._target_fn(labels, norms, cos_y)
            neg = self.spec.negative
            rule, t, threshold = None, 0.0, None
            if neg is not None:
                rule, t = neg.rule, (self.curricular_t if neg.rule == "curricular" else neg.t)
                with torch.no_grad():
                    threshold = target_fn(cos_y)
            scale = self.scale.to(x.dtype)
            lse_neg, cos_y = negative_logsumexp(x_unit, w, local, scale, threshold, rule, t, self.class_chunk)
            z_y = scale * target_fn(cos_y)
            return margin_loss(z_y, lse_neg, self._modulation_a(scale)) + extra

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Final scaled logits [B, C] over all classes: `F.cross_entropy(logits, labels)` is the loss when the spec adds no regulariser."""
        return self._scaled_logits(embeddings, labels)

    def cosines(self, embeddings: Tensor) -> Tensor:
        """Plain cosine similarities [B, C] to the class centres, float32 or wider."""
        x, w = self._compute_inputs(embeddings)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Epoch hook: recompute KappaFace's per-class ψ from this epoch's class statistics, then reset them."""
        cm = self.spec.class_margin
        if cm is None:
            return
        psi, seen = T.kappa_psi(self.kappa_feature_sum.double(), self.kappa_count.double(), cm.T, cm.gamma)
        self.kappa_psi.copy_(torch.where(seen, psi.to(self.kappa_psi.dtype), self.kappa_psi))
        self.kappa_feature_sum.zero_()
        self.kappa_count.zero_()

    # ------------------------------------------------------------------ the pipeline
    def _compute_inputs(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {list(embeddings.shape)}")
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        return embeddings.to(dtype), self.weight.to(dtype)

    def _checked_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings and centres in float32 or wider, and the labels as int64, after checking their shapes and range."""
        x, w = self._compute_inputs(embeddings)
        self._check_labels(labels, x.shape[0])
        return x, w, labels.long()

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape [{batch}], got {labels.dtype} {list(labels.shape)}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")

    def _scaled_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, w, labels = self._checked_inputs(embeddings, labels)
        with torch.autocast(device_type=x.device.type, enabled=False):
            norms = x.norm(dim=1)
            x_unit = x / norms.clamp_min(1e-12)[:, None]
            cos = ((x_unit @ w.t()) * inverse_norms(w)).clamp(-1.0, 1.0)
            cos_y = cos.gather(1, labels[:, None]).squeeze(1)
            if self.training:
                self._update_statistics(x_unit, norms, cos_y, labels)
            target_fn, _ = self._target_fn(labels, norms, cos_y)
            f = target_fn(cos_y)
            neg = self.spec.negative
            if neg is None:
                out = T.insert_target(cos, labels, f)
            else:
                t = self.curricular_t if neg.rule == "curricular" else neg.t
                out = T.transform_negatives(cos, labels, f, neg.rule, t)
            scale = self.scale.to(out.dtype)
            z = out * scale
            a = self._modulation_a(scale)
            if a is not None:
                z_y = z.gather(1, labels[:, None]).squeeze(1)
                z = z.scatter(1, labels[:, None], (z_y - T.modulation_shift(z, labels, a))[:, None])
        return z

    @torch.no_grad()
    def _update_statistics(self, x_unit: Tensor, norms: Tensor, cos_y: Tensor, labels: Tensor) -> None:
        neg, sm = self.spec.negative, self.spec.sample_margin
        if neg is not None and neg.rule == "curricular":
            self.curricular_t.mul_(1.0 - neg.momentum).add_(neg.momentum * cos_y.mean().to(self.curricular_t.dtype))
        if self.spec.class_margin is not None:
            self.kappa_feature_sum.index_add_(0, labels, x_unit.to(self.kappa_feature_sum.dtype))
            self.kappa_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.kappa_count.dtype))
        if isinstance(sm, AdaFaceMargin) and norms.numel() >= 2:
            safe = norms.clamp(0.001, 100.0)
            self.norm_mean.mul_(1.0 - sm.t_alpha).add_(sm.t_alpha * safe.mean().to(self.norm_mean.dtype))
            self.norm_std.mul_(1.0 - sm.t_alpha).add_(sm.t_alpha * safe.std().to(self.norm_std.dtype))

    def _target_fn(self, labels: Tensor, norms: Tensor, like: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """(f: cos θ_y [B] → transformed target cosine [B], any additive loss term such as MagFace's).

        Steps SphereFace's λ and draws ElasticFace's margins once; f itself is pure.
        """
        target = self.spec.target
        zero = like.new_zeros(())
        if isinstance(target, SphereFacePsi):
            lam = T.sphereface_lambda(int(self.step), target.base, target.gamma, target.power, target.lambda_min)
            if self.training:
                self.step.add_(1)
            return (lambda cos_y: T.sphereface_target(cos_y, target.m, lam)), zero
        if isinstance(target, PiecewiseLinear):
            slopes, intercepts = self.slopes.to(like.dtype), self.intercepts.to(like.dtype)
            return (lambda cos_y: T.piecewise_target(cos_y, slopes, intercepts)), zero
        assert isinstance(target, AngularMargin)
        m2, m3, extra = self._target_margins(target, labels, norms, like)
        return (lambda cos_y: T.angular_target(cos_y, target.m1, m2, m3, target.guard, target.straight_through)), extra

    def _target_margins(self, target: AngularMargin, labels: Tensor, norms: Tensor,
                        like: Tensor) -> tuple[Tensor | float, Tensor | float, Tensor]:
        """(m2 radians, m3 cosine units), scalars or per sample, after class and sample adaptation."""
        m2: Tensor | float = target.m2_rad
        m3: Tensor | float = target.m3_cos
        if self.spec.class_margin is not None:
            psi = self.kappa_psi.to(like.dtype)[labels]
            m2, m3 = psi * m2, psi * m3
        draw = lambda: torch.randn(like.shape[0], device=like.device, dtype=torch.float32)  # noqa: E731
        m2, m3, extra = add_sample_margins(self, m2, m3, norms, like, draw)
        return m2, m3, extra

    def _modulation_a(self, scale: Tensor) -> Tensor | None:
        """The modulating factor(s) a of this step (one value, or one per bin of p), or None."""
        return modulation_factor(self, scale, lambda: torch.randn((), device=scale.device, dtype=torch.float32))


@torch.no_grad()
def target_logit_curve(spec: MarginSpec, theta_rad: Tensor, feature_norm: float | None = None) -> Tensor:
    """Target logit / s against θ (radians) in eval mode, as papers plot it.

    The only negative class is orthogonal (cos 0), which fixes p for a binned modulating factor;
    `feature_norm` defaults to 20 for AdaFace (ẑ = 0 at its initial statistics), the middle of
    [l_a, u_a] for MagFace and 1 otherwise. Per-class ψ (KappaFace) is at its initial value 1;
    SphereFace is at its annealed λ = lambda_min.
    """
    sm = spec.sample_margin
    if feature_norm is None:
        feature_norm = {AdaFaceMargin: 20.0}.get(type(sm), 1.0)
        if isinstance(sm, MagFaceMargin):
            feature_norm = (sm.l_a + sm.u_a) / 2.0
    head = MarginSoftmax(spec, 3, 2).double().eval()
    if isinstance(spec.target, SphereFacePsi):
        head.step.fill_(2**62)  # annealed: λ = lambda_min, the curve SphereFace trains towards
    head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    theta = theta_rad.double()
    x = feature_norm * torch.stack([torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)], dim=1)
    labels = torch.zeros(theta.shape[0], dtype=torch.long)
    return head.logits(x, labels)[:, 0] / head.scale.double()
