"""Every named loss against an independent reference written from the paper's formula.

References live in `tests/losses/references.py` (written from the papers' formulas, see `docs/fidelity.md`
and the documented conventions, not from `losses/transforms.py`). Style of
pytorch-metric-learning's tests: a dtype loop, fixed seeds, and gradient checks.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from marginsearch.losses import NAMED, MarginSoftmax, MarginSpec, SpecError, identify, named

from .references import PAPER_DEFAULTS, Reference, angle, cos_matrix, sphereface_lambda, sphereface_psi

B, D, C = 12, 6, 9
NAMES = list(NAMED)

# One non-default parameter set per name (arcface also gets straight-through).
NON_DEFAULT = {
    "normface": [{"s": 30.0}],
    "cosface": [{"s": 30.0, "m": 0.2}],
    "arcface": [{"s": 30.0, "m": 0.7, "guard": "easy"}, {"m": 0.4, "straight_through": True}],
    "combined": [{"m1": 1.35, "m2": 0.2, "m3": 0.1, "guard": "none"},
                 {"s": 40.0, "m1": 0.9, "m2": 0.4, "m3": 0.15, "guard": "clip"}],
    "sphereface": [{"s": 20.0, "m": 3, "base": 2.0, "gamma": 0.5, "power": 2.0, "lambda_min": 0.5}],
    "mv-am": [{"s": 20.0, "m": 0.2, "t": 0.3, "adaptive": False}],
    "mv-arc": [{"m": 0.5, "t": 0.1, "adaptive": False}, {"s": 24.0, "m": 0.45, "t": 0.35}],
    "sv-am": [{"t": 1.5, "m": 0.25}],
    "sv-arc": [{"s": 24.0, "t": 1.1, "m": 0.45}],
    "curricularface": [{"s": 30.0, "m": 0.3}],
    "kappaface": [{"m0": 0.5, "T": 1.0, "gamma": 0.3}],
    "search-softmax": [{"s": 16.0, "a": [-0.5 * (i + 1) ** 2 for i in range(10)]}, {"a": -10.0}],
    "random-softmax": [{"s": 20.0, "sigma": 0.5}],
    "am-lfs": [{"s": 32.0, "intervals": 4, "slopes": [0.8, 0.9, 1.0, 1.1],
                "intercepts": [-0.3, -0.2, -0.1, -0.05]}],
    "elasticface-arc": [{"m": 0.4, "sigma": 0.1}],
    "elasticface-cos": [{"s": 30.0, "m": 0.3, "sigma": 0.1}],
    "adaface": [{"m": 0.5, "h": 2.0, "t_alpha": 0.3}],
    "magface": [{"l_a": 5.0, "u_a": 50.0, "l_m": 0.3, "u_m": 0.6, "lambda_g": 10.0}],
}
CASES = [(n, {}) for n in NAMES] + [(n, p) for n in NAMES for p in NON_DEFAULT[n]]
CASE_IDS = [f"{n}-{'default' if not p else 'custom' + str(i)}"
            for i, (n, p) in enumerate(CASES)]

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SEED_DRAW = 11


def test_every_name_has_a_reference_and_a_non_default_case():
    assert set(NAMES) == set(PAPER_DEFAULTS) == set(NON_DEFAULT)
    assert len(NAMES) == 18


@pytest.mark.parametrize("name", NAMES)
def test_named_defaults_are_the_published_ones(name):
    assert dict(NAMED[name].defaults) == PAPER_DEFAULTS[name]


# ---------------------------------------------------------------------------------- inputs
def norm_range(name: str, params: dict) -> tuple[float, float]:
    if name == "magface":
        p = {**PAPER_DEFAULTS[name], **params}
        return 0.5 * p["l_a"], 1.1 * p["u_a"]     # some below l_a, some above u_a, most inside
    if name == "adaface":
        return 2.0, 60.0
    return 0.5, 3.0


def make_batch(seed: int, norms=(0.5, 3.0), b: int = B, d: int = D, c: int = C):
    """Random float64 batch with three structured rows: nearly opposite the target centre
    (θ_y + m > π, fallback branch), close to it, and with every negative closer than the target."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, c, (b,), generator=g)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    wn = F.normalize(w, dim=1)
    x[b - 3] = -wn[y[b - 3]] + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    x[b - 2] = wn[y[b - 2]] + 0.15 * torch.randn(d, generator=g, dtype=torch.float64)
    others = torch.ones(c, dtype=torch.bool)
    others[y[b - 1]] = False
    x[b - 1] = F.normalize(wn[others].sum(0), dim=0) - 1.5 * wn[y[b - 1]]
    lo, hi = norms
    r = lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)
    x = F.normalize(x, dim=1) * r[:, None]
    return x, w, y


