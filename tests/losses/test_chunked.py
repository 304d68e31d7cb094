"""Class-chunked head and its log-sum-exp Function: equal to the full head, values and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from marginsearch.losses import NAMED, MarginSoftmax, MarginSpec, chunked, named
from marginsearch.losses.chunked import negative_logsumexp

B, D, C = 9, 6, 11


def _batch(dtype: torch.dtype, seed: int = 0, b: int = B, d: int = D, c: int = C):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, d, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[:3] = torch.tensor([0, c - 1, c // 2])   # first, last and a middle class: chunk edges
    return x, w, y


def _step(head: MarginSoftmax, x: torch.Tensor, y: torch.Tensor, seed: int = 5):
    xin = x.clone().requires_grad_()
    torch.manual_seed(seed)
    loss = head(xin, y)
    loss.backward()
    grads = [xin.grad, head.weight.grad] + ([head.scale.grad] if isinstance(head.scale, torch.nn.Parameter) else [])
    return loss.detach(), grads


def _pair(spec: MarginSpec, w: torch.Tensor, chunk: int, dtype: torch.dtype, c: int = C):
    full = MarginSoftmax(spec, w.shape[1], c).to(dtype)
    with torch.no_grad():
        full.weight.copy_(w)
    chunked = copy.deepcopy(full)
    chunked.class_chunk = chunk
    return full, chunked


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("chunk", [1, 4, C])
@pytest.mark.parametrize("name", list(NAMED))
def test_chunked_equals_full_float64(name, chunk, train):
    """Every named point, two steps (state carried over), float64: loss and gradients to rounding."""
    x, w, y = _batch(torch.float64)
    full, chunked = _pair(named(name), w, chunk, torch.float64)
    full.train(train)
    chunked.train(train)
    for k in range(2):
        loss_f, grads_f = _step(full, x * (1 + 0.3 * k), (y + k) % C)
        loss_c, grads_c = _step(chunked, x * (1 + 0.3 * k), (y + k) % C)
        torch.testing.assert_close(loss_c, loss_f, rtol=1e-12, atol=1e-12)
        for gc, gf in zip(grads_c, grads_f):
            torch.testing.assert_close(gc, gf, rtol=1e-10, atol=1e-12)
        full.weight.grad = chunked.weight.grad = None
    for (key, a), b in zip(full.state_dict().items(), chunked.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("name", ["normface", "arcface", "mv-arc", "curricularface", "search-softmax", "magface"])
def test_chunked_equals_full_float32_many_classes(name):
    x, w, y = _batch(torch.float32, seed=1, b=32, d=24, c=1000)
    full, chunked = _pair(named(name), w * 0.05, 128, torch.float32, c=1000)
    loss_f, grads_f = _step(full, x, y)
    loss_c, grads_c = _step(chunked, x, y)
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-5, atol=1e-6)
    for gc, gf in zip(grads_c, grads_f):  # atol relative to the gradient's size: W's has cancelling terms
        torch.testing.assert_close(gc, gf, rtol=1e-4, atol=1e-5 * float(gf.abs().max()))


@pytest.mark.parametrize("name", list(NAMED))
def test_full_head_in_blocks_equals_one_block(name, monkeypatch):
    """The full mode keeps each CPU block's logits; split into blocks of 3 classes it matches one block (float64)."""
    x, w, y = _batch(torch.float64)
    one, blocked = _pair(named(name), w, None, torch.float64)
    loss_1, grads_1 = _step(one, x, y)
    _small_blocks(monkeypatch, 3)
    loss_b, grads_b = _step(blocked, x, y)
    torch.testing.assert_close(loss_b, loss_1, rtol=1e-12, atol=1e-12)
    for gb, g1 in zip(grads_b, grads_1):
        torch.testing.assert_close(gb, g1, rtol=1e-10, atol=1e-12)


def test_learnable_scale_gradient_matches_full():
    x, w, y = _batch(torch.float64)
    full, chunked = _pair(MarginSpec(s=10.0, learnable_scale=True), w, 3, torch.float64)
    _, grads_f = _step(full, x, y)
    _, grads_c = _step(chunked, x, y)
    assert grads_c[2] is not None and grads_c[2].abs() > 0
    torch.testing.assert_close(grads_c[2], grads_f[2], rtol=1e-10, atol=1e-12)


def _small_blocks(monkeypatch, classes: int) -> None:
    """CPU blocks of `classes` classes for a batch of B: several blocks even at C = 11."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", classes * B)
    monkeypatch.setattr(chunked, "MIN_BLOCK", 1)


@pytest.mark.parametrize("rule, t", [(None, 0.0), ("mv-fixed", 0.2), ("mv-adaptive", 0.2), ("curricular", 0.3)])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("block", [None, 4], ids=["one-block", "blocks-of-4"])
def test_negative_logsumexp_against_autograd_reference(rule, t, chunk, block, monkeypatch):
    """Value vs log Σ_{j≠y} e^{s·g} written with autograd; gradient by gradcheck (x, W, s)."""
    if block is not None:
        _small_blocks(monkeypatch, block)
        assert chunked.block_classes(B, C, torch.device("cpu")) == block
    x, w, y = _batch(torch.float64, seed=2)
    xu = F.normalize(x, dim=1).requires_grad_()
    w = w.requires_grad_()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    threshold = torch.linspace(-0.5, 0.3, B, dtype=torch.float64)
    g_fns = {"mv-fixed": lambda c: c + t, "mv-adaptive": lambda c: (1 + t) * c + t, "curricular": lambda c: c * (t + c)}

    def reference(xu, w, s):
        cos = xu @ F.normalize(w, dim=1).t()
        out = cos if rule is None else torch.where(cos > threshold[:, None], g_fns[rule](cos), cos)
        z = (s * out).masked_fill(F.one_hot(y, C).bool(), -float("inf"))
        return torch.logsumexp(z, dim=1), cos.gather(1, y[:, None]).squeeze(1)

    def ours(xu, w, s):
        return negative_logsumexp(xu, w, y, s, threshold if rule else None, rule, t, chunk)

    for a, b in zip(ours(xu, w, s), reference(xu, w, s)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: sum(o.sum() * k for k, o in enumerate(ours(*a), 1)),
                                    (xu, w, s), eps=1e-6, atol=1e-6, rtol=1e-5)


class _LargestOutput(TorchDispatchMode):
    """Records the shapes of every tensor that an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def test_chunked_mode_never_builds_batch_by_class_tensors():
    b, d, c, chunk = 8, 16, 2000, 100
    x, w, y = _batch(torch.float32, seed=3, b=b, d=d, c=c)
    head = MarginSoftmax(named("curricularface"), d, c, class_chunk=chunk)
    xin = x.requires_grad_()
    with _LargestOutput() as mode:
        head(xin, y).backward()
    others = [s for s in mode.shapes if s not in ((c, d), (c,))]
    assert max(torch.Size(s).numel() for s in others) <= max(b, d) * chunk   # [B, chunk] or a [chunk, D] slice of W
    full = MarginSoftmax(named("curricularface"), d, c)
    with _LargestOutput() as mode:
        full(x.clone().requires_grad_(), y).backward()
    assert (b, c) in mode.shapes   # the check above could fail


def test_bad_class_chunk_raises():
    with pytest.raises(ValueError, match="class_chunk"):
        MarginSoftmax(named("arcface"), D, C, class_chunk=0)


def test_logits_in_chunked_mode_cover_all_classes():
    x, w, y = _batch(torch.float64)
    full, chunked = _pair(named("arcface"), w, 4, torch.float64)
    torch.testing.assert_close(chunked.logits(x, y), full.logits(x, y))
