"""DDP on 2 CPU processes with gloo: ranks stay in sync and rank 0 reports, as under torchrun."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import named
from trainers.budget import budget_from
from trainers.data.synthetic import load_synthetic
from trainers.train import TrainData, train


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
            torch.testing.assert_close(value, r1[key][name], msg=lambda m: f"{key}.{name} differs between ranks: {m}")
    assert all(m for m in r0["metrics"]) and not any(m for m in r1["metrics"])  # rank 0 judges, rank 1 does not
    if loss == "curricularface":
        assert r0["head"]["curricular_t"] != 0  # head buffers moved, and were averaged over the ranks at epoch end
    if loss == "kappaface":  # ψ computed from the class statistics of both ranks' samples
        assert (r0["head"]["kappa_psi"] != 1).sum() > 0
