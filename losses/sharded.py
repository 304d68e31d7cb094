"""`ShardedMarginSoftmax`: the margin head with its class centres split across processes (model parallel).

Each rank of the process group owns the contiguous classes [⌊C·r/W⌋, ⌊C·(r+1)/W⌋) as its
`weight`, as in Partial FC's model-parallel head (An et al., arXiv 2010.05222). One forward on
every rank's local batch: the unit embeddings and labels are all-gathered (the embeddings'
gradient is summed over the ranks and sliced back in backward), each rank computes the cosines
of the global batch against its shard, the target cosine comes from the owning rank (all-reduce
of a row value that is zero elsewhere), the log-sum-exp of the negatives is reduced across ranks
(max, then sum of exponentials), and every rank returns the same mean loss over the global batch.

Gradients are those of that one loss: every rank must call `backward` on it (the embedding
gather all-reduces in backward); a rank's embeddings get the gradient of the global loss
w.r.t. its rows, its shard the gradient w.r.t. its classes. DDP's averaging of the backbone
gradients then divides them by W, as for any loss that is a mean over the global batch.

The spec's components are the full head's (`losses.components`: same buffers, statistics and
transforms, in the same order). Randomness (ElasticFace's per-sample margins, Random-Softmax's
factor) is drawn on rank 0 from torch's default generator in the full head's order and
broadcast, so the step equals a single-process `MarginSoftmax` on the concatenated batch seeded
like rank 0. Running statistics (CurricularFace's t, SphereFace's step, AdaFace's norm
statistics) use the global batch and stay equal on every rank. Not supported yet: the components
whose `sharded` is False (KappaFace, MagFace) and a learnable scale.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import components as K
from . import transforms as T
from .chunked import inverse_norms
from .head import margin_loss
from .spec import MarginSpec, SpecError

__all__ = ["ShardedMarginSoftmax", "shard_bounds"]


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the classes rank `rank` of `world_size` owns: ⌊C·r/W⌋ to ⌊C·(r+1)/W⌋."""
    return num_classes * rank // world_size, num_classes * (rank + 1) // world_size


def _gather_rows(tensor: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, list[int]]:
    """(the ranks' tensors concatenated along dim 0, rows per rank); local row counts may differ."""
    world = dist.get_world_size(group)
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


