"""Every named point at its official flavour against its official code's formula (issue #14).

The references below are written in this file from the official code's formulas as recorded in
notes/fidelity_facts.md (facts, not code): sqrt(1 − c²) expansions instead of acos, Caffe's sign
tricks for SphereFace, the official order of state updates. Inputs are clamped to [−1, 1] first
(the official heads' own clamp; the mxnet code has none, which only matters for rounding beyond
±1). Agreement is to float64 rounding except where |cos θ_y| = 1 exactly: there the stated clamp
before acos (losses.fidelity.CLAMP) moves an angular target by at most s·sin(m)·√(2e-7).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from marginsearch.losses import NAMED, MarginSoftmax, MarginSpec, named
from marginsearch.losses.__main__ import main as losses_main
from marginsearch.losses.fidelity import FIDELITY, USER_FACTS, fidelity_markdown

from .references import cos_matrix
from .test_named_references import C, D, build_head, edge_batch, make_batch

SEED = 11
ANGULAR = {"arcface", "combined", "curricularface", "kappaface", "elasticface-arc", "magface", "mv-arc", "sv-arc",
           "sphereface"}


# ------------------------------------------------------------------ official formulas
def cos_plus(c, m):
    """cos(θ + m) as the official heads write it: c·cos m − sqrt(1 − c²)·sin m."""
    return c * torch.cos(m) - torch.sqrt((1.0 - c * c).clamp_min(0.0)) * torch.sin(m)


def caffe_psi4(c):
    """SphereFace's Caffe layer, m = 4: ψ = sign_3·(8c⁴ − 8c² + 1) + sign_4 (sign(0) = 0)."""
    s0 = torch.sign(c)
    s3 = s0 * torch.sign(2 * c * c - 1)
    s4 = 2 * s0 + s3 - 3
    return s3 * (8 * c ** 4 - 8 * c ** 2 + 1) + s4


