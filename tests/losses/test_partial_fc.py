"""Partial FC: the class sample, and the sampled head against a full head on the sampled classes."""
from __future__ import annotations

import math

import pytest
import torch

from marginsearch.losses import MarginSoftmax, named
from marginsearch.losses.partial_fc import sample_classes

B, D, C = 12, 6, 40


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 2.0
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return x, w, y


@pytest.mark.parametrize("rate", [0.05, 0.25, 0.6, 1.0])
def test_sample_keeps_positives_and_remaps_labels(rate):
    _, _, y = _batch()
    index, local = sample_classes(y, C, rate, generator=torch.Generator().manual_seed(1))
    positives = set(y.tolist())
    assert positives <= set(index.tolist())
    assert index.numel() == max(math.ceil(rate * C), len(positives), 2)
    assert torch.equal(index, torch.unique(index))              # sorted, no repeats
    assert torch.equal(index[local], y)


def test_sample_is_deterministic_and_uniform_over_negatives():
    y = torch.tensor([0, 1, 1])
    draw = lambda seed: sample_classes(y, C, 0.25, generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    counts = torch.zeros(C)
    for seed in range(400):
        counts[draw(seed)] += 1
    assert counts[:2].eq(400).all()
    negatives = counts[2:] / 400          # each of 38 negatives kept with probability 8/38
    assert (negatives - 8 / 38).abs().max() < 0.1


@pytest.mark.parametrize("name", ["normface", "arcface", "mv-arc", "curricularface", "search-softmax"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_sampled_head_is_the_full_head_on_the_sampled_classes(name, chunk):
    x, w, y = _batch()
    rate = 0.3
    head = MarginSoftmax(named(name), D, C, sample_rate=rate, class_chunk=chunk).double()
    with torch.no_grad():
        head.weight.copy_(w)
    xin = x.clone().requires_grad_()
    torch.manual_seed(11)
    loss = head(xin, y)
    loss.backward()

    torch.manual_seed(11)
    index, local = sample_classes(y, C, rate)
    ref = MarginSoftmax(named(name), D, index.numel()).double()
    with torch.no_grad():
        ref.weight.copy_(w[index])
    xref = x.clone().requires_grad_()
    loss_ref = ref(xref, local)
    loss_ref.backward()

    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xin.grad, xref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad[index], ref.weight.grad, rtol=1e-10, atol=1e-12)
    others = torch.ones(C, dtype=torch.bool)
    others[index] = False
    assert others.any() and head.weight.grad[others].abs().max() == 0


def test_eval_mode_uses_every_class():
    x, w, y = _batch(1)
    sampled = MarginSoftmax(named("arcface"), D, C, sample_rate=0.1).double().eval()
    full = MarginSoftmax(named("arcface"), D, C).double().eval()
    with torch.no_grad():
        sampled.weight.copy_(w)
        full.weight.copy_(w)
    torch.testing.assert_close(sampled(x, y), full(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, "half", True])
def test_bad_sample_rate_raises(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        MarginSoftmax(named("arcface"), D, C, sample_rate=rate)