class _GatherRows(torch.autograd.Function):
    """All-gather rows forward; backward sums the global gradient over the ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        gathered, sizes = _gather_rows(tensor, group)
        rank = dist.get_rank(group)
        ctx.group, ctx.lo, ctx.hi = group, sum(sizes[:rank]), sum(sizes[: rank + 1])
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.lo: ctx.hi], None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM of a value every rank computes the same loss from; backward keeps the gradient local.

    For values that are zero on all ranks but one (the owner's target cosine), the gradient
    reaches exactly the owner's term.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _DistributedLogSumExp(torch.autograd.Function):
    """Row log-sum-exp over the classes of every rank from local logits [N, C_r] (−inf allowed): max, then sum of
    exp."""

    @staticmethod
    def forward(ctx, z: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        row_max = z.max(dim=1).values if z.shape[1] else z.new_full((z.shape[0],), -math.inf)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sums = torch.exp(z - row_max[:, None]).sum(dim=1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = row_max + torch.log(sums)
        ctx.save_for_backward(z, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, lse = ctx.saved_tensors   # d lse_i / d z_ij = softmax_ij over all classes; exp(−inf) = 0
        return grad[:, None] * torch.exp(z - lse[:, None]), None


def _broadcast_draw(draw: Callable[[], Tensor], group: dist.ProcessGroup | None) -> Tensor:
    """`draw()` on every rank (generators advance alike); the group's first rank's values are kept everywhere."""
    value = draw().contiguous()
    dist.broadcast(value, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return value


class ShardedMarginSoftmax(nn.Module):
    """Margin-softmax loss (any supported `MarginSpec`) with the class centres split across the ranks of `group`.

    `weight` [hi − lo, embedding_size] holds this rank's classes (`bounds` = (lo, hi)); needs an
    initialised process group and num_classes ≥ world size. `forward` is collective.
    """

    def __init__(self, spec: MarginSpec, embedding_size: int, num_classes: int, *,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(spec, MarginSpec):
            raise TypeError(f"spec must be a MarginSpec, got {type(spec).__name__}")
        parts = K.components_of(spec)
        for feature in K.unsupported_by_sharded(parts) + (["a learnable scale"] if spec.learnable_scale else []):
            raise SpecError(f"sharded head does not support {feature} yet")
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(f"need embedding_size ≥ 1 and num_classes ≥ 2, got {embedding_size}, {num_classes}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("sharded head needs an initialised torch.distributed process group")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if num_classes < world:
            raise ValueError(f"sharded head needs num_classes ≥ world size, got {num_classes} < {world}")
        self.spec, self.group = spec, group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.bounds = shard_bounds(num_classes, world, rank)
        self.weight = nn.Parameter(torch.empty(self.bounds[1] - self.bounds[0], embedding_size).normal_(0.0, 0.01))
        self.register_buffer("scale", torch.tensor(float(spec.s)), persistent=False)
        self.parts = parts
        K.register_buffers(self, parts, num_classes, embedding_size)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.bounds[0]}, {self.bounds[1]}), spec={self.spec}")

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the global batch from this rank's un-normalised embeddings [B_r, D] and labels [B_r]."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {list(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape [{embeddings.shape[0]}], "
                             f"got {labels.dtype} {list(labels.shape)}")
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        x, w = embeddings.to(dtype), self.weight.to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            local_norms = x.norm(dim=1)
            x_unit = _GatherRows.apply(x / local_norms.clamp_min(1e-12)[:, None], self.group)
            norms, _ = _gather_rows(local_norms.detach(), self.group)
            labels, _ = _gather_rows(labels.long(), self.group)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                                 f"got [{int(labels.min())}, {int(labels.max())}]")
            lo, hi = self.bounds
            owned = (labels >= lo) & (labels < hi)
            rows = owned.nonzero().squeeze(1)
            cols = labels.index_select(0, rows) - lo
            inv = inverse_norms(w)
            cos = (x_unit @ w.t()) * inv                      # [N, C_r] against this rank's classes
            own_cos_y = torch.zeros_like(norms).index_put((rows,), cos[rows, cols].clamp(-1.0, 1.0))
            cos_y = _SumOverRanks.apply(own_cos_y, self.group)
            scale = self.get_buffer("scale").to(dtype)
            draw = lambda shape: _broadcast_draw(  # noqa: E731  every rank uses rank 0's draws
                lambda: torch.randn(shape, device=x.device, dtype=torch.float32), self.group)
            plan = K.plan(self, self.parts, K.Step(labels, norms, x_unit.detach(), cos_y.detach(), self.training, draw),
                          scale)
            cos = T.clamp_cos(cos, plan.cos_clamp)
            if plan.rule is not None and plan.threshold is not None:
                cos = torch.where(cos > plan.threshold[:, None], T.NEGATIVE_RULE_FNS[plan.rule](cos, plan.t), cos)
            target_cells = torch.zeros_like(cos, dtype=torch.bool)
            target_cells[rows, cols] = True
            lse_neg = _DistributedLogSumExp.apply((cos * scale).masked_fill(target_cells, -math.inf), self.group)
            return margin_loss(scale * plan.f(cos_y), lse_neg, plan.a) + plan.extra

    def end_epoch(self) -> None:
        """Epoch hook of the head interface: each component's."""
        K.end_epoch(self, self.parts)

    def summed_buffers(self) -> tuple[str, ...]:
        """Names of this head's buffers that are per-rank sums (none of the supported components keeps any)."""
        return K.summed_buffers(self.parts)