class Official:
    """One named point's official forward, with its own state; returns scaled logits [B, C] and an extra loss."""

    def __init__(self, name: str, **params):
        self.name, self.p = name, {**NAMED[name].defaults, **params}
        self.iter, self.t, self.mean, self.std = 0, 0.0, 20.0, 100.0
        self.psi = torch.ones(C, dtype=torch.float64)
        self.sums, self.counts = torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)

    def __call__(self, x, w, y, train=True):
        c = cos_matrix(x, w).clamp(-1.0, 1.0)
        onehot = F.one_hot(y, C).bool()
        gt = c.gather(1, y[:, None]).squeeze(1)
        p, s = self.p, self.p["s"]
        extra = torch.zeros((), dtype=torch.float64)
        n = self.name
        neg = c
        if n == "normface":
            f = gt
        elif n in ("cosface", "elasticface-cos"):
            m = p["m"] + (p["sigma"] * torch.randn(len(y)).double() if n == "elasticface-cos" and train else 0.0)
            f = gt - m
        elif n == "arcface":   # the paper's mxnet code (src/train_softmax.py, loss_type 4, non-easy)
            m = torch.tensor(p["m"], dtype=torch.float64)
            f = torch.where(gt > torch.cos(math.pi - m), cos_plus(gt, m), gt - torch.sin(math.pi - m) * m)
        elif n == "combined":  # arcface_mxnet/train.py margin_softmax: no guard
            f = torch.cos(p["m1"] * torch.acos(gt) + p["m2"]) - p["m3"]
        elif n == "sphereface":  # Caffe: iter_ += 1 before λ; (ψ + λ c)/(1 + λ), scaled by s here
            if train:
                self.iter += 1
            lam = max(p["lambda_min"], p["base"] * (1 + p["gamma"] * self.iter) ** -p["power"])
            f = (caffe_psi4(gt) + lam * gt) / (1 + lam)
        elif n in ("mv-am", "sv-am", "mv-arc", "sv-arc"):   # SV-X-Softmax fc_layers.py, easy_margin=True
            t = p["t"] - 1.0 if n.startswith("sv") else p["t"]
            if n.endswith("am"):
                raw = gt - p["m"]
            else:
                raw = cos_plus(gt, torch.tensor(p["m"], dtype=torch.float64))
            mask = (c > raw[:, None]) & ~onehot
            neg = torch.where(mask, (t + 1.0) * c + t, c)
            f = torch.where(gt > 0, raw, gt)
        elif n == "curricularface":   # head/metrics.py
            m = torch.tensor(p["m"], dtype=torch.float64)
            raw = cos_plus(gt, m)
            mask = (c > raw[:, None]) & ~onehot
            if train:
                self.t = 0.01 * float(gt.detach().mean()) + 0.99 * self.t
            neg = torch.where(mask, c * (self.t + c), c)
            f = torch.where(gt > torch.cos(math.pi - m), raw, gt - torch.sin(math.pi - m) * m)
        elif n == "kappaface":        # losses.py: acos, + m0·w_y, cos; no guard
            if train:
                self.sums.index_add_(0, y, F.normalize(x.detach().double(), dim=1))
                self.counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
            f = torch.cos(torch.acos(gt) + p["m0"] * self.psi[y])
        elif n == "elasticface-arc":  # utils/losses.py: acos, + m_i, cos; no guard
            m = p["m"] + (p["sigma"] * torch.randn(len(y)).double() if train else 0.0)
            f = torch.cos(torch.acos(gt) + m)
        elif n == "adaface":          # head.py
            eps = 1e-3
            c = c.clamp(-1 + eps, 1 - eps)
            neg, gt = c, c.gather(1, y[:, None]).squeeze(1)
            safe = x.detach().norm(dim=1).clamp(0.001, 100)
            if train:
                self.mean = p["t_alpha"] * float(safe.mean()) + (1 - p["t_alpha"]) * self.mean
                self.std = p["t_alpha"] * float(safe.std()) + (1 - p["t_alpha"]) * self.std
            ms = (p["h"] * (safe - self.mean) / (self.std + eps)).clamp(-1, 1)
            theta_m = (torch.acos(gt) - p["m"] * ms).clamp(eps, math.pi - eps)
            f = torch.cos(theta_m) - (p["m"] + p["m"] * ms)
        elif n == "magface":          # models/magface.py, easy_margin=True
            a = x.norm(dim=1).clamp(p["l_a"], p["u_a"])
            m = (p["u_m"] - p["l_m"]) / (p["u_a"] - p["l_a"]) * (a - p["l_a"]) + p["l_m"]
            f = torch.where(gt > 0, cos_plus(gt, m), gt)
            extra = p["lambda_g"] * (a / p["u_a"] ** 2 + 1 / a).mean()
        else:
            raise KeyError(n)
        return s * torch.where(onehot, f[:, None], neg), extra

    def end_epoch(self):
        """KappaFace update_kappa: r̄ = |sum|/n, κ = r̄(d − r̄²)/(1 − r̄²), +inf → max finite, nan → 0."""
        if self.name != "kappaface":
            return
        seen = self.counts > 0
        r = self.sums[seen].norm(dim=1) / self.counts[seen]
        kappa = r * (D - r ** 2) / (1 - r ** 2)
        kappa = torch.nan_to_num(kappa, nan=0.0, posinf=float(kappa[kappa != math.inf].max()))
        w_k = 1 - torch.sigmoid(self.p["T"] * (kappa - kappa.mean()) / kappa.std())
        n = self.counts[seen]
        w_n = (torch.cos(math.pi * n / (1.05 * n.max())) + 1) / 2
        self.psi[seen] = self.p["gamma"] * w_k + (1 - self.p["gamma"]) * w_n
        self.sums.zero_()
        self.counts.zero_()


OFFICIAL = [n for n in NAMED if n not in ("search-softmax", "random-softmax", "am-lfs")]


