"""Auxiliary terms against plain-loop references written from the papers' formulas.

Range loss arXiv 1611.08976, Center loss ECCV 2016, Distribution Distillation Loss arXiv 2002.03662.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from marginsearch.losses import (
    AUXILIARY,
    CenterLoss,
    DistributionDistillationLoss,
    IntraLoss,
    MarginSoftmax,
    RangeLoss,
    WithAuxiliary,
    build_auxiliary,
    named,
)

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rel=1e-10, abs=1e-12), torch.float32: dict(rel=1e-4, abs=1e-5)}
CLOSE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def batch(seed: int = 0, dtype: torch.dtype = torch.float64, labels=(0, 0, 0, 1, 1, 2, 3, 3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 5, generator=g, dtype=torch.float64) * 3
    return x.to(dtype), y


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dist(a, b):
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))


def range_reference(x, y, k, margin, alpha, beta):
    rows = [unit(r) for r in x.double().tolist()]
    classes = sorted(set(y.tolist()))
    intra, centres = 0.0, []
    for c in classes:
        members = [rows[i] for i in range(len(rows)) if int(y[i]) == c]
        centres.append([sum(col) / len(members) for col in zip(*members)])
        ds = sorted((dist(a, b) for a, b in itertools.combinations(members, 2)), reverse=True)[:k]
        if ds:
            intra += len(ds) / sum(1.0 / d for d in ds)
    inter = 0.0
    if len(centres) > 1:
        d_center = min(dist(a, b) ** 2 for a, b in itertools.combinations(centres, 2))
        inter = max(margin - d_center, 0.0)
    return alpha * intra + beta * inter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, margin, alpha, beta", [(2, 0.5, 1.0, 1.0), (1, 3.0, 0.3, 2.0), (5, 0.0, 1.0, 1.0)])
def test_range_loss_matches_reference(dtype, k, margin, alpha, beta):
    x, y = batch(1, dtype)
    got = RangeLoss(k=k, margin=margin, alpha=alpha, beta=beta)(x, y)
    assert got.dtype == dtype
    assert float(got) == pytest.approx(range_reference(x, y, k, margin, alpha, beta), **TOL[dtype])


def test_range_loss_inter_term_is_active_and_degenerate_batches_are_zero():
    x, y = batch(2)
    assert RangeLoss(margin=10.0, alpha=0.0)(x, y) > 0        # margin larger than any centre distance
    assert RangeLoss(margin=0.0, alpha=0.0)(x, y) == 0
    single = torch.arange(4)                                    # no repeated identity, one class each
    xs = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = RangeLoss(margin=0.0)(xs, single)
    loss.backward()
    assert loss == 0 and torch.equal(xs.grad, torch.zeros_like(xs))
    same = torch.zeros(4, dtype=torch.long)                     # one class: no inter term
    assert float(RangeLoss(margin=10.0, alpha=0.0)(xs, same).detach()) == 0.0


def test_range_loss_identical_samples_stay_finite():
    x = torch.ones(4, 5, dtype=torch.float64, requires_grad=True)
    loss = RangeLoss()(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def center_reference(x, y, centres, alpha):
    rows = [unit(r) for r in x.double().tolist()]
    loss = sum(0.5 * sum((a - b) ** 2 for a, b in zip(rows[i], centres[int(y[i])])) for i in range(len(rows)))
    loss /= len(rows)
    new = [list(c) for c in centres]
    for j in range(len(centres)):
        idx = [i for i in range(len(rows)) if int(y[i]) == j]
        delta = [sum(centres[j][d] - rows[i][d] for i in idx) / (1 + len(idx)) for d in range(len(centres[j]))]
        new[j] = [c - alpha * dl for c, dl in zip(centres[j], delta)]
    return loss, new


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_center_loss_and_update_rule_over_steps(dtype):
    module = CenterLoss(num_classes=5, embedding_size=5, alpha=0.5).to(dtype)
    centres = [[0.0] * 5 for _ in range(5)]
    for step in range(3):
        x, y = batch(10 + step, dtype)
        expected, centres = center_reference(x, y, centres, 0.5)
        assert float(module(x, y)) == pytest.approx(expected, **TOL[dtype])
        torch.testing.assert_close(module.centers.double(), torch.tensor(centres, dtype=torch.float64), **CLOSE[dtype])
    assert module.centers[4].abs().sum() == 0                 # class 4 never seen
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    fresh = CenterLoss(5, 5).to(dtype)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.centers, module.centers)


def test_center_loss_eval_mode_leaves_centres_alone():
    module = CenterLoss(4, 5).eval()
    x, y = batch(3, labels=(0, 1, 2, 3))
    module(x, y)
    assert module.centers.abs().sum() == 0


def ddl_reference(x, y, hard, bins, bandwidth, lo, hi, lambdas):
    rows = [unit(r) for r in x.double().tolist()]
    centres = [lo + (hi - lo) * k / (bins - 1) for k in range(bins)]
    groups = {(kind, branch): [] for kind in ("pos", "neg") for branch in ("t", "s")}
    for i, j in itertools.combinations(range(len(rows)), 2):
        s = sum(a * b for a, b in zip(rows[i], rows[j]))
        kind = "pos" if int(y[i]) == int(y[j]) else "neg"
        branch = "s" if (hard[i] or hard[j]) else "t"
        groups[(kind, branch)].append(s)

    def hist(values):
        h = [sum(math.exp(-0.5 * ((v - c) / bandwidth) ** 2) for v in values) for c in centres]
        total = sum(h)
        return [v / total for v in h]

    def kl(p, q):
        return sum(a * (math.log(max(a, 1e-12)) - math.log(max(b, 1e-12))) for a, b in zip(p, q))

    loss = lambdas[0] * kl(hist(groups[("pos", "t")]), hist(groups[("pos", "s")]))
    loss += lambdas[1] * kl(hist(groups[("neg", "t")]), hist(groups[("neg", "s")]))
    mean = {key: sum(v) / len(v) for key, v in groups.items()}
    orders = [mean[("neg", b)] - mean[("pos", a)] for a in ("t", "s") for b in ("t", "s")]
    return loss + lambdas[2] * sum(orders) / 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_range, bins", [((0.0, 1.0), 50), ((-1.0, 1.0), 101)])
def test_ddl_matches_reference_with_hard_flags(dtype, value_range, bins):
    x, y = batch(4, dtype, labels=(0, 0, 0, 1, 1, 1, 2, 2))
    x[1] = x[0] + 0.3 * x[1]                                   # some positive pairs well above 0
    hard = torch.tensor([False, False, True, False, False, True, False, True])
    module = DistributionDistillationLoss(bins=bins, bandwidth=0.2, value_range=value_range, lambdas=(0.3, 0.2, 0.5))
    got = module(x, y, hard=hard)
    expected = ddl_reference(x, y, hard.tolist(), bins, 0.2, *value_range, (0.3, 0.2, 0.5))
    assert float(got) == pytest.approx(expected, **TOL[dtype])


def test_ddl_teacher_is_detached_and_median_split_without_flags():
    x, y = batch(5, labels=(0, 0, 0, 0, 1, 1, 1, 1))
    x.requires_grad_(True)
    easy = torch.tensor([True, True, False, False, True, True, False, False])
    # Only teacher pairs (both samples easy): a loss that only reads the teacher has no gradient.
    module = DistributionDistillationLoss(bins=20, lambdas=(1.0, 1.0, 0.0))
    loss = module(x, y, hard=~easy)
    grads = torch.autograd.grad(loss, x)[0]
    assert grads[~easy].abs().sum() > 0
    # teacher samples still move through the student pairs they belong to: compare to a frozen teacher
    hard_only = torch.tensor([False] * 4 + [True] * 4)
    loss2 = module(x, y, hard=hard_only)
    assert torch.isfinite(loss2)
    unflagged = module(x, y)
    assert torch.isfinite(unflagged) and unflagged.requires_grad


def test_ddl_degenerate_batches_are_zero():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = DistributionDistillationLoss()(x, torch.arange(4), hard=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def intra_reference(x, y, directions):
    import numpy as np
    rows = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    terms = []
    for c in sorted(set(y.tolist())):
        xc = rows[y.numpy() == c]
        if len(xc) < 2:
            continue
        centred = xc - xc.mean(0)
        cov = centred.T @ centred / len(xc)
        vals = np.sort(np.linalg.eigvalsh(cov))[::-1]
        terms.append(vals[:directions].sum())     # variance along the top axes = top eigenvalues
    return sum(terms) / len(terms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("directions", [1, 2])
def test_intra_loss_is_the_top_eigenvalues_of_each_class(dtype, directions):
    x, y = batch(6, dtype)
    got = IntraLoss(directions=directions)(x, y)
    assert float(got) == pytest.approx(intra_reference(x, y, directions), **TOL[dtype])


def test_intra_loss_gradient_acts_along_the_spread_axis():
    # a class spread along e0 only: the gradient has no component along e1..e4
    x = torch.tensor([[1.0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]], dtype=torch.float64)
    x = x + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x.requires_grad_(True)
    IntraLoss(normalize=False)(x, torch.zeros(3, dtype=torch.long)).backward()
    assert x.grad[:, 0].abs().sum() > 0 and x.grad[:, 1:].abs().sum() == 0
    single = torch.randn(3, 5, dtype=torch.float64)
    assert float(IntraLoss()(single, torch.arange(3))) == 0.0


@pytest.mark.parametrize("name", ["range", "center", "ddl", "intra"])
def test_gradcheck_float64(name):
    x, y = batch(7, labels=(0, 0, 0, 1, 1, 2, 2, 2))
    x = x.detach().requires_grad_(True)
    params = {"ddl": dict(bins=30, value_range=(-1.0, 1.0)), "range": dict(margin=4.0)}.get(name, {})
    module = build_auxiliary(name, num_classes=3, embedding_size=5, **params).double().eval()
    if name == "center":
        module.centers.normal_()
    if name == "ddl":  # the teacher (pairs of easy samples) is detached: vary only the hard samples
        hard = torch.tensor([False, True, False, False, True, False, False, True])
        easy = x.detach()[~hard]

        def fn(v):
            full = torch.empty_like(x, dtype=v.dtype)
            full = full.index_put((torch.nonzero(~hard).squeeze(1),), easy).index_put(
                (torch.nonzero(hard).squeeze(1),), v)
            return module(full, y, hard=hard)
        assert torch.autograd.gradcheck(fn, (x.detach()[hard].requires_grad_(True),), eps=1e-6, atol=1e-6)
        return
    assert torch.autograd.gradcheck(lambda v: module(v, y), (x,), eps=1e-6, atol=1e-6)


def test_table_and_builder_errors():
    assert set(AUXILIARY) == {"range", "center", "ddl", "intra"}
    with pytest.raises(ValueError, match="unknown auxiliary loss 'rnage'; known: range"):
        build_auxiliary("rnage", 3, 5)
    with pytest.raises(ValueError, match="'range'.*unexpected keyword"):
        build_auxiliary("range", 3, 5, mrgin=1.0)
    with pytest.raises(ValueError, match="k ≥ 1"):
        RangeLoss(k=0)


def test_with_auxiliary_sums_weighted_terms_and_routes_batch_fields():
    torch.manual_seed(0)
    head = MarginSoftmax(named("cosface"), 5, 4).double()
    terms = {"range": (0.5, RangeLoss()), "ddl": (0.25, DistributionDistillationLoss(bins=20))}
    objective = WithAuxiliary(head, terms)
    x, y = batch(8, labels=(0, 0, 1, 1, 2, 2, 3, 3))
    hard = torch.tensor([False, True] * 4)
    parts = objective.parts(x, y, hard=hard)        # RangeLoss does not take `hard`: not passed to it
    assert set(parts) == {"head", "range", "ddl"}
    torch.testing.assert_close(parts["head"], head(x, y))
    torch.testing.assert_close(parts["ddl"], terms["ddl"][1](x, y, hard=hard))
    total = objective(x, y, hard=hard)
    torch.testing.assert_close(total, parts["head"] + 0.5 * parts["range"] + 0.25 * parts["ddl"])
