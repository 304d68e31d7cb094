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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import components as K
from . import transforms as T
from .chunked import inverse_norms, negative_logsumexp, target_cosines
from .partial_fc import check_sample_rate, sample_classes
from .spec import MarginSpec

__all__ = ["MarginSoftmax", "target_logit_curve", "margin_loss"]


def margin_loss(z_y: Tensor, lse_neg: Tensor, a: Tensor | None) -> Tensor:
    """Mean −log p_m from the scaled target logit and the negatives' log-sum-exp; a modulating factor a shifts the
    target (arXiv 2007.06542 Eq. 8)."""
    if a is not None:
        with torch.no_grad():
            p = torch.exp(z_y - torch.logaddexp(lse_neg, z_y))
        z_y = z_y - T.probability_shift(p, a)
    return (torch.logaddexp(lse_neg, z_y) - z_y).mean()


def _draw(like: Tensor) -> Callable[[tuple[int, ...]], Tensor]:
    return lambda shape: torch.randn(shape, device=like.device, dtype=torch.float32)


class MarginSoftmax(nn.Module):
    """Cross-entropy on margin-transformed cosine logits for any `MarginSpec` (arXiv 2007.06542).

    `weight` [num_classes, embedding_size] holds the class centres. Cosines and the
    cross-entropy are computed in float32 (float64 if the inputs are float64), autocast or not.
    `class_chunk`: classes per step of the loss (None: all at once); `sample_rate`: Partial FC
    fraction of classes per training step (1: all). Both change memory and speed, not the loss.
    Each spec component's behaviour (buffers, statistics, transform) is one object of
    `losses.components` (`self.parts`).
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
        self.parts = K.components_of(spec)
        K.register_buffers(self, self.parts, num_classes, embedding_size)

    def extra_repr(self) -> str:
        options = "".join([f", class_chunk={self.class_chunk}" if self.class_chunk is not None else "",
                           f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else ""])
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}{options}, spec={self.spec}"

    # ------------------------------------------------------------------ public API
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the batch from un-normalised embeddings [B, D] and labels [B]."""
        x, w, labels = self._checked_inputs(embeddings, labels)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_unit, norms = self._unit(x)
            local = labels
            if self.training and self.sample_rate < 1.0:
                index, local = sample_classes(labels, self.num_classes, self.sample_rate)
                w = w.index_select(0, index)
            with torch.no_grad():
                cos_y = target_cosines(x_unit, w, local)
            scale = self.scale.to(x.dtype)
            plan = self._plan(x_unit, norms, labels, cos_y, scale)
            lse_neg, cos_y = negative_logsumexp(x_unit, w, local, scale, plan.threshold, plan.rule, plan.t,
                                                self.class_chunk, plan.cos_clamp)
            return margin_loss(scale * plan.f(cos_y), lse_neg, plan.a) + plan.extra

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Final scaled logits [B, C] over all classes: `F.cross_entropy(logits, labels)` is the loss when the spec
        adds no regulariser."""
        x, w, labels = self._checked_inputs(embeddings, labels)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_unit, norms = self._unit(x)
            cos = ((x_unit @ w.t()) * inverse_norms(w)).clamp(-1.0, 1.0)
            cos_y = cos.gather(1, labels[:, None]).squeeze(1)
            scale = self.scale.to(x.dtype)
            plan = self._plan(x_unit, norms, labels, cos_y.detach(), scale)
            f = plan.f(cos_y)
            cos = T.clamp_cos(cos, plan.cos_clamp)
            if plan.rule is None:
                out = T.insert_target(cos, labels, f)
            else:
                out = T.transform_negatives(cos, labels, f, plan.rule, plan.t, plan.threshold)
            z = out * scale
            if plan.a is not None:
                z_y = z.gather(1, labels[:, None]).squeeze(1)
                z = z.scatter(1, labels[:, None], (z_y - T.modulation_shift(z, labels, plan.a))[:, None])
        return z

    def cosines(self, embeddings: Tensor) -> Tensor:
        """Plain cosine similarities [B, C] to the class centres, float32 or wider."""
        x, w = self._compute_inputs(embeddings)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()

    def end_epoch(self) -> None:
        """Epoch hook: each component's (KappaFace recomputes its per-class ψ from the epoch's class statistics)."""
        K.end_epoch(self, self.parts)

    def summed_buffers(self) -> tuple[str, ...]:
        """Names of this head's buffers that are per-rank sums: a data-parallel trainer all-reduces them without
        averaging."""
        return K.summed_buffers(self.parts)

    # ------------------------------------------------------------------ the pipeline
    def _compute_inputs(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {list(embeddings.shape)}")
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        return embeddings.to(dtype), self.weight.to(dtype)

    def _checked_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings and centres in float32 or wider, and the labels as int64, after checking their shapes and
        range."""
        x, w = self._compute_inputs(embeddings)
        self._check_labels(labels, x.shape[0])
        return x, w, labels.long()

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape [{batch}], "
                             f"got {labels.dtype} {list(labels.shape)}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got [{int(labels.min())}, {int(labels.max())}]")

    @staticmethod
    def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
        norms = x.norm(dim=1)
        return x / norms.clamp_min(1e-12)[:, None], norms

    def _plan(self, x_unit: Tensor, norms: Tensor, labels: Tensor, cos_y: Tensor, scale: Tensor) -> K.Plan:
        """The preparation step `forward` and `logits` share: statistics, margins, target, negatives, factor."""
        step = K.Step(labels, norms, x_unit.detach(), cos_y, self.training, _draw(cos_y))
        return K.plan(self, self.parts, step, scale)


@torch.no_grad()
def target_logit_curve(spec: MarginSpec, theta_rad: Tensor, feature_norm: float | None = None) -> Tensor:
    """Target logit / s against θ (radians) in eval mode, as papers plot it.

    The only negative class is orthogonal (cos 0), which fixes p for a binned modulating factor;
    `feature_norm` defaults to 20 for AdaFace (ẑ = 0 at its initial statistics), the middle of
    [l_a, u_a] for MagFace and 1 otherwise. Per-class ψ (KappaFace) is at its initial value 1;
    SphereFace is at its annealed λ = lambda_min.
    """
    head = MarginSoftmax(spec, 3, 2).double().eval()
    for part in head.parts.values():
        feature_norm = part.for_curve(head, feature_norm)
    # annealed: λ = lambda_min, the curve SphereFace trains towards
    feature_norm = 1.0 if feature_norm is None else feature_norm
    head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    theta = theta_rad.double()
    x = feature_norm * torch.stack([torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)], dim=1)
    labels = torch.zeros(theta.shape[0], dtype=torch.long)
    return head.logits(x, labels)[:, 0] / head.scale.double()