def _tolerance_rows(name, x, w, y):
    """Rows where the stated acos clamp may move the value: |cos θ_y| = 1 exactly, angular points."""
    cy = cos_matrix(x, w).clamp(-1, 1).gather(1, y[:, None]).squeeze(1)
    return (cy.abs() >= 1 - 1e-7) if name in ANGULAR else torch.zeros_like(cy, dtype=torch.bool)


def _compare(name, z, ref, x, w, y):
    loose = _tolerance_rows(name, x, w, y)
    s = NAMED[name].defaults["s"]
    torch.testing.assert_close(z[~loose], ref[~loose], rtol=1e-12, atol=1e-9)
    if loose.any():   # the stated clamp: at most s·√(2e-7) (sin m ≤ 1), on the target column only
        assert float((z[loose] - ref[loose]).detach().abs().max()) <= s * math.sqrt(2e-7) * 1.01 + 1e-9


# ------------------------------------------------------------------ 1. edge cases, each flavour
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_flavour_on_edges(name, train):
    """cos = ±1, θ_y = π − 0.15 (θ + m > π), every negative closer than the target, tiny and huge norms."""
    x, w, y = edge_batch(name)
    head = build_head(name, {}, w, torch.float64).train(train)
    ref = Official(name)
    torch.manual_seed(SEED)
    z = head.logits(x, y)
    torch.manual_seed(SEED)
    zr, extra = ref(x, w, y, train)
    _compare(name, z, zr, x, w, y)
    fresh = build_head(name, {}, w, torch.float64).train(train)
    torch.manual_seed(SEED)
    loss = fresh(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(z, y) + extra, rtol=1e-10, atol=1e-9)


