"""Training objectives end to end: a margin search on synthetic:tiny in each backend, population mode, failures."""
from __future__ import annotations

import optuna  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from marginsearch.losses import named  # noqa: E402
from marginsearch.searchspace import TrialFailed, run_population, run_search  # noqa: E402
from marginsearch.searchspace.search import RayOptions, SearchError, StudyOptions  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.objective import PopulationObjective, TrainingObjective  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.ERROR)

MARGIN_NAMED = ["normface", "cosface", "arcface"]  # combined at its defaults has no guard: not in the space


def _budget(**kw):
    return budget_from("proxy", **{"epochs": 2, "batch_size": 32, "embedding_size": 32, "eval_pairs": 200,
                                   "reward_metric": "accuracy", **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _check_table(result, n_trials):
    result.print()
    assert sorted(r.number for r in result.rows) == list(range(n_trials))  # every trial recorded exactly once
    baselines = {r.baseline: r for r in result.rows if r.baseline}
    assert sorted(baselines) == sorted(MARGIN_NAMED)
    for name, row in baselines.items():
        assert row.named == name and row.spec == named(name)
        assert row.state == "COMPLETE" and 0.0 <= row.reward <= 1.0 and sorted(row.intermediate) == [1, 2]
        assert row.intermediate[2] == row.reward


def test_margin_search_on_tiny_with_optuna(tmp_path, cache):
    objective = TrainingObjective("synthetic:tiny", _budget(), cache_dir=cache)
    result = run_search("margin", objective, n_trials=5, baselines="named",
                        study=StudyOptions(str(tmp_path / "search.db"), "tiny"))
    _check_table(result, 5)
    # resume: nothing left to run, nothing enqueued twice
    again = run_search("margin", objective, n_trials=5, baselines="named",
                       study=StudyOptions(str(tmp_path / "search.db"), "tiny"))
    assert [r.number for r in again.rows] == [r.number for r in result.rows]


@pytest.mark.slow
def test_margin_search_on_tiny_with_ray(tmp_path, cache, ray_cluster):
    objective = TrainingObjective("synthetic:tiny", _budget(), cache_dir=cache)
    rows = []
    result = run_search("margin", objective, backend="ray", n_trials=5, baselines="named",
                        study=StudyOptions(str(tmp_path / "ray.db"), "tiny-ray"),
                        ray=RayOptions(storage_path=str(tmp_path / "ray")),
                        callbacks=[rows.append])
    _check_table(result, 5)
    assert sorted(r.number for r in rows) == list(range(5))


def test_ray_refuses_a_gpu_the_cluster_lacks(ray_cluster):
    from marginsearch.searchspace.ray_backend import ray_resources

    assert ray_resources({"cpu": 1, "gpu": 0}, None) == ({"cpu": 1.0, "gpu": 0.0}, 2)
    assert ray_resources({"cpu": 1}, 1)[1] == 1
    with pytest.raises(SearchError, match=r"gpu=1 but the Ray cluster has 0 GPU"):
        ray_resources({"cpu": 1, "gpu": 1}, None)


def test_non_finite_reward_fails_the_trial(cache):
    objective = TrainingObjective("synthetic:tiny", _budget(epochs=1, reward_metric="tar@far=1e-6"), cache_dir=cache)
    with pytest.raises(TrialFailed, match="tar@far=1e-6 is nan"):
        objective(named("arcface"), lambda epoch, reward: None)


def test_report_can_prune_the_training(cache):
    objective = TrainingObjective("synthetic:tiny", _budget(), cache_dir=cache)
    seen = []

    def report(epoch, reward):
        seen.append(epoch)
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        objective(named("cosface"), report)
    assert seen == [1]


def test_population_rounds_start_from_the_previous_best(cache):
    rounds = 3
    objective = PopulationObjective("synthetic:tiny", _budget(epochs=rounds), cache_dir=cache)
    result = run_population("margin", objective, rounds=rounds, population=2, baselines=["arcface"])
    result.print()
    assert [r.round for r in result.rows] == [0, 0, 1, 1, 2, 2]
    history = result.final_state["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the final model's lineage: epoch k was trained by round k's best candidate, with its reward
    assert [h["reward"] for h in history] == [b.reward for b in result.best_per_round]
    assert result.final_state["spec"] == result.best_per_round[-1].spec.to_dict()
    # a head of another kind keeps the class centres and starts its own statistics
    carried = objective._carried(result.final_state, named("kappaface"), objective_data(cache))
    assert torch.equal(carried["head"]["weight"], result.final_state["head"]["weight"])
    assert torch.equal(carried["head"]["kappa_psi"], torch.ones_like(carried["head"]["kappa_psi"]))


def objective_data(cache):
    from marginsearch.trainers.objective import data_for

    return data_for("synthetic:tiny", cache)
