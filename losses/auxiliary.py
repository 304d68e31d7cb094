"""Auxiliary terms added beside a margin head with a weight: Range, Center, DDL and IntraLoss.

Each is an `nn.Module` whose `forward(embeddings, labels)` returns a scalar from the
un-normalised embeddings of one batch, and whose value is 0 (with a gradient of 0, never NaN)
when the batch holds nothing for it to act on (a single class, no repeated identity, no hard
pair). Distances are taken between L2-normalised embeddings unless `normalize=False`: a margin
head judges directions, so the terms act on the same unit hypersphere (so their margins are in
unit-sphere units: squared distances lie in [0, 4], cosines in [−1, 1]).
Combine with a head through `losses.WithAuxiliary`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RangeLoss", "CenterLoss", "DistributionDistillationLoss", "IntraLoss", "AUXILIARY", "AuxiliaryInfo",
           "build_auxiliary"]

_EPS = 1e-12


def _maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=1, eps=_EPS) if normalize else x


def _zero(x: Tensor) -> Tensor:
    """A zero that keeps the graph (so `backward` works and the gradient is exactly 0)."""
    return x.sum() * 0.0


def _pairwise_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances by explicit differences (exact at 0, unlike the Gram trick)."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


class RangeLoss(nn.Module):
    """Range loss (Zhang et al., arXiv 1611.08976): α·L_intra + β·L_inter for long-tailed data.

    L_intra = Σ over classes with ≥ 2 samples in the batch of k / Σ_{j≤k} 1/D_j, the harmonic
    mean of its k largest intra-class (Euclidean) distances D_j (all of them if a class has
    fewer than k pairs); L_inter = max(margin − D_center, 0), D_center the smallest squared
    distance between two class means of the batch. `margin` is in squared-distance units.
    """

    def __init__(self, k: int = 2, margin: float = 0.5, alpha: float = 1.0, beta: float = 1.0,
                 normalize: bool = True) -> None:
        super().__init__()
        if k < 1 or margin < 0:
            raise ValueError(f"RangeLoss needs k ≥ 1 and margin ≥ 0, got k={k}, margin={margin}")
        self.k, self.margin, self.alpha, self.beta, self.normalize = k, margin, alpha, beta, normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = _maybe_normalize(embeddings, self.normalize)
        intra, centres = _zero(x), []
        for c in torch.unique(labels):
            xc = x[labels == c]
            centres.append(xc.mean(0))
            n = xc.shape[0]
            if n < 2:
                continue
            i, j = torch.triu_indices(n, n, offset=1, device=x.device)
            d = (xc[i] - xc[j]).pow(2).sum(-1).clamp_min(_EPS).sqrt()
            top = torch.topk(d, min(self.k, d.numel())).values
            intra = intra + top.numel() / (1.0 / top.clamp_min(1e-6)).sum()
        inter = _zero(x)
        if len(centres) >= 2:
            m = torch.stack(centres)
            i, j = torch.triu_indices(len(centres), len(centres), offset=1, device=x.device)
            d_center = (m[i] - m[j]).pow(2).sum(-1).min()
            inter = torch.relu(self.margin - d_center)
        return self.alpha * intra + self.beta * inter


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): ½·mean_i |x_i − c_{y_i}|², centres moved per batch.

    The centres are a buffer (saved in `state_dict`), updated in training mode after the loss
    is taken, by the paper's rule c_j ← c_j − α·Σ_{y_i=j}(c_j − x_i) / (1 + n_j). The paper sums
    over the batch; this is the batch mean, so its λ is the paper's λ times the batch size.
    """

    centers: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.5, normalize: bool = True) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CenterLoss centre rate alpha must lie in [0, 1], got {alpha}")
        self.alpha, self.normalize = alpha, normalize
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = _maybe_normalize(embeddings, self.normalize)
        c = self.centers[labels].to(x.dtype)
        loss = 0.5 * (x - c).pow(2).sum(1).mean()
        if self.training and self.alpha > 0:
            with torch.no_grad():
                diff = torch.zeros_like(self.centers).index_add_(0, labels, (c - x).to(self.centers.dtype))
                count = torch.bincount(labels, minlength=self.centers.shape[0]).to(self.centers.dtype)
                self.centers -= self.alpha * diff / (1.0 + count)[:, None]
        return loss