def test_edge_batch_covers_the_edges():
    x, w, y = edge_batch("arcface")
    c = cos_matrix(x, w)
    cy = c.gather(1, y[:, None]).squeeze(1)
    assert (cy >= 1 - 1e-12).any() and (cy <= -1 + 1e-12).any() and (torch.acos(cy.clamp(-1, 1)) + 0.5 > math.pi).any()
    others = c.masked_fill(F.one_hot(y, C).bool(), 2.0)
    assert int((others > cy[:, None]).all(dim=1).sum()) >= 3   # every negative closer than the target


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_class_misclassified_batch(name):
    """Every row has every negative closer than its target (cos θ_j > cos θ_y for all j ≠ y)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    wn = F.normalize(w, dim=1)
    y = torch.arange(C) % C
    x = torch.stack([0.3 * F.normalize(wn[torch.arange(C) != k].sum(0), dim=0) - wn[k] for k in y])
    x = x * (5.0 + 30.0 * torch.rand(C, 1, generator=g, dtype=torch.float64))
    c = cos_matrix(x, w)
    assert bool((c.masked_fill(F.one_hot(y, C).bool(), 2.0) > c.gather(1, y[:, None])).all())
    head = build_head(name, {}, w, torch.float64)
    ref = Official(name)
    torch.manual_seed(SEED)
    z = head.logits(x, y)
    torch.manual_seed(SEED)
    _compare(name, z, ref(x, w, y)[0], x, w, y)


# ------------------------------------------------------------------ 2. float64 gradients
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_gradients_float64(name):
    """d loss/d x and d loss/d W of the head equal autograd through the official formula (rows off ±1)."""
    x, w, y = make_batch(seed=21, norms=(5.0, 60.0) if name in ("magface", "adaface") else (0.5, 3.0))
    xh, wr, xr = x.clone().requires_grad_(), w.clone().requires_grad_(), x.clone().requires_grad_()
    head = build_head(name, {}, w, torch.float64)
    torch.manual_seed(SEED)
    head(xh, y).backward()
    torch.manual_seed(SEED)
    zr, extra = Official(name)(xr, wr, y)
    (F.cross_entropy(zr, y) + extra).backward()
    torch.testing.assert_close(xh.grad, xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["arcface", "combined", "mv-am", "adaface", "kappaface", "magface"])
def test_gradcheck_official_flavour_near_the_edges(name):
    """torch.autograd.gradcheck of the loss at cosines near (not at) ±1 and past π − m."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    wn = F.normalize(w, dim=1)
    y = torch.arange(5)
    x = wn[y] + 0.02 * torch.randn(5, 4, generator=g, dtype=torch.float64)   # cos θ_y ≈ 0.9998
    x[1] = -wn[1] + 0.05 * torch.randn(4, generator=g, dtype=torch.float64)   # θ_y + m > π
    x[2] = wn[2] + 0.4 * torch.randn(4, generator=g, dtype=torch.float64)
    x = x * (25.0 + 10.0 * torch.arange(5, dtype=torch.float64))[:, None]
    params = {"h": 100.0} if name == "adaface" else {}
    head = MarginSoftmax(named(name, **params), 4, 5).double().eval()   # eval: no state update between calls

    def loss(xx, ww):
        return torch.func.functional_call(head, {"weight": ww}, (xx, y))

    assert torch.autograd.gradcheck(loss, (x.requires_grad_(), w.clone().requires_grad_()), eps=1e-7,
                                    atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ 3. stateful points over several steps
@pytest.mark.parametrize("name", ["sphereface", "curricularface", "adaface", "kappaface", "elasticface-arc"])
def test_stateful_official_flavour_over_steps(name):
    _, w, _ = make_batch(seed=31)
    head = build_head(name, {}, w, torch.float64)
    ref = Official(name)
    for epoch in range(2):
        for k in range(3):
            x, _, y = make_batch(seed=40 + 3 * epoch + k, norms=(2.0, 60.0))
            if name == "kappaface":   # class 8: one sample per epoch
                y = torch.where(y == 8, torch.zeros_like(y), y)
                if k == 0:
                    y[0] = 8
            torch.manual_seed(k)
            z = head.logits(x, y)
            torch.manual_seed(k)
            _compare(name, z, ref(x, w, y)[0], x, w, y)
        head.end_epoch()
        ref.end_epoch()
    if name == "kappaface":   # the one-sample class: r̄ = 1 → κ = +∞ → the largest finite κ
        torch.testing.assert_close(head.kappa_psi.double(), ref.psi, rtol=1e-9, atol=1e-12)
    if name == "sphereface":
        assert int(head.step) == ref.iter == 6


def test_kappa_one_sample_class_against_the_previous_clamp():
    """r_max=None (official) and r_max=0.999 differ on a one-sample class's ψ; unseen classes keep ψ = 1."""
    _, w, _ = make_batch(seed=2)
    out = {}
    for r_max in (None, 0.999):
        head = build_head("kappaface", {"r_max": r_max}, w, torch.float64)
        y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 5])
        x, _, _ = make_batch(seed=50)
        head(x, y)
        head.end_epoch()
        out[r_max] = head.kappa_psi.clone()
    assert (out[None][6:] == 1).all() and (out[0.999][6:] == 1).all()
    assert float((out[None] - out[0.999]).abs().max()) > 1e-3


