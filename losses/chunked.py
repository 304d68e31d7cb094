"""Log-sum-exp of a margin head's negative logits, class chunk by class chunk, with a hand-written backward.

The head's loss is `logaddexp(lse_neg, z_y) − z_y` with z_y = s·f(cos θ_y) (minus a modulation
shift) and lse_neg = log Σ_{j≠y} e^{s·g(cos θ_j)}. `negative_logsumexp` returns lse_neg and cos θ_y;
the target transform f, its per-sample margins and the shift stay outside, under autograd.

Inside, cosines are `(x_unit @ W.t()) · (1/‖W_j‖)`: the class centres are never copied to a
normalised matrix. With `chunk=None` the [B, C] cosines are kept for the backward (one matmul
fewer); with `chunk=N` only N classes are live at a time, forward (online log-sum-exp) and
backward (the chunk's cosines recomputed), so the extra memory is O(B·N) besides the gradient of W.
On CPU both modes work in blocks of about 2^18 logits (`block_classes`) so that the elementwise
passes (scale, re-weighting, exp, sums) run in cache instead of streaming [B, C] through memory
once per pass; the full mode keeps every block's logits, so its memory is unchanged.
The negatives' cosines are not clamped to [−1, 1] (they leave it by rounding only, and g is a
polynomial); the target cosine is, with clamp's gradient. First-order gradients only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import transforms as T

__all__ = ["NORM_EPS", "block_classes", "inverse_norms", "target_cosines", "negative_logsumexp"]

NORM_EPS = 1e-12  # as F.normalize
BLOCK_ELEMENTS = 1 << 18  # logits per block of work on CPU: 1 MiB of float32, resident in a core's cache
MIN_BLOCK = 256           # fewest classes per block (large batches)


def inverse_norms(weight: Tensor) -> Tensor:
    """1/max(‖W_j‖, 1e-12) per class centre [C] (F.normalize's convention)."""
    return weight.norm(dim=1).clamp_min(NORM_EPS).reciprocal()


def target_cosines(x_unit: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """cos θ_y [B] = <x_unit_i, W_{y_i}>/‖W_{y_i}‖ clamped to [−1, 1], in O(B·D)."""
    w_y = weight.index_select(0, labels)
    return ((x_unit * w_y).sum(1) * inverse_norms(w_y)).clamp(-1.0, 1.0)


def _target_cells(labels: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(rows, local columns) of the target cells that fall in the chunk lo..hi − 1."""
    rows = ((labels >= lo) & (labels < hi)).nonzero().squeeze(1)
    return rows, labels.index_select(0, rows) - lo


def _hard(cos: Tensor, threshold: Tensor) -> Tensor:
    """1.0 where cos θ_ij > the row's threshold (a mis-classified negative), else 0.0, as a float mask."""
    return torch.gt(cos, threshold[:, None], out=torch.empty_like(cos))


def _chunk_logits(x_unit: Tensor, weight: Tensor, inv: Tensor, scale: Tensor, labels: Tensor,
                  threshold: Tensor | None, rule: str | None, t: Tensor, lo: int, hi: int,
                  clamp: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """(negative logits z [B, hi − lo] with −inf in the target cells, unclamped cosines or None).

    Without a rule or clamp z = s·cos is written over the matmul's output; with a rule, z = s·g(c)
    on the mis-classified cells (c > threshold), c the cosines clamped to ±(1 − clamp) if clamp > 0,
    and the unclamped cosines are returned too.
    """
    rows, cols = _target_cells(labels, lo, hi)
    product = x_unit @ weight[lo:hi].t()
    if rule is None and clamp == 0.0:
        z, cos = product.mul_(inv[lo:hi] * scale), None
    else:
        cos = product.mul_(inv[lo:hi])
        c = T.clamp_cos(cos, clamp)
        if rule is None:
            z = c * scale
        else:
            assert threshold is not None
            z = torch.addcmul(c, _hard(c, threshold), T.NEGATIVE_RULE_DELTAS[rule](c, t)).mul_(scale)
    z.index_put_((rows, cols), z.new_full((), -float("inf")))
    return z, cos


def block_classes(batch: int, num_classes: int, device: torch.device) -> int:
    """Classes per block of work: [B, N] float32 blocks of about `BLOCK_ELEMENTS` on CPU (cache-resident), all C on
    other devices."""
    if device.type != "cpu":
        return num_classes
    return max(MIN_BLOCK, BLOCK_ELEMENTS // max(1, batch))


class _NegativeLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_unit: Tensor, weight: Tensor, scale: Tensor, labels: Tensor, threshold: Tensor | None,
                rule: str | None, t: Tensor, chunk: int | None, clamp: float) -> tuple[Tensor, Tensor]:
        num_classes = weight.shape[0]
        step = min(chunk or num_classes, block_classes(x_unit.shape[0], num_classes, x_unit.device))
        inv = inverse_norms(weight)
        cos_y_raw = (x_unit * weight.index_select(0, labels)).sum(1) * inv.index_select(0, labels)
        lse = x_unit.new_full((x_unit.shape[0],), -float("inf"))
        kept_z: list[Tensor] = []
        kept_cos: list[Tensor] = []
        for lo in range(0, num_classes, step):
            hi = min(num_classes, lo + step)
            z, cos = _chunk_logits(x_unit, weight, inv, scale, labels, threshold, rule, t, lo, hi, clamp)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            if chunk is None:  # full mode: keep each block for the backward instead of recomputing it
                kept_z.append(z)
                if cos is not None:
                    kept_cos.append(cos)
        ctx.save_for_backward(x_unit, weight, scale, labels, threshold, t, inv, lse, cos_y_raw, *kept_z, *kept_cos)
        ctx.rule, ctx.step, ctx.kept, ctx.clamp = rule, step, len(kept_z), clamp
        return lse, cos_y_raw.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, g_lse: Tensor, g_cos_y: Tensor):
        x_unit, weight, scale, labels, threshold, t, inv, lse, cos_y_raw, *kept = ctx.saved_tensors
        kept_z, kept_cos = kept[:ctx.kept], kept[ctx.kept:]
        num_classes, step, rule, clamp = weight.shape[0], ctx.step, ctx.rule, ctx.clamp
        need_x, need_w, need_s = ctx.needs_input_grad[:3]
        g_x = torch.zeros_like(x_unit) if need_x else None
        g_w = torch.empty_like(weight) if need_w else None
        g_s = torch.zeros_like(scale) if need_s else None
        # the target cosine: clamp(−1, 1) passes its gradient on [−1, 1]
        g_y = g_cos_y * ((cos_y_raw >= -1.0) & (cos_y_raw <= 1.0)).to(g_cos_y.dtype)
        # d inv_j/d W_j = −inv_j³ W_j where ‖W_j‖ ≥ eps (clamp_min passes the gradient there), else 0:
        # W_j's gradient gets −inv_j² (Σ_i dL/dcos_ij · cos_ij) W_j besides the matmul's.
        norm_coef = -(inv * inv) * (inv <= 1.0 / NORM_EPS).to(inv.dtype)
        target_sum = torch.zeros_like(inv).index_add_(0, labels, g_y * cos_y_raw)
        target_raw = g_y * inv.index_select(0, labels)  # dL/d(x_unit·W_y) of the target cells
        for block, lo in enumerate(range(0, num_classes, step)):
            hi = min(num_classes, lo + step)
            if kept_z:
                z, cos = kept_z[block], (kept_cos[block] if kept_cos else None)
            else:
                z, cos = _chunk_logits(x_unit, weight, inv, scale, labels, threshold, rule, t, lo, hi, clamp)
            rows, cols = _target_cells(labels, lo, hi)
            d_raw = torch.sub(z, lse[:, None]).exp_().mul_(g_lse[:, None])  # dL/dz_ij, 0 in the target cells
            if need_s:  # dz/ds = z/s on the negatives
                g_s += (d_raw * z).index_put_((rows, cols), z.new_zeros(())).sum() / scale
            if rule is not None:  # dz/dc = s·g'(c) on the mis-classified cells, s elsewhere
                assert cos is not None and threshold is not None
                c = T.clamp_cos(cos, clamp)
                d_raw.mul_(torch.addcmul(c.new_ones(()), _hard(c, threshold), T.NEGATIVE_RULE_DELTA_GRADS[rule](c, t)))
            if clamp > 0.0:   # dc/dcos = 1 inside [−1 + clamp, 1 − clamp], else 0 (clamp's gradient)
                assert cos is not None
                d_raw.mul_(((cos >= -1.0 + clamp) & (cos <= 1.0 - clamp)).to(d_raw.dtype))
            d_raw.mul_(inv[lo:hi] * scale)   # dL/d(x_unit·W_j)
            d_raw.index_put_((rows, cols), target_raw.index_select(0, rows))
            if g_x is not None:
                g_x.addmm_(d_raw, weight[lo:hi])
            if g_w is not None:  # Σ_i dL/dcos_ij·cos_ij = Σ_i d_raw_ij·cos_ij/inv_j, over d_raw's buffer
                torch.mm(d_raw.t(), x_unit, out=g_w[lo:hi])
                if cos is None:
                    column = d_raw.mul_(z).index_put_((rows, cols), z.new_zeros(())).sum(0) / (inv[lo:hi] * scale)
                else:
                    column = d_raw.mul_(cos).index_put_((rows, cols), z.new_zeros(())).sum(0) / inv[lo:hi]
                g_w[lo:hi].addcmul_(weight[lo:hi], ((column + target_sum[lo:hi]) * norm_coef[lo:hi])[:, None])
        return g_x, g_w, g_s, None, None, None, None, None, None


def negative_logsumexp(x_unit: Tensor, weight: Tensor, labels: Tensor, scale: Tensor,
                       threshold: Tensor | None = None, rule: str | None = None, t: Tensor | float = 0.0,
                       chunk: int | None = None, clamp: float = 0.0) -> tuple[Tensor, Tensor]:
    """(lse_neg [B], cos θ_y [B]) for unit embeddings [B, D], centres [C, D] and labels [B] in [0, C).

    lse_neg = log Σ_{j≠y} e^{s·g_j}, g_j = rule(cos θ_j, t) where cos θ_j > threshold (the row's
    detached f(θ_y)), else cos θ_j (MV-Softmax / CurricularFace; `rule` None: no re-weighting).
    Differentiable w.r.t. x_unit, weight and scale (first order only). `chunk`: classes per
    step, None keeps the [B, C] cosines for the backward instead of recomputing them. `clamp` > 0
    clamps the negatives' cosines to ±(1 − clamp) first (AdaFace's official head).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of classes, got {chunk}")
    if rule is not None and threshold is None:
        raise ValueError(f"negative rule {rule!r} needs the per-row threshold f(θ_y)")
    t_tensor = torch.as_tensor(t, dtype=x_unit.dtype, device=x_unit.device).detach().clone()
    return _NegativeLogSumExp.apply(x_unit, weight, scale, labels, threshold, rule, t_tensor, chunk, float(clamp))
