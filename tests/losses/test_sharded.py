"""Model-parallel head on 2 gloo processes: equal to one full head on the concatenated batch, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marginsearch.losses import MarginSoftmax, ShardedMarginSoftmax, SpecError, named
from marginsearch.losses.sharded import shard_bounds

D, C = 6, 11
LOCAL_ROWS = (5, 4)   # unequal local batches
EXACT = ["normface", "cosface", "arcface", "combined", "sphereface", "mv-arc", "sv-am", "curricularface",
         "search-softmax", "random-softmax", "am-lfs", "elasticface-arc", "adaface"]
FLOAT32 = ["arcface", "mv-am", "curricularface", "sphereface", "adaface", "elasticface-arc"]


def _global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(LOCAL_ROWS)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 3.0
    y = torch.randint(0, C, (n,), generator=g)
    y[:4] = torch.tensor([0, C - 1, 4, 5])   # first and last class, both sides of the shard edge (5)
    return x, y


def _max_errors(name: str, rank: int, dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Two training steps of the sharded head on this rank's rows and of a full head on all rows."""
    full = MarginSoftmax(named(name), D, C).to(dtype)
    with torch.no_grad():
        full.weight.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    sharded = ShardedMarginSoftmax(named(name), D, C).to(dtype)
    lo, hi = sharded.bounds
    with torch.no_grad():
        sharded.weight.copy_(full.weight[lo:hi])
    first = sum(LOCAL_ROWS[:rank])
    rows = slice(first, first + LOCAL_ROWS[rank])
    errors = {"loss": 0.0, "x_grad": 0.0, "w_grad": 0.0, "buffers": 0.0}
    for step in range(2):
        x, y = _global_batch(step)
        x = x.to(dtype)
        x_full = x.clone().requires_grad_()
        torch.manual_seed(step)
        loss_full = full(x_full, y)
        loss_full.backward()
        x_local = x[rows].clone().requires_grad_()
        torch.manual_seed(step if rank == 0 else 1000 + step)   # only rank 0's draws may count
        loss = sharded(x_local, y[rows])
        loss.backward()
        errors["loss"] = max(errors["loss"], float((loss - loss_full).abs()))
        errors["x_grad"] = max(errors["x_grad"], float((x_local.grad - x_full.grad[rows]).abs().max()))
        errors["w_grad"] = max(errors["w_grad"], float((sharded.weight.grad - full.weight.grad[lo:hi]).abs().max()))
        assert float(full.weight.grad[lo:hi].abs().max()) > 0
        full.weight.grad = sharded.weight.grad = None
    full_buffers = dict(full.named_buffers())
    for key, value in sharded.named_buffers():
        errors["buffers"] = max(errors["buffers"], float((value.double() - full_buffers[key].double()).abs().max()))
    return errors


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        errors = {name: _max_errors(name, rank) for name in EXACT}
        errors.update({f"{name}/float32": _max_errors(name, rank, torch.float32) for name in FLOAT32})
        torch.save(errors, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, str(tmp / "rendezvous"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("name", EXACT)
def test_sharded_head_equals_full_head_on_the_concatenated_batch(errors, name):
    for rank, per_rank in enumerate(errors):
        for what, err in per_rank[name].items():
            assert err <= 1e-10, f"rank {rank}: {what} differs by {err:.3g}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("name", FLOAT32)
def test_sharded_head_equals_full_head_in_float32(errors, name):
    for rank, per_rank in enumerate(errors):
        for what, err in per_rank[f"{name}/float32"].items():
            assert err <= 2e-5, f"rank {rank}: {what} differs by {err:.3g} (float32)"


def test_shard_bounds_cover_every_class_once():
    for c, w in [(11, 2), (10, 3), (7, 7), (100, 8)]:
        bounds = [shard_bounds(c, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


@pytest.mark.parametrize("name, feature", [("kappaface", "KappaFace"), ("magface", "MagFace")])
def test_unsupported_points_raise_a_value_error(name, feature):
    with pytest.raises(SpecError, match=f"sharded head does not support {feature}"):
        ShardedMarginSoftmax(named(name), D, C)


def test_needs_a_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(ValueError, match="process group"):
        ShardedMarginSoftmax(named("arcface"), D, C)