# ------------------------------------------------------------------ 4. each deviation is a parameter
def test_arcface_insightface_torch_flavour():
    """straight_through=True, guard='none': value cos(θ + m) everywhere (no guard), gradient of cos θ."""
    x, w, y = edge_batch("arcface")
    head = build_head("arcface", {"straight_through": True, "guard": "none"}, w, torch.float64)
    z = head.logits(x, y)
    c = cos_matrix(x, w).clamp(-1, 1)
    gt = c.gather(1, y[:, None]).squeeze(1)
    ref = 64.0 * torch.where(F.one_hot(y, C).bool(), torch.cos(torch.acos(gt) + 0.5)[:, None], c)
    _compare("arcface", z, ref, x, w, y)
    cy = torch.tensor([0.3, -0.99], dtype=torch.float64, requires_grad=True)
    from marginsearch.losses.transforms import angular_target
    angular_target(cy, 1.0, 0.5, 0.0, "none", True).sum().backward()
    torch.testing.assert_close(cy.grad, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name, params", [
    ("curricularface", {"mask_against": "target"}),
    ("mv-arc", {"mask_against": "target"}),
    ("mv-am", {"mask_against": "target"}),
    ("sv-am", {"mask_against": "target"}),
    ("mv-am", {"easy_margin": False}),
    ("sphereface", {"lambda_step": "previous"}),
    ("adaface", {"cos_clamp": 0.0}),
    ("kappaface", {"guard": "fallback"}),
    ("magface", {"guard": "fallback"}),
    ("elasticface-arc", {"guard": "fallback"}),
    ("combined", {"guard": "fallback"}),
])
def test_each_deviation_parameter_changes_the_logits(name, params):
    x, w, y = edge_batch(name)
    # one more row: θ_y = π − 0.3 for class 5 and class 6 at cos −0.99, between the official threshold and
    # the target used by mv-am/sv-am (easy), mv-arc (easy) and curricularface (fallback)
    g = torch.Generator().manual_seed(9)
    w5 = F.normalize(w[5], dim=0)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u = F.normalize(u - (u @ w5) * w5, dim=0)
    xr = math.cos(math.pi - 0.3) * w5 + math.sin(math.pi - 0.3) * u
    v = torch.randn(D, generator=g, dtype=torch.float64)
    v = F.normalize(v - (v @ xr) * xr, dim=0)
    w = w.clone()
    w[6] = -0.99 * xr + math.sqrt(1 - 0.99 ** 2) * v
    x, y = torch.cat([x, 3.0 * xr[None]]), torch.cat([y, torch.tensor([5])])
    official, other = build_head(name, {}, w, torch.float64), build_head(name, params, w, torch.float64)
    torch.manual_seed(SEED)
    z1 = official.logits(x, y)
    torch.manual_seed(SEED)
    z2 = other.logits(x, y)
    assert not torch.allclose(z1, z2), f"{params} changes nothing"


# ------------------------------------------------------------------ 5. modes in float32, fixed MV, learnable s, eval
@pytest.mark.parametrize("mode", ["chunked", "sampled"])
@pytest.mark.parametrize("name", ["mv-am", "mv-arc", "curricularface", "adaface", "kappaface", "sphereface", "magface"])
def test_chunked_and_sampled_equal_full_in_float32(name, mode):
    x, w, y = make_batch(seed=60, norms=(5.0, 60.0), b=24, c=40)
    x[0] = 12.0 * F.normalize(w[(y[0] + 1) % 40], dim=0)   # a negative at cos = 1: AdaFace's clamp cuts it
    x, w = x.float(), w.float()
    kwargs = {"class_chunk": 7} if mode == "chunked" else {"sample_rate": 0.5, "class_chunk": 9}
    head = MarginSoftmax(named(name), D, 40, **kwargs)
    with torch.no_grad():
        head.weight.copy_(w)
    xin = x.clone().requires_grad_()
    torch.manual_seed(SEED)
    loss = head(xin, y)
    loss.backward()
    if mode == "sampled":
        torch.manual_seed(SEED)
        from marginsearch.losses.partial_fc import sample_classes
        index, local = sample_classes(y, 40, 0.5)
        full = MarginSoftmax(named(name), D, index.numel())
        with torch.no_grad():
            full.weight.copy_(w[index])
        xf = x.clone().requires_grad_()
        lf = full(xf, local)
        grad_w = head.weight.grad[index]
    else:
        full = MarginSoftmax(named(name), D, 40)
        with torch.no_grad():
            full.weight.copy_(w)
        xf = x.clone().requires_grad_()
        torch.manual_seed(SEED)
        lf = full(xf, y)
        grad_w = head.weight.grad
    lf.backward()
    torch.testing.assert_close(loss, lf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xin.grad, xf.grad, rtol=1e-4, atol=1e-5 * float(xf.grad.abs().max()))
    torch.testing.assert_close(grad_w, full.weight.grad, rtol=1e-4, atol=1e-5 * float(full.weight.grad.abs().max()))


