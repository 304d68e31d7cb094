"""Independent reference implementations of the named margin losses, for the tests.

Written from the papers' formulas (the citations of `marginsearch.losses.NAMED`; docs/fidelity.md
for the official code)
and from the documented conventions of the library (θ clamp, guards, draw order, state updates),
NOT from `losses/transforms.py` or the private methods of `losses/head.py`. Each reference is a
short function of (embeddings, class centres, labels, parameters) in plain torch, differentiable
with autograd, and carries its own running state (CurricularFace t, SphereFace step, KappaFace
class statistics and ψ, AdaFace μ and σ).

Deliberately different forms from the "shifted logit" view the library uses:
- Search-/Random-Softmax are written as the paper's p_m = p / (a·p + 1 − a), loss = −log p_m
  (computed stably with log-sum-exp), not as a target-logit shift;
- SV-Softmax multiplies a support vector's exponential by e^{s(t_SV − 1)(c + 1)} (SV notation),
  not as the MV formula.

A reference call returns `RefOut(logits, logp, loss)`: `logits` [B, C] (NaN where the reference
has no logit, i.e. the target column of the modulated losses), `logp` [B] the log-probability of
the target under the loss, `loss` the mean loss (plus any regulariser).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ACOS_EPS = 1e-7
PI = math.pi

# Defaults as published / documented (losses.md §1, §3 and the named table's docs), written out
# here so that a change of a library default is caught. Since issue #14 each named point defaults to
# its official code's flavour (notes/fidelity_facts.md): the extra keys select it.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "normface": {"s": 64.0},
    "cosface": {"s": 64.0, "m": 0.35},
    "arcface": {"s": 64.0, "m": 0.5, "guard": "fallback", "straight_through": False},
    "combined": {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2, "guard": "none"},
    "sphereface": {"s": 64.0, "m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0,
                   "lambda_step": "current"},
    "mv-am": {"s": 32.0, "m": 0.35, "t": 0.2, "adaptive": True, "easy_margin": True, "mask_against": "margin"},
    "mv-arc": {"s": 32.0, "m": 0.35, "t": 0.2, "adaptive": True, "guard": "easy", "mask_against": "margin"},
    "sv-am": {"s": 32.0, "m": 0.35, "t": 1.2, "easy_margin": True, "mask_against": "margin"},
    "sv-arc": {"s": 32.0, "m": 0.35, "t": 1.2, "guard": "easy", "mask_against": "margin"},
    "curricularface": {"s": 64.0, "m": 0.5, "mask_against": "margin"},
    "kappaface": {"s": 64.0, "m0": 0.8, "T": 0.4, "gamma": 0.7, "guard": "none", "r_max": None},
    "search-softmax": {"s": 32.0, "a": None},
    "random-softmax": {"s": 32.0, "sigma": 0.2},
    "am-lfs": {"s": 64.0, "intervals": 6, "slopes": None, "intercepts": None},
    "elasticface-arc": {"s": 64.0, "m": 0.5, "sigma": 0.05, "guard": "none"},
    "elasticface-cos": {"s": 64.0, "m": 0.35, "sigma": 0.05},
    "adaface": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "cos_clamp": 1e-3},
    "magface": {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "guard": "easy"},
}

# Default guard of each point that has an angular margin (the documented table).
GUARD_OF = {"arcface": None, "combined": None, "curricularface": "fallback", "kappaface": None,
            "elasticface-arc": None, "magface": None, "mv-arc": None, "sv-arc": None,
            "adaface": "clip"}


@dataclass
class RefOut:
    logits: Tensor   # [B, C]; NaN where the reference defines no logit
    logp: Tensor     # [B] log-probability of the target under the loss
    loss: Tensor     # scalar mean loss (+ regulariser)


# ---------------------------------------------------------------------------------- formulas
def cos_matrix(x: Tensor, w: Tensor) -> Tensor:
    """c_ij = <x_i/|x_i|, W_j/|W_j|> (F.normalize, eps 1e-12, as documented)."""
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()


def angle(c: Tensor) -> Tensor:
    """θ = acos(clamp(c, −1 + 1e-7, 1 − 1e-7))."""
    return torch.acos(c.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))


def combined_margin(c: Tensor, m1=1.0, m2=0.0, m3=0.0, guard: str = "fallback") -> Tensor:
    """f = cos(m1·θ + m2) − m3 with the guard where m1·θ + m2 leaves [0, π] (insightface / ArcFace)."""
    m2 = torch.as_tensor(m2, dtype=c.dtype)
    m3 = torch.as_tensor(m3, dtype=c.dtype)
    phi = m1 * angle(c) + m2
    if guard == "fallback":   # ArcFace: past π use cos θ − m·sin m
        return torch.where(phi <= PI, torch.cos(phi) - m3, c - m2 * torch.sin(m2) - m3)
    if guard == "easy":       # easy margin: only where cos θ > 0
        return torch.where(c > 0, torch.cos(phi) - m3, c - m3)
    if guard == "easy-all":   # official MV-Softmax easy margin: no margin at all where cos θ ≤ 0
        return torch.where(c > 0, torch.cos(phi) - m3, c)
    if guard == "clip":       # AdaFace: clip the angle to [1e-3, π − 1e-3]
        return torch.cos(phi.clamp(1e-3, PI - 1e-3)) - m3
    if guard == "none":
        return torch.cos(phi) - m3
    raise ValueError(guard)


def sphereface_psi(theta: Tensor, m: int) -> Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k, k = floor(mθ/π) ∈ [0, m − 1] (SphereFace, arXiv 1704.08063)."""
    k = torch.floor(m * theta.detach() / PI).clamp(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * torch.cos(m * theta) - 2.0 * k


def sphereface_lambda(step: int, base: float, gamma: float, power: float, lambda_min: float) -> float:
    return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


def kappa_psi_reference(feature_sum: Tensor, count: Tensor, psi_old: Tensor, dim: int, T: float,
                        gamma: float, r_max: float | None = 0.999) -> Tensor:
    """KappaFace ψ per class from the epoch's class sums (arXiv 2201.12100 and its official code).

    r_max None: the official update_kappa: r̄ unclamped, κ = +inf replaced by the max of the
    other κ, nan_to_num(nan → 0).
    """
    fs, n = feature_sum.double(), count.double()
    seen = n > 0
    psi = psi_old.double().clone()
    if not bool(seen.any()):
        return psi
    r = fs[seen].norm(dim=1) / n[seen]
    if r_max is not None:
        r = r.clamp(max=r_max)
    kappa = r * (dim - r ** 2) / (1.0 - r ** 2)
    if r_max is None:
        replace = kappa[kappa != math.inf].max() if bool((kappa != math.inf).any()) else torch.tensor(0.0).double()
        kappa = torch.nan_to_num(kappa, nan=0.0, posinf=float(replace))
    if int(seen.sum()) >= 2:
        kappa_t = (kappa - kappa.mean()) / kappa.std()
    else:
        kappa_t = torch.zeros_like(kappa)
    w_kappa = 1.0 - torch.sigmoid(T * kappa_t)
    K = 1.05 * n[seen].max()
    w_n = (torch.cos(PI * n[seen] / K) + 1.0) / 2.0
    psi[seen] = gamma * w_kappa + (1.0 - gamma) * w_n
    return psi


def log_target_prob_modulated(z: Tensor, y: Tensor, a: Tensor) -> Tensor:
    """log p_m with p_m = p / (a·p + 1 − a) (LFS Eq. 8), p the softmax target probability of z.

    Stable: log p = z_y − lse(z), 1 − p = exp(lse_{k≠y} z − lse z), so
    log p_m = log p − log(1 − a(1 − p)) = log p − log1p(−a·(1 − p)).
    """
    onehot = F.one_hot(y, z.shape[1]).bool()
    lse = torch.logsumexp(z, dim=1)
    log_p = z.gather(1, y[:, None]).squeeze(1) - lse
    log_one_minus_p = torch.logsumexp(z.masked_fill(onehot, -math.inf), dim=1) - lse
    return log_p - torch.log1p(-a * torch.exp(log_one_minus_p))


# ---------------------------------------------------------------------------------- references
class Reference:
    """Reference of one named loss with its parameters and its own running state."""

    def __init__(self, name: str, num_classes: int, dim: int, **params: Any) -> None:
        unknown = set(params) - set(PAPER_DEFAULTS[name])
        assert not unknown, unknown
        self.name, self.C, self.D = name, num_classes, dim
        self.p = {**PAPER_DEFAULTS[name], **params}
        # state
        self.t = 0.0                                            # CurricularFace
        self.step = 0                                           # SphereFace
        self.psi = torch.ones(num_classes, dtype=torch.float64)  # KappaFace
        self.feature_sum = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mu, self.sigma = 20.0, 100.0                       # AdaFace
        self.last: dict[str, Tensor] = {}                       # f and c of the last call, for tests

    # -- helpers
    def _finish(self, c: Tensor, y: Tensor, f: Tensor, negatives: Tensor | None = None,
                extra: Tensor | float = 0.0) -> RefOut:
        onehot = F.one_hot(y, self.C).bool()
        neg = c if negatives is None else negatives
        logits = self.p["s"] * torch.where(onehot, f[:, None], neg)
        logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        self.last = {"c": c.detach(), "f": f.detach()}
        return RefOut(logits, logp, -logp.mean() + extra)

    @staticmethod
    def _misclassified(c: Tensor, y: Tensor, f: Tensor) -> Tensor:
        """I_j = 1 for j ≠ y with cos θ_j > f (the transformed target cosine)."""
        onehot = F.one_hot(y, c.shape[1]).bool()
        return (c > f.detach()[:, None]) & ~onehot

    def end_epoch(self) -> None:
        if self.name != "kappaface":
            return
        self.psi = kappa_psi_reference(self.feature_sum, self.count, self.psi, self.D,
                                       self.p["T"], self.p["gamma"], self.p["r_max"])
        self.feature_sum.zero_()
        self.count.zero_()

    # -- the call
    def __call__(self, x: Tensor, w: Tensor, y: Tensor, train: bool = True) -> RefOut:
        c = cos_matrix(x, w)
        cy = c.gather(1, y[:, None]).squeeze(1)
        return getattr(self, "_" + self.name.replace("-", "_"))(x, c, cy, y, train)

    def _normface(self, x, c, cy, y, train):
        return self._finish(c, y, cy)

    def _cosface(self, x, c, cy, y, train):
        return self._finish(c, y, cy - self.p["m"])

    def _arcface(self, x, c, cy, y, train):
        f = combined_margin(cy, m2=self.p["m"], guard=self.p["guard"])
        if self.p["straight_through"]:   # value of f, gradient of cos θ_y
            f = cy + (f - cy).detach()
        return self._finish(c, y, f)

    def _combined(self, x, c, cy, y, train):
        p = self.p
        return self._finish(c, y, combined_margin(cy, p["m1"], p["m2"], p["m3"], p["guard"]))

    def _sphereface(self, x, c, cy, y, train):
        p = self.p
        if train and p["lambda_step"] == "current":   # Caffe: iter_ += 1 before λ
            self.step += 1
        lam = sphereface_lambda(self.step, p["base"], p["gamma"], p["power"], p["lambda_min"])
        f = (sphereface_psi(angle(cy), p["m"]) + lam * cy) / (1.0 + lam)
        if train and p["lambda_step"] == "previous":
            self.step += 1
        return self._finish(c, y, f)

    def _against(self, f: Tensor, raw: Tensor) -> Tensor:
        """What mis-classification compares with: the target used, or the official code's raw margin formula."""
        return raw if self.p["mask_against"] == "margin" else f

    def _mv(self, c, cy, y, f, raw):
        t = self.p["t"]
        mask = self._misclassified(c, y, self._against(f, raw))
        g = (t + 1.0) * c + t if self.p["adaptive"] else c + t
        self.last_mask = raw
        return self._finish(c, y, f, torch.where(mask, g, c))

    def _am_target(self, cy):
        """SV-X-Softmax 'MV-AM': where(gt > 0, gt − m, gt) with easy_margin (its default), else gt − m."""
        m = self.p["m"]
        f = torch.where(cy > 0, cy - m, cy) if self.p["easy_margin"] else cy - m
        return f, cy - m

    def _arc_target(self, cy):
        """SV-X-Softmax 'MV-Arc': cos(θ+m) = c·cos m − sqrt(1 − c²)·sin m, easy: where(gt > 0, ·, gt)."""
        raw = combined_margin(cy, m2=self.p["m"], guard="none")
        return combined_margin(cy, m2=self.p["m"], guard=self.p["guard"]), raw

    def _mv_am(self, x, c, cy, y, train):
        return self._mv(c, cy, y, *self._am_target(cy))

    def _mv_arc(self, x, c, cy, y, train):
        return self._mv(c, cy, y, *self._arc_target(cy))

    def _sv(self, c, cy, y, f, raw):
        """SV-Softmax: a support vector's exponential e^{s c_k} is multiplied by h = e^{s(t−1)(c_k+1)}."""
        s, t = self.p["s"], self.p["t"]
        onehot = F.one_hot(y, self.C).bool()
        support = self._misclassified(c, y, self._against(f, raw)).to(c.dtype)
        self.last_mask = raw
        log_h = s * (t - 1.0) * (c + 1.0) * support           # log of the multiplier
        logits = torch.where(onehot, s * f[:, None], s * c + log_h)
        logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        self.last = {"c": c.detach(), "f": f.detach()}
        return RefOut(logits, logp, -logp.mean())

    def _sv_am(self, x, c, cy, y, train):
        return self._sv(c, cy, y, *self._am_target(cy))

    def _sv_arc(self, x, c, cy, y, train):
        return self._sv(c, cy, y, *self._arc_target(cy))

    def _curricularface(self, x, c, cy, y, train):
        """Official head/metrics.py: mask = cos > cos(θ_y + m) (raw), t updated after the mask and before use."""
        if train:   # t updated before use, from the detached plain target cosines
            self.t = 0.99 * self.t + 0.01 * float(cy.detach().mean())
        f = combined_margin(cy, m2=self.p["m"], guard="fallback")
        raw = combined_margin(cy, m2=self.p["m"], guard="none")
        self.last_mask = raw
        mask = self._misclassified(c, y, self._against(f, raw))
        return self._finish(c, y, f, torch.where(mask, c * (self.t + c), c))

    def _kappaface(self, x, c, cy, y, train):
        if train:
            self.feature_sum.index_add_(0, y, F.normalize(x.detach().double(), dim=1))
            self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        m = self.psi.to(c.dtype)[y] * self.p["m0"]
        return self._finish(c, y, combined_margin(cy, m2=m, guard=self.p["guard"]))

    def _search_softmax(self, x, c, cy, y, train):
        s, a = self.p["s"], self.p["a"]
        values = [-math.exp(s / 3.0)] if a is None else (list(a) if isinstance(a, (list, tuple)) else [a])
        values = torch.tensor(values, dtype=c.dtype)
        z = s * c
        if len(values) == 1:
            a_i = values[0].expand(c.shape[0])
        else:   # local space: a per bin of the (unmodulated) target probability
            with torch.no_grad():
                p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
                i = torch.floor(len(values) * p).long().clamp(max=len(values) - 1)
            a_i = values[i]
        return self._modulated(z, y, a_i)

    def _random_softmax(self, x, c, cy, y, train):
        s, sigma = self.p["s"], self.p["sigma"]
        if train:
            xdraw = sigma * abs(float(torch.randn((), dtype=torch.float32)))
        else:
            xdraw = sigma * math.sqrt(2.0 / PI)
        a = torch.full((c.shape[0],), -xdraw * math.exp(s / 3.0), dtype=c.dtype)
        return self._modulated(s * c, y, a)

    def _modulated(self, z, y, a):
        logp = log_target_prob_modulated(z, y, a)
        onehot = F.one_hot(y, self.C).bool()
        logits = z.masked_fill(onehot, math.nan)
        self.last = {"a": a.detach()}
        return RefOut(logits, logp, -logp.mean())

    def _am_lfs(self, x, c, cy, y, train):
        p = self.p
        n = p["intervals"]
        slopes = torch.tensor(p["slopes"] if p["slopes"] is not None else [1.0] * n, dtype=c.dtype)
        intercepts = torch.tensor(p["intercepts"] if p["intercepts"] is not None else [0.0] * n, dtype=c.dtype)
        i = torch.floor((cy.detach() + 1.0) * n / 2.0).long().clamp(0, n - 1)
        return self._finish(c, y, slopes[i] * cy + intercepts[i])

    def _elastic_margins(self, batch: int, dtype) -> Tensor:
        if self.training_draw:
            n = torch.randn(batch, dtype=torch.float32).to(dtype)
            return self.p["m"] + self.p["sigma"] * n
        return torch.full((batch,), self.p["m"], dtype=dtype)

    def _elasticface_arc(self, x, c, cy, y, train):
        self.training_draw = train
        m = self._elastic_margins(c.shape[0], c.dtype)
        return self._finish(c, y, combined_margin(cy, m2=m, guard=self.p["guard"]))

    def _elasticface_cos(self, x, c, cy, y, train):
        self.training_draw = train
        m = self._elastic_margins(c.shape[0], c.dtype)
        return self._finish(c, y, cy - m)

    def _adaface(self, x, c, cy, y, train):
        """Official head.py: every cosine clamped to ±(1 − eps) first, θ_m clipped to [eps, π − eps]."""
        p = self.p
        eps = p["cos_clamp"]
        if eps > 0:
            c = c.clamp(-1.0 + eps, 1.0 - eps)
            cy = c.gather(1, y[:, None]).squeeze(1)
        norms = x.detach().norm(dim=1).clamp(0.001, 100.0).to(c.dtype)
        if train:
            alpha = p["t_alpha"]
            self.mu = (1 - alpha) * self.mu + alpha * float(norms.mean())
            self.sigma = (1 - alpha) * self.sigma + alpha * float(norms.std())
        zhat = (p["h"] * (norms - self.mu) / (self.sigma + 1e-3)).clamp(-1.0, 1.0)
        m = p["m"]
        f = torch.cos((angle(cy) - m * zhat).clamp(1e-3, PI - 1e-3)) - (m + m * zhat)
        self.last_zhat = zhat
        return self._finish(c, y, f)

    def _magface(self, x, c, cy, y, train):
        p = self.p
        a = x.norm(dim=1).to(c.dtype).clamp(p["l_a"], p["u_a"])
        m = (p["u_m"] - p["l_m"]) / (p["u_a"] - p["l_a"]) * (a - p["l_a"]) + p["l_m"]
        f = combined_margin(cy, m2=m, guard=p["guard"])   # MagLinear: easy_margin=True by default
        reg = p["lambda_g"] * (a / p["u_a"] ** 2 + 1.0 / a).mean()
        return self._finish(c, y, f, extra=reg)
