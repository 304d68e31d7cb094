"""DDP on 2 CPU processes with gloo: ranks stay in sync and rank 0 reports, as under torchrun."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marginsearch.losses import named
from marginsearch.trainers.budget import budget_from
from marginsearch.trainers.data.synthetic import load_synthetic
from marginsearch.trainers.train import TrainData, train


def _worker(rank: int, world: int, init_file: str, cache: str, out: str, loss: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = TrainData.from_benchmark(load_synthetic("tiny", cache_dir=cache), "tiny")
        budget = budget_from("proxy", epochs=2, batch_size=32, embedding_size=32, eval_pairs=200)
        result = train(named(loss), data, budget, device="cpu")
        torch.save({"status": result.status, "model": result.model.state_dict(), "head": result.head.state_dict(),
                    "rewards": [r.reward for r in result.history], "metrics": [r.metrics for r in result.history]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("loss", ["curricularface", "kappaface"])
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path, loss):
    cache = tmp_path / "cache"
    load_synthetic("tiny", cache_dir=cache)  # generate once before the fan-out
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(cache), str(tmp_path), loss), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["status"] == r1["status"] == "complete"
    for key in ("model", "head"):
        for name, value in r0[key].items():
            torch.testing.assert_close(value, r1[key][name],
                                       msg=lambda m, key=key, name=name: f"{key}.{name} differs between ranks: {m}")
    assert all(m for m in r0["metrics"]) and not any(m for m in r1["metrics"])  # rank 0 judges, rank 1 does not
    if loss == "curricularface":
        assert r0["head"]["curricular_t"] != 0  # head buffers moved, and were averaged over the ranks at epoch end
    if loss == "kappaface":  # ψ computed from the class statistics of both ranks' samples
        assert (r0["head"]["kappa_psi"] != 1).sum() > 0


def _sharded_objective_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One step of the trainer's head-parallel objective against a single-process head on the whole batch."""
    import copy

    from marginsearch.losses import MarginSoftmax, ShardedMarginSoftmax
    from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
    from marginsearch.trainers.train import _Objective, parallel_embedding

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        classes, dim = 7, 16
        model = EmbeddingModel(build_backbone("tiny", dim, (32, 32))).eval()  # BatchNorm on running statistics
        centres = torch.randn(classes, dim)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, classes, (8,))
        reference, full = copy.deepcopy(model), MarginSoftmax(named("arcface"), dim, classes)
        full.weight.data.copy_(centres)
        full(reference.backbone(x), y).backward()
        head = ShardedMarginSoftmax(named("arcface"), dim, classes)
        lo, hi = head.bounds
        head.weight.data.copy_(centres[lo:hi])
        objective = _Objective(model, head, parallel_embedding(model.backbone, torch.device("cpu")),
                               embedding_grad_scale=world)
        part = slice(rank * 4, rank * 4 + 4)
        loss = objective(x[part], y[part])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 sums over other splits of the batch
            return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

        errors = [n for n, p in reference.named_parameters() if not close(grads[n], p.grad)]
        if not close(head.weight.grad, full.weight.grad[lo:hi]):
            errors.append("head shard")
        torch.save(errors, os.path.join(out, f"errors{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_head_parallel_step_equals_one_process_on_the_whole_batch(tmp_path):
    """DDP on the backbone + sharded centres: the backbone's and each shard's gradients are those of one process."""
    mp.spawn(_sharded_objective_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"errors{rank}.pt") == []


def _head_parallel_worker(rank: int, world: int, init_file: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = TrainData.from_benchmark(load_synthetic("tiny", cache_dir=cache), "tiny")
        budget = budget_from("proxy", epochs=2, batch_size=32, embedding_size=32, eval_pairs=200, head_parallel=True)
        result = train(named("curricularface"), data, budget, device="cpu", checkpoint=os.path.join(out, "ckpt.pt"))
        torch.save({"status": result.status, "model": result.model.state_dict(), "head": result.head.state_dict(),
                    "bounds": result.head.bounds, "auc": [r.metrics.get("auc", float("nan")) for r in result.history]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_head_parallel_training_splits_the_centres_and_keeps_backbones_in_sync(tmp_path):
    cache = tmp_path / "cache"
    data = load_synthetic("tiny", cache_dir=cache)
    mp.spawn(_head_parallel_worker, args=(2, str(tmp_path / "rendezvous"), str(cache), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["status"] == r1["status"] == "complete"
    for name, value in r0["model"].items():
        torch.testing.assert_close(value, r1["model"][name],
                                   msg=lambda m, name=name: f"backbone {name} differs between ranks: {m}")
    classes = data.train.num_classes
    assert r0["bounds"] == (0, classes // 2) and r1["bounds"] == (classes // 2, classes)
    assert r0["head"]["weight"].shape[0] + r1["head"]["weight"].shape[0] == classes
    assert r0["head"]["curricular_t"] == r1["head"]["curricular_t"] != 0
    # rank 0 judged every epoch, better than chance
    assert len(r0["auc"]) == 2 and all(0.5 < a <= 1.0 for a in r0["auc"])
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "ckpt.rank1.pt").exists()  # one checkpoint per rank