def build_head(name: str, params: dict, w: torch.Tensor, dtype=torch.float32) -> MarginSoftmax:
    head = MarginSoftmax(named(name, **params), w.shape[1], w.shape[0])
    if dtype == torch.float64:
        head = head.double()
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
    return head


def head_weight64(head: MarginSoftmax) -> torch.Tensor:
    return head.weight.detach().double()


def assert_matches(z, loss, ref, rtol, atol, y, what=""):
    """Head logits/loss vs. a RefOut: known logits equal, target log-probability equal, loss equal."""
    z64 = z.detach().double()
    known = ~torch.isnan(ref.logits)
    torch.testing.assert_close(z64[known], ref.logits.detach()[known], rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} logits: {m}")
    logp = torch.log_softmax(z64, dim=1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(logp, ref.logp.detach(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} target log-probability: {m}")
    if loss is not None:
        torch.testing.assert_close(loss.detach().double(), ref.loss.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} loss: {m}")


TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-4, 1e-3)}


# ---------------------------------------------------------------------------------- 1. values
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_named_loss_matches_reference(name, params, dtype):
    """One training step and one eval step of a fresh head vs. the reference (fresh state).

    float64: head in float64, tight tolerance, and gradients w.r.t. embeddings and weight.
    float32: head in float32, reference in float64 on the same float32 numbers.
    bfloat16: bf16 embeddings into a float32 head (promoted inside): reference on the same bf16
    numbers (tight), and the loss within 5e-2 of the full-precision reference.
    """
    x, w, y = make_batch(seed=1000 + len(name), norms=norm_range(name, params))
    head = build_head(name, params, w, torch.float64 if dtype == torch.float64 else torch.float32)
    head_for_loss, head_for_eval = copy.deepcopy(head), copy.deepcopy(head).eval()
    xin = x.to(dtype).requires_grad_(dtype == torch.float64)
    rtol, atol = TOL[dtype]

    torch.manual_seed(SEED_DRAW)
    z = head.logits(xin, y)
    torch.manual_seed(SEED_DRAW)
    loss = head_for_loss(xin, y)
    assert z.shape == (B, C)
    assert z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    xr = xin.detach().double().requires_grad_()
    wr = head_weight64(head).requires_grad_()
    ref = Reference(name, C, D, **params)
    torch.manual_seed(SEED_DRAW)
    out = ref(xr, wr, y, train=True)
    assert_matches(z, loss, out, rtol, atol, y, f"{name} train")

    if dtype == torch.float64:   # gradients of the loss w.r.t. embeddings and class centres
        loss.backward()
        out.loss.backward()
        torch.testing.assert_close(xin.grad, xr.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(head_for_loss.weight.grad, wr.grad, rtol=1e-8, atol=1e-10)

    if dtype == torch.bfloat16:  # loose: vs. the reference on the full-precision embeddings
        full = Reference(name, C, D, **params)
        torch.manual_seed(SEED_DRAW)
        full_out = full(x, head_weight64(head), y, train=True)
        torch.testing.assert_close(loss.detach().double(), full_out.loss.detach(), rtol=5e-2, atol=5e-2)

    # eval mode: no state update, draws replaced by their means
    ref_eval = Reference(name, C, D, **params)
    with torch.no_grad():
        torch.manual_seed(SEED_DRAW)
        z_eval = head_for_eval.logits(xin.detach(), y)
        out_eval = ref_eval(xin.detach().double(), head_weight64(head), y, train=False)
    assert_matches(z_eval, None, out_eval, rtol, atol, y, f"{name} eval")


# ---------------------------------------------------------------------------------- 2. edges
def edge_batch(name: str):
    """Inputs built on purpose: cos = 1, cos = −1, θ_y + m > π, all negatives closer, tiny norms."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    wn = F.normalize(w, dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2])
    x = torch.randn(12, D, generator=g, dtype=torch.float64)
    x[0] = w[0]                                   # equal to its class centre: cos = 1
    x[1] = -w[1]                                  # the negated centre: cos = −1
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u = F.normalize(u - (u @ wn[2]) * wn[2], dim=0)
    x[2] = math.cos(math.pi - 0.15) * wn[2] + math.sin(math.pi - 0.15) * u   # θ_y = π − 0.15
    for i in (3, 4, 5):                           # every negative closer than the target
        others = torch.arange(C) != y[i]
        x[i] = F.normalize(wn[others].sum(0), dim=0) - 2.0 * wn[y[i]]
    x[6] = 1e-8 * torch.randn(D, generator=g, dtype=torch.float64)     # zero-norm adjacent
    x[7] = 1e-30 * torch.randn(D, generator=g, dtype=torch.float64)    # below normalize's eps
    x[8] = 1e-6 * w[8]                            # tiny and on its centre
    x[9] = 1e4 * torch.randn(D, generator=g, dtype=torch.float64)      # huge norm
    x[10] = -1e-7 * w[1]                          # tiny and opposite
    x[11] = w[2] * 3.0                            # cos = 1 again, larger norm
    if name in ("magface", "adaface"):
        x[12 - 1] = w[2] * 40.0
    c = cos_matrix(x, w)
    cy = c.gather(1, y[:, None]).squeeze(1)
    for i in (3, 4, 5):
        assert bool((torch.cat([c[i, :y[i]], c[i, y[i] + 1:]]) > cy[i]).all())
    assert cy[0] > 1 - 1e-12 and cy[1] < -1 + 1e-12 and abs(float(cy[2]) - math.cos(math.pi - 0.15)) < 1e-9
    return x, w, y


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_edge_inputs_stay_finite_and_match_reference(name, dtype, train):
    x, w, y = edge_batch(name)
    head = build_head(name, {}, w, dtype).train(train)
    ref_head = copy.deepcopy(head)
    xin = x.to(dtype).requires_grad_()
    torch.manual_seed(SEED_DRAW)
    loss = head(xin, y)
    loss.backward()
    torch.manual_seed(SEED_DRAW)
    z = ref_head.logits(x.to(dtype), y)
    assert torch.isfinite(loss), loss
    assert torch.isfinite(z).all(), z
    assert torch.isfinite(xin.grad).all(), xin.grad
    assert torch.isfinite(head.weight.grad).all(), head.weight.grad
    if dtype == torch.float64:   # value at the clamp conventions; loose for the θ-clamp ambiguity
        ref = Reference(name, C, D)
        torch.manual_seed(SEED_DRAW)
        out = ref(x, w, y, train=train)
        assert_matches(z, loss, out, 1e-5, 1e-4, y, f"{name} edge")


# ---------------------------------------------------------------------------------- 3. gradcheck
GRADCHECK_PARAMS = {
    # ẑ carries no gradient by design: saturate it (|h(|x| − μ)/σ| ≫ 1) so it is locally constant.
    "adaface": {"h": 100.0},
    "sphereface": {"base": 10.0, "gamma": 1.0, "lambda_min": 0.5},
}
GRADCHECK_EVAL = {"curricularface"}  # t is updated from the batch (detached): freeze it in eval


def gradcheck_batch(name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    b, d, c = 6, 4, 5
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.arange(b) % c
    if name == "magface":
        norms = 20.0 + 70.0 * torch.rand(b, generator=g, dtype=torch.float64)   # inside (l_a, u_a)
    elif name == "adaface":
        norms = torch.tensor([3.0, 6.0, 9.0, 35.0, 40.0, 50.0], dtype=torch.float64)
    else:
        norms = 0.5 + 2.0 * torch.rand(b, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1) * norms[:, None], w, y


def kinks_are_far(name: str, params: dict, x, w, y, ref: Reference) -> bool:
    """The inputs are away from cos = ±1, the guard switches and the negative masks."""
    c = cos_matrix(x, w)
    cy = c.gather(1, y[:, None]).squeeze(1)
    if c.abs().max() > 0.97 or cy.abs().min() < 0.05:          # easy guard switches at cos = 0
        return False
    if (cy < math.cos(math.pi - 1.0)).any():                    # fallback past π for m ≤ 1
        return False
    for f in (ref.last.get("f"), getattr(ref, "last_mask", None)):   # the target used and the raw margin
        if f is not None:
            gap = (c - f.detach()[:, None]).abs()
            gap[torch.arange(len(y)), y] = 1.0
            if gap.min() < 1e-3:                                # MV/SV/Curricular masks
                return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    """gradcheck of the loss and of (logits · R) w.r.t. embeddings and weight, float64.

    Training mode for every point except CurricularFace (eval: its t is updated from the batch
    without gradient, which finite differences would see); stateful/random heads are warmed up
    and, inside the function, their state is restored and the generator reseeded each call.
    """
    params = GRADCHECK_PARAMS.get(name, {})
    for seed in range(50):   # first seeded batch away from the kinks (deterministic)
        x, w, y = gradcheck_batch(name, seed)
        ref = Reference(name, 5, 4, **params)
        torch.manual_seed(SEED_DRAW)
        ref(x, w, y, train=True)
        if kinks_are_far(name, params, x, w, y, ref):
            break
    else:
        pytest.fail("no batch away from the kinks")
    head = build_head(name, params, w, torch.float64)
    for k in range(3):   # warm-up steps so that state is not at its initial value
        torch.manual_seed(k)
        head(x * (1.0 + 0.1 * k), (y + k) % 5)
    head.end_epoch()
    head.train(name not in GRADCHECK_EVAL)
    saved = copy.deepcopy(head.state_dict())
    proj = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss_fn(xx, ww):
        head.load_state_dict(saved)
        torch.manual_seed(SEED_DRAW)
        return torch.func.functional_call(head, {"weight": ww}, (xx, y))

    def logits_fn(xx, ww):
        head.load_state_dict(saved)
        torch.manual_seed(SEED_DRAW)
        z = torch.func.functional_call(head, {"weight": ww}, (xx, y), strict=False)
        return z

    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_fn, (xx, ww), eps=1e-6, atol=1e-5, rtol=1e-4)

    def logits_proj(xx, ww):
        head.load_state_dict(saved)
        torch.manual_seed(SEED_DRAW)
        orig = head.weight
        try:
            del head.weight
            head.weight = ww  # plain tensor in place of the parameter for this call
            return (head.logits(xx, y) * proj).sum()
        finally:
            del head.weight
            head.weight = orig

    assert torch.autograd.gradcheck(logits_proj, (xx, ww), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- 4. state
def step_batch(k: int, norms=(0.5, 3.0), labels=None, w=None):
    x, w0, y = make_batch(seed=500 + k, norms=norms)
    if labels is not None:
        y = labels
    return x, (w0 if w is None else w), y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_curricularface_t_trajectory_and_logits(dtype):
    rtol, atol = TOL[dtype]
    _, w, _ = make_batch(seed=1)
    head = build_head("curricularface", {}, w, dtype)
    ref = Reference("curricularface", C, D)
    ts = []
    for k in range(5):
        x, _, y = step_batch(k)
        z = head.logits(x.to(dtype), y)
        out = ref(x, head_weight64(head), y, train=True)
        ts.append(ref.t)
        assert float(head.state_dict()["curricular_t"]) == pytest.approx(ref.t, rel=1e-5, abs=1e-9)
        assert_matches(z, None, out, rtol, atol, y, f"curricular step {k}")
    assert ts[0] != 0.0 and len(set(ts)) == 5
    head.eval()
    x, _, y = step_batch(9)
    z = head.logits(x.to(dtype), y)
    out = ref(x, head_weight64(head), y, train=False)
    assert float(head.state_dict()["curricular_t"]) == pytest.approx(ts[-1], rel=1e-5, abs=1e-9)
    assert_matches(z, None, out, rtol, atol, y, "curricular eval")


@pytest.mark.parametrize("params", [{}, {"m0": 0.5, "T": 1.0, "gamma": 0.3}], ids=["default", "custom"])
def test_kappaface_psi_after_end_epoch_and_next_logits(params):
    _, w, _ = make_batch(seed=2)
    head = build_head("kappaface", params, w, torch.float64)
    ref = Reference("kappaface", C, D, **params)
    # epoch 1: classes 0..5 only; class 5 appears once (r̄ = 1 → clamped to 0.999); 6..8 unseen
    labels = [torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 5]),
              torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 4]),
              torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 3, 3]),
              torch.tensor([0, 1, 2, 3, 4, 0, 0, 2, 0, 0, 1, 1])]
    for k, y in enumerate(labels):
        x, _, _ = step_batch(k)
        z = head.logits(x, y)
        out = ref(x, w, y, train=True)
        assert_matches(z, None, out, 1e-10, 1e-9, y, f"kappa step {k}")
    sd = head.state_dict()
    torch.testing.assert_close(sd["kappa_count"].double(), ref.count)
    torch.testing.assert_close(sd["kappa_feature_sum"].double(), ref.feature_sum, rtol=1e-10, atol=1e-12)
    head.end_epoch()
    ref.end_epoch()
    psi = head.state_dict()["kappa_psi"].double()
    torch.testing.assert_close(psi, ref.psi, rtol=1e-9, atol=1e-12)
    assert torch.equal(psi[6:], torch.ones(3, dtype=torch.float64))   # unseen keep ψ = 1
    assert len(set(psi[:6].tolist())) == 6 and bool((psi[:6] < 1).all())
    assert float(head.state_dict()["kappa_count"].sum()) == 0.0
    assert float(head.state_dict()["kappa_feature_sum"].abs().sum()) == 0.0
    # next step (epoch 2, only class 7 seen): logits use the new ψ
    y = torch.full((B,), 7)
    x, _, _ = step_batch(7)
    y[:6] = torch.tensor([0, 1, 2, 3, 4, 5])
    z = head.logits(x, y)
    out = ref(x, w, y, train=True)
    assert_matches(z, None, out, 1e-10, 1e-9, y, "kappa after end_epoch")
    # epoch 2 end: only classes seen in epoch 2 change; a single... here 7 classes → standardised
    head.end_epoch()
    ref.end_epoch()
    torch.testing.assert_close(head.state_dict()["kappa_psi"].double(), ref.psi, rtol=1e-9, atol=1e-12)
    assert float(head.state_dict()["kappa_psi"][8]) == 1.0
    # epoch 3 with a single seen class: κ̃ = 0 → w_κ = 1/2
    y = torch.full((B,), 8)
    x, _, _ = step_batch(8)
    head.logits(x, y)
    ref(x, w, y, train=True)
    head.end_epoch()
    ref.end_epoch()
    gamma = {**PAPER_DEFAULTS["kappaface"], **params}["gamma"]
    expected_8 = gamma * 0.5 + (1 - gamma) * (math.cos(math.pi / 1.05) + 1) / 2
    assert float(head.state_dict()["kappa_psi"][8]) == pytest.approx(expected_8, rel=1e-9)
    torch.testing.assert_close(head.state_dict()["kappa_psi"].double(), ref.psi, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("params", [{}, {"m": 0.5, "h": 1.0, "t_alpha": 0.2}], ids=["default", "custom"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_adaface_norm_statistics_trajectory_and_logits(params, dtype):
    rtol, atol = TOL[dtype]
    _, w, _ = make_batch(seed=3)
    head = build_head("adaface", params, w, dtype)
    ref = Reference("adaface", C, D, **params)
    ranges = [(2.0, 10.0), (10.0, 90.0), (30.0, 150.0), (0.0005, 0.01), (5.0, 40.0)]
    mus, clipped, inside = [], False, False
    for k, nr in enumerate(ranges):
        x, _, y = step_batch(k, norms=nr)
        z = head.logits(x.to(dtype), y)
        out = ref(x.to(dtype).double(), head_weight64(head), y, train=True)
        sd = head.state_dict()
        assert float(sd["norm_mean"]) == pytest.approx(ref.mu, rel=1e-6)
        assert float(sd["norm_std"]) == pytest.approx(ref.sigma, rel=1e-6)
        mus.append(ref.mu)
        clipped |= bool((ref.last_zhat.abs() == 1).any())
        inside |= bool((ref.last_zhat.abs() < 1).any())
        assert_matches(z, None, out, rtol, atol, y, f"adaface step {k}")
    assert len(set(mus)) == 5
    if params:  # the custom h and t_alpha reach both the clipped and the linear part of ẑ
        assert clipped and inside
    head.eval()
    x, _, y = step_batch(9, norms=(1.0, 80.0))
    z = head.logits(x.to(dtype), y)
    out = ref(x.to(dtype).double(), head_weight64(head), y, train=False)
    assert float(head.state_dict()["norm_mean"]) == pytest.approx(mus[-1], rel=1e-6)
    assert_matches(z, None, out, rtol, atol, y, "adaface eval")


@pytest.mark.parametrize("params", [{}, {"base": 10.0, "gamma": 1.0, "power": 1.0, "lambda_min": 2.0},
                                    {"m": 2, "base": 3.0, "gamma": 0.5, "power": 2.0, "lambda_min": 0.0},
                                    {"base": 10.0, "gamma": 1.0, "lambda_min": 2.0, "lambda_step": "previous"}],
                         ids=["default", "custom-min", "custom-m2", "previous"])
def test_sphereface_lambda_schedule(params):
    p = {**PAPER_DEFAULTS["sphereface"], **params}
    _, w, _ = make_batch(seed=4)
    head = build_head("sphereface", params, w, torch.float64)
    ref = Reference("sphereface", C, D, **params)
    for k in range(6):
        x, _, y = step_batch(k)
        z = head.logits(x, y)
        out = ref(x, w, y, train=True)
        assert_matches(z, None, out, 1e-10, 1e-9, y, f"sphereface step {k}")
        assert int(head.state_dict()["step"]) == k + 1
        # λ recovered from the target logit: f = (ψ + λc)/(1 + λ) → λ = (ψ − f)/(f − c)
        c = cos_matrix(x, w).gather(1, y[:, None]).squeeze(1)
        f = z.gather(1, y[:, None]).squeeze(1) / p["s"]
        psi = sphereface_psi(angle(c), p["m"])
        ok = (f - c).abs() > 1e-6
        lam = (psi - f)[ok] / (f - c)[ok]
        n = k + 1 if p["lambda_step"] == "current" else k   # Caffe counts this step before λ
        expected = sphereface_lambda(n, p["base"], p["gamma"], p["power"], p["lambda_min"])
        torch.testing.assert_close(lam, torch.full_like(lam, expected), rtol=1e-6, atol=1e-6)
    # eval uses the current step without incrementing
    head.eval()
    x, _, y = step_batch(9)
    z1, z2 = head.logits(x, y), head.logits(x, y)
    assert torch.equal(z1, z2) and int(head.state_dict()["step"]) == 6
    assert_matches(z1, None, ref(x, w, y, train=False), 1e-10, 1e-9, y, "sphereface eval")
    # far along the schedule λ is lambda_min (defaults: 1000/(1 + 0.12·2000) < 5)
    sd = head.state_dict()
    sd["step"] = torch.tensor(2000)
    head.load_state_dict(sd)
    ref.step = 2000
    assert_matches(head.logits(x, y), None, ref(x, w, y, train=False), 1e-10, 1e-9, y, "sphereface annealed")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    params = {"sphereface": {"base": 10.0, "gamma": 1.0}, "adaface": {"h": 1.0, "t_alpha": 0.2}}.get(name, {})
    nr = norm_range(name, params)
    _, w, _ = make_batch(seed=5)
    head = build_head(name, params, w, torch.float64)
    ref = Reference(name, C, D, **params)
    for k in range(4):
        x, _, y = step_batch(k, norms=nr)
        torch.manual_seed(100 + k)
        z = head.logits(x, y)
        torch.manual_seed(100 + k)
        out = ref(x, w, y, train=True)
        assert_matches(z, None, out, 1e-10, 1e-9, y, f"{name} step {k}")
        if k == 1:
            head.end_epoch()
            ref.end_epoch()
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = MarginSoftmax(named(name, **params), D, C).double()
    fresh.load_state_dict(torch.load(buf))
    x, _, y = step_batch(10, norms=nr)
    for k in range(2):   # two more steps on both; then the epoch hook and one more step
        torch.manual_seed(200 + k)
        z_orig = head.logits(x, y)
        torch.manual_seed(200 + k)
        z_new = fresh.logits(x, y)
        torch.manual_seed(200 + k)
        out = ref(x, w, y, train=True)
        assert torch.equal(z_orig, z_new), name
        assert_matches(z_new, None, out, 1e-10, 1e-9, y, f"{name} after load")
    head.end_epoch()
    fresh.end_epoch()
    ref.end_epoch()
    torch.manual_seed(300)
    loss_orig = head(x, y)
    torch.manual_seed(300)
    loss_new = fresh(x, y)
    torch.manual_seed(300)
    out = ref(x, w, y, train=True)
    assert torch.equal(loss_orig, loss_new)
    torch.testing.assert_close(loss_new, out.loss, rtol=1e-10, atol=1e-9)
    for key, value in head.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


# ---------------------------------------------------------------------------------- 5. identities
@pytest.mark.parametrize("s", [16.0, 32.0, 64.0])
@pytest.mark.parametrize("a", [-0.5, -10.0, -1000.0])
def test_constant_search_softmax_is_cosface(a, s):
    m = math.log(1.0 - a) / s
    x, w, y = make_batch(seed=6)
    search = build_head("search-softmax", {"s": s, "a": a}, w, torch.float64)
    cosface = build_head("cosface", {"s": s, "m": m}, w, torch.float64)
    xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ls, lc = search(xs, y), cosface(xc, y)
    torch.testing.assert_close(search.logits(x, y), cosface.logits(x, y), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ls, lc, rtol=1e-12, atol=1e-12)
    ls.backward()
    lc.backward()
    torch.testing.assert_close(xs.grad, xc.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(search.weight.grad, cosface.weight.grad, rtol=1e-10, atol=1e-12)
    # and both are the paper's p_m = p/(a p + 1 − a)
    out = Reference("search-softmax", C, D, s=s, a=a)(x, w, y)
    torch.testing.assert_close(ls, out.loss, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mv, sv", [("mv-am", "sv-am"), ("mv-arc", "sv-arc")])
def test_sv_softmax_is_mv_adaptive(mv, sv):
    x, w, y = make_batch(seed=8)
    for t_sv in (1.2, 1.45):
        head_sv = build_head(sv, {"t": t_sv}, w, torch.float64)
        head_mv = build_head(mv, {"t": t_sv - 1.0}, w, torch.float64)
        z_sv, z_mv = head_sv.logits(x, y), head_mv.logits(x, y)
        torch.testing.assert_close(z_sv, z_mv, rtol=1e-12, atol=1e-10)
        ref_sv = Reference(sv, C, D, t=t_sv)(x, w, y)
        ref_mv = Reference(mv, C, D, t=t_sv - 1.0)(x, w, y)
        torch.testing.assert_close(ref_sv.logits, ref_mv.logits, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(z_sv, ref_sv.logits, rtol=1e-10, atol=1e-9)
        mask = (z_sv != cos_matrix(x, w) * 32.0)   # some negatives were re-weighted
        assert int(mask.sum()) > B
    assert named(sv) == named(mv)
    assert identify(named(sv)) == mv


def test_am_lfs_identity_is_normface():
    x, w, y = make_batch(seed=9)
    for params in ({}, {"intervals": 3}, {"intervals": 1, "slopes": [1.0], "intercepts": [0.0]}):
        lfs = build_head("am-lfs", params, w, torch.float64)
        norm = build_head("normface", {}, w, torch.float64)
        torch.testing.assert_close(lfs.logits(x, y), norm.logits(x, y), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(lfs(x, y), norm(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [0.1, 0.35, 0.6])
def test_combined_with_only_cosine_margin_is_cosface(m):
    x, w, y = make_batch(seed=10)
    comb = build_head("combined", {"m1": 1.0, "m2": 0.0, "m3": m}, w, torch.float64)
    cos = build_head("cosface", {"m": m}, w, torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = comb(xa, y), cos(xb, y)
    torch.testing.assert_close(comb.logits(x, y), cos.logits(x, y), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)


def test_arcface_straight_through_value_of_arcface_gradient_of_normface():
    x, w, y = make_batch(seed=12)
    st = build_head("arcface", {"straight_through": True}, w, torch.float64)
    arc = build_head("arcface", {}, w, torch.float64)
    norm = build_head("normface", {}, w, torch.float64)
    # same loss value and logits as ArcFace
    torch.testing.assert_close(st(x, y), arc(x, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.logits(x, y), arc.logits(x, y), rtol=1e-12, atol=1e-10)
    # d(target logit)/d(inputs) equals NormFace's (d f/d cos θ_y = 1), unlike ArcFace's
    grads = {}
    for key, head in (("st", st), ("arc", arc), ("norm", norm)):
        xx = x.clone().requires_grad_()
        head.zero_grad()
        head.logits(xx, y).gather(1, y[:, None]).sum().backward()
        grads[key] = (xx.grad, head.weight.grad.clone())
    torch.testing.assert_close(grads["st"][0], grads["norm"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["st"][1], grads["norm"][1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads["arc"][0], grads["norm"][0])


# ---------------------------------------------------------------------------------- 6. spec layer
def test_unknown_name_lists_the_named_losses():
    with pytest.raises(SpecError) as err:
        named("arcfase")
    msg = str(err.value)
    assert "arcfase" in msg and all(n in msg for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_lists_the_accepted_ones(name):
    with pytest.raises(SpecError) as err:
        named(name, margin=0.5)
    msg = str(err.value)
    assert "margin" in msg and all(k in msg for k in PAPER_DEFAULTS[name])


@pytest.mark.parametrize("name, params, field", [
    ("cosface", {"s": -1.0}, "s"),
    ("arcface", {"s": 0.0}, "s"),
    ("arcface", {"m": math.pi}, "m2_rad"),
    ("arcface", {"m": 3.5}, "m2_rad"),
    ("arcface", {"guard": "wrap"}, "guard"),
    ("search-softmax", {"a": 0.5}, "a"),
    ("search-softmax", {"a": [-1.0] * 9 + [0.1]}, "a[9]"),
    ("sphereface", {"m": 4.5}, "m"),
    ("sphereface", {"lambda_min": -1.0}, "lambda_min"),
    ("sv-am", {"t": 0.9}, "t"),
    ("sv-arc", {"t": 0.5}, "t"),
    ("mv-am", {"t": -0.1}, "t"),
    ("random-softmax", {"sigma": -0.1}, "sigma"),
    ("elasticface-arc", {"sigma": -0.1}, "sigma"),
    ("adaface", {"m": 2.0}, "m"),
    ("magface", {"l_a": 120.0}, "l_a"),
    ("kappaface", {"gamma": 1.5}, "gamma"),
    ("am-lfs", {"intervals": 0}, "intervals"),
    ("am-lfs", {"intervals": 3, "slopes": [1.0, 1.0]}, "slopes"),
])
def test_out_of_range_values_raise_spec_error_naming_the_field(name, params, field):
    with pytest.raises(SpecError) as err:
        named(name, **params)
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_spec_round_trips_through_json_and_is_hashable(name, params):
    spec = named(name, **params)
    text = json.dumps(spec.to_dict())
    back = MarginSpec.from_dict(json.loads(text))
    assert back == spec and hash(back) == hash(spec)
    assert {spec: 1}[back] == 1
    assert json.dumps(back.to_dict()) == text


@pytest.mark.parametrize("name", NAMES)
def test_identify_returns_the_name_or_an_alias_with_an_equal_spec(name):
    found = identify(named(name))
    assert found is not None
    assert found == name or named(found) == named(name)
    assert identify(named(name, s=17.0)) is None or named(identify(named(name, s=17.0))) == named(name, s=17.0)