def test_adaface_negative_clamp_in_chunked_backward_float64():
    """A negative at cos = 1 is clamped to 1 − 1e-3 with zero gradient, in forward and in the chunked backward."""
    x, w, y = make_batch(seed=61, norms=(5.0, 60.0))
    x[0] = 9.0 * F.normalize(w[(y[0] + 1) % C], dim=0)
    grads = []
    for chunk in (None, 2):
        head = build_head("adaface", {}, w, torch.float64)
        head.class_chunk = chunk
        xin = x.clone().requires_grad_()
        head(xin, y).backward()
        grads.append((xin.grad, head.weight.grad))
    z = build_head("adaface", {}, w, torch.float64).logits(x, y)
    assert float(z.detach()[0, (y[0] + 1) % C]) == pytest.approx(64.0 * (1 - 1e-3), rel=1e-12)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    zr, _ = Official("adaface")(xr, wr, y)
    F.cross_entropy(zr, y).backward()
    for gx, gw in grads:
        torch.testing.assert_close(gx, xr.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gw, wr.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["mv-am", "mv-arc"])
def test_fixed_mv_rule_against_official_commented_variant(name):
    """adaptive=False: mis-classified negatives get cos θ_j + t (the official file's commented line)."""
    x, w, y = edge_batch(name)
    head = build_head(name, {"adaptive": False}, w, torch.float64)
    z = head.logits(x, y)
    c = cos_matrix(x, w).clamp(-1, 1)
    gt = c.gather(1, y[:, None]).squeeze(1)
    raw = gt - 0.35 if name == "mv-am" else cos_plus(gt, torch.tensor(0.35, dtype=torch.float64))
    onehot = F.one_hot(y, C).bool()
    neg = torch.where((c > raw[:, None]) & ~onehot, c + 0.2, c)
    ref = 32.0 * torch.where(onehot, torch.where(gt > 0, raw, gt)[:, None], neg)
    _compare(name, z, ref, x, w, y)
    assert int(((c > raw[:, None]) & ~onehot).sum()) > 3


@pytest.mark.parametrize("mode", [{}, {"class_chunk": 3}])
def test_learnable_scale_gradient_against_autograd_reference(mode):
    """d loss/d s of a learnable scale (NormFace) and of an official flavour with negatives (mv-am)."""
    x, w, y = make_batch(seed=70)
    for base in ("normface", "mv-am"):
        spec = MarginSpec.from_dict({**named(base, s=10.0).to_dict(), "learnable_scale": True})
        head = MarginSoftmax(spec, D, C, **mode).double()
        with torch.no_grad():
            head.weight.copy_(w)
        head(x, y).backward()
        s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        ref = Official(base, s=10.0)
        zr, _ = ref(x, w, y)
        F.cross_entropy(zr / 10.0 * s, y).backward()
        torch.testing.assert_close(head.scale.grad, s.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["curricularface", "adaface", "sphereface", "elasticface-arc", "random-softmax",
                                  "kappaface"])
def test_eval_mode_changes_no_state_and_uses_means(name):
    _, w, _ = make_batch(seed=80)
    head = build_head(name, {}, w, torch.float64)
    for k in range(2):
        x, _, y = make_batch(seed=81 + k, norms=(2.0, 40.0))
        head(x, y)
    head.eval()
    before = copy.deepcopy(head.state_dict())
    x, _, y = make_batch(seed=90, norms=(2.0, 40.0))
    torch.manual_seed(1)
    z1 = head.logits(x, y)
    torch.manual_seed(2)
    z2 = head.logits(x, y)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)   # no draws in eval
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------ 6. the table
def test_fidelity_table_covers_every_named_point_and_names_real_parameters():
    assert set(FIDELITY) == set(NAMED)
    for name, record in FIDELITY.items():
        assert record.agrees, name
        for d in record.deviations:
            if d.parameter and not d.parameter.startswith("MarginSpec("):
                for assignment in d.parameter.split(", "):
                    key = assignment.split("=")[0]
                    assert key in NAMED[name].defaults, (name, key)
    assert len(USER_FACTS) >= 3