def _soft_histogram(s: Tensor, centres: Tensor, bandwidth: float) -> Tensor:
    """Gaussian-kernel histogram of the similarities `s` over `centres`, summing to 1."""
    h = torch.exp(-0.5 * ((s[:, None] - centres[None, :]) / bandwidth).pow(2)).sum(0)
    return h / h.sum().clamp_min(_EPS)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p ‖ q) of two histograms, with empty bins of p contributing 0."""
    return (p * (torch.log(p.clamp_min(_EPS)) - torch.log(q.clamp_min(_EPS)))).sum()


class DistributionDistillationLoss(nn.Module):
    """Distribution Distillation Loss (Huang et al., arXiv 2002.03662): hard pairs learn the easy pairs' similarity
    distributions.

    Pairs of the batch are split into a teacher (easy) and a student (hard) branch; the cosine
    similarities of positive and negative pairs of each branch become soft histograms (Gaussian
    kernel of `bandwidth`, `bins` centres on `value_range`). L = λ1·KL(P+ ‖ Q+) + λ2·KL(P− ‖ Q−)
    + λ3·mean over (teacher|student)² of (E[S−] − E[S+]). The teacher is detached (the public
    code forgets it). With `hard` sample flags, student pairs are those touching a hard sample;
    without, positives below and negatives above their median similarity are the student.
    """

    centres: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, bins: int = 1000, bandwidth: float = 0.1, value_range: tuple[float, float] = (0.0, 1.0),
                 lambdas: tuple[float, float, float] = (0.1, 0.02, 0.5)) -> None:
        super().__init__()
        if bins < 2 or bandwidth <= 0 or value_range[0] >= value_range[1]:
            raise ValueError(f"DDL needs bins ≥ 2, bandwidth > 0 and an increasing value_range, "
                             f"got {bins}, {bandwidth}, {value_range}")
        self.bandwidth, self.lambdas = bandwidth, tuple(float(v) for v in lambdas)
        self.register_buffer("centres", torch.linspace(value_range[0], value_range[1], bins, dtype=torch.float64),
                             persistent=False)

    def forward(self, embeddings: Tensor, labels: Tensor, hard: Tensor | None = None) -> Tensor:
        x = F.normalize(embeddings, dim=1, eps=_EPS)
        n = x.shape[0]
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        s = (x[i] * x[j]).sum(-1)
        same = labels[i] == labels[j]
        if hard is not None:
            hard = hard.to(torch.bool)
            student = hard[i] | hard[j]
            branches = {"pos": (same & ~student, same & student), "neg": (~same & ~student, ~same & student)}
        else:
            branches = {"pos": _median_split(s, same, low_is_hard=True),
                        "neg": _median_split(s, ~same, low_is_hard=False)}
        centres = self.centres.to(s.dtype)
        loss, means = _zero(x), {}
        for kind, weight in (("pos", self.lambdas[0]), ("neg", self.lambdas[1])):
            teacher, student = branches[kind]
            st, ss = s[teacher].detach(), s[student]
            means[kind] = [v.mean() for v in (st, ss) if v.numel()]
            if st.numel() and ss.numel():
                p = _soft_histogram(st, centres, self.bandwidth)
                q = _soft_histogram(ss, centres, self.bandwidth)
                loss = loss + weight * _kl(p, q)
        if means["pos"] and means["neg"]:
            order = torch.stack([neg - pos for pos in means["pos"] for neg in means["neg"]]).mean()
            loss = loss + self.lambdas[2] * order
        return loss


def _median_split(s: Tensor, mask: Tensor, low_is_hard: bool) -> tuple[Tensor, Tensor]:
    """(teacher, student) masks splitting the pairs of `mask` at their median similarity."""
    if int(mask.sum()) < 2:
        return mask, torch.zeros_like(mask)
    median = s[mask].detach().median()
    hard = (s < median) if low_is_hard else (s > median)
    return mask & ~hard, mask & hard


class IntraLoss(nn.Module):
    """Interpretation of IntraLoss (arXiv 2107.03352, only the abstract is public): shrink each class along its most
    spread direction.

    For every class with ≥ 2 samples in the batch: the variance of its normalised embeddings
    along the class's top `directions` principal axes (found without gradient), relative to
    the mean variance per axis when `relative`; averaged over classes. The gradient moves each
    sample toward its class mean along those axes, harder where the class is anisotropic: the
    "gradient-enhancing term against intra-class anisotropy" of the abstract, as we read it.
    """

    def __init__(self, directions: int = 1, normalize: bool = True) -> None:
        super().__init__()
        if directions < 1:
            raise ValueError(f"IntraLoss needs directions ≥ 1, got {directions}")
        self.directions, self.normalize = directions, normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = _maybe_normalize(embeddings, self.normalize)
        terms = []
        for c in torch.unique(labels):
            xc = x[labels == c]
            if xc.shape[0] < 2:
                continue
            centred = xc - xc.mean(0)
            with torch.no_grad():
                cov = centred.t() @ centred / xc.shape[0]
                axes = torch.linalg.eigh(cov.double()).eigenvectors[:, -self.directions:].to(x.dtype)
            terms.append((centred @ axes).pow(2).mean(0).sum())
        return torch.stack(terms).mean() if terms else _zero(x)


@dataclass(frozen=True)
class AuxiliaryInfo:
    """One row of the auxiliary table: how to build the term and where it comes from."""

    citation: str
    build: Callable[..., nn.Module]
    needs_classes: bool = False  # build(num_classes=, embedding_size=, **params)


AUXILIARY: dict[str, AuxiliaryInfo] = {
    "range": AuxiliaryInfo("Zhang et al., Range Loss, ICCV 2017 (arXiv 1611.08976)", RangeLoss),
    "center": AuxiliaryInfo("Wen et al., Center Loss, ECCV 2016", CenterLoss, needs_classes=True),
    "ddl": AuxiliaryInfo("Huang et al., Distribution Distillation Loss, CVPR 2020 (arXiv 2002.03662)",
                         DistributionDistillationLoss),
    "intra": AuxiliaryInfo("IntraLoss, arXiv 2107.03352 (interpretation of the abstract)", IntraLoss),
}


def build_auxiliary(name: str, num_classes: int, embedding_size: int, **params: float) -> nn.Module:
    """The auxiliary term `name` of `AUXILIARY` with `params`; a clear ValueError for unknown names or parameters."""
    if name not in AUXILIARY:
        raise ValueError(f"unknown auxiliary loss {name!r}; known: {', '.join(AUXILIARY)}")
    info = AUXILIARY[name]
    try:
        if info.needs_classes:
            return info.build(num_classes=num_classes, embedding_size=embedding_size, **params)
        return info.build(**params)
    except TypeError as exc:
        raise ValueError(f"auxiliary loss {name!r}: {exc}") from None