def test_fidelity_cli_and_docs_page(capsys):
    from pathlib import Path
    assert losses_main(["--fidelity"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in NAMED) and "657ae30e" in text
    assert losses_main(["--fidelity", "--markdown"]) == 0
    page = Path(__file__).resolve().parents[2].joinpath("docs", "fidelity.md").read_text(encoding="utf-8")
    assert capsys.readouterr().out == page == fidelity_markdown(), \
        "docs/fidelity.md is stale; regenerate with `python -m marginsearch.losses --fidelity --markdown`"


def test_old_spec_dicts_still_load_with_their_old_meaning():
    old = {"s": 64.0, "learnable_scale": False, "target": {"kind": "sphereface", "m": 4, "base": 1000.0,
                                                           "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
           "negative": None, "modulation": None, "class_margin": None, "sample_margin": None}
    assert MarginSpec.from_dict(old).target.lambda_step == "previous"
    mv = {"target": {"kind": "margin", "m3_cos": 0.35}, "negative": {"kind": "negative", "rule": "mv-adaptive"},
          "class_margin": {"kind": "kappa"}}
    spec = MarginSpec.from_dict(mv)
    assert spec.negative.mask_against == "target" and spec.class_margin.r_max == 0.999
    assert spec.target.cos_clamp == 0.0 and MarginSpec() == MarginSpec.from_dict({})


def test_kappa_psi_replaces_infinite_concentration_by_the_largest_finite():
    """A class whose features sum to a unit vector exactly (r̄ = 1): official κ = +∞ → the max of the others."""
    from marginsearch.losses.transforms import kappa_psi
    g = torch.Generator().manual_seed(4)
    sums = torch.randn(5, 8, generator=g, dtype=torch.float64)
    counts = torch.tensor([4.0, 6.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    sums[3] = torch.zeros(8, dtype=torch.float64)
    sums[3, 2] = 1.0                                   # one sample: r̄ = 1 exactly
    sums[4] = 0.0                                      # unseen
    for i in range(3):
        sums[i] = F.normalize(sums[i], dim=0) * counts[i] * (0.5 + 0.1 * i)
    psi, seen = kappa_psi(sums, counts, 0.4, 0.7, r_max=None)
    r = sums[:4].norm(dim=1) / counts[:4]
    kappa = r * (8 - r ** 2) / (1 - r ** 2)
    assert math.isinf(float(kappa[3]))
    kappa[3] = kappa[:3].max()
    w_k = 1 - torch.sigmoid(0.4 * (kappa - kappa.mean()) / kappa.std())
    w_n = (torch.cos(math.pi * counts[:4] / (1.05 * 6.0)) + 1) / 2
    torch.testing.assert_close(psi[:4], 0.7 * w_k + 0.3 * w_n, rtol=1e-12, atol=1e-14)
    assert seen.tolist() == [True, True, True, True, False]
    clamped, _ = kappa_psi(sums, counts, 0.4, 0.7, r_max=0.999)
    assert float((clamped[:4] - psi[:4]).abs().max()) > 1e-3


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_search_softmax_official_global_formula_on_edges(train):
    """lfs_core/utils/loss.py: p = softmax(s·cos), p' = p_y/(A·p_y + 1 − A), A = a0·e^{s/3}; loss = −mean log p'."""
    x, w, y = edge_batch("search-softmax")
    head = build_head("search-softmax", {}, w, torch.float64).train(train)
    loss = head(x, y)
    s = 32.0
    A = -1.0 * math.exp(s / 3.0)
    logp = torch.log_softmax(s * cos_matrix(x, w).clamp(-1, 1), dim=1).gather(1, y[:, None]).squeeze(1)
    p = logp.exp()
    ref = -(logp - torch.log(A * p + 1.0 - A)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-10)
