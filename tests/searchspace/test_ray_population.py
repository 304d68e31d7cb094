"""Population mode on Ray Tune: the in-process rounds, draws and lineage; failures recorded; a real state
round-trips."""
from __future__ import annotations

import math

import optuna  # noqa: E402
import pytest  # noqa: E402

from marginsearch.searchspace import TrialFailed, run_population  # noqa: E402
from marginsearch.searchspace.search import RayOptions, SearchError, StudyOptions  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: campaigns, kills, Ray or whole studies (make check leaves it out)

ray = pytest.importorskip("ray")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def lineage_objective(spec, state):
    """Toy candidate: the state is the tuple of m2 values that trained it; the reward grows with its length."""
    m2, m3 = spec.target.m2_rad, spec.target.m3_cos
    if m2 > 0.75:
        return math.nan, None
    if m3 > 0.36:
        raise TrialFailed(f"diverged at m3={m3:.3f}")
    lineage = (state or ()) + (m2,)
    return -abs(m2 - 0.5) - abs(m3 - 0.3) + 0.01 * len(lineage), lineage


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _reference_best(rows, rounds, population):
    """Independent reading of the table: per round, the COMPLETE row with the highest reward (first on ties)."""
    best = []
    for k in range(rounds):
        done = [r for r in rows[k * population:(k + 1) * population] if r.state == "COMPLETE"]
        best.append(max(done, key=lambda r: r.reward) if done else None)
    return best


def test_ray_rounds_match_the_in_process_rounds(tmp_path, ray_cluster):
    rounds, population = 3, 3
    kw = dict(rounds=rounds, population=population, baselines=["cosface"], seed=0)
    local = run_population("margin", lineage_objective, **kw)
    seen = []
    remote = run_population("margin", lineage_objective, backend="ray",
                            ray=RayOptions(storage_path=str(tmp_path / "ray")),
                            study=StudyOptions(name="pop-ray"), callbacks=[seen.append], **kw)
    assert remote.backend == "ray-population"
    assert [r.round for r in remote.rows] == [k for k in range(rounds) for _ in range(population)]
    assert [r.number for r in seen] == list(range(rounds * population))  # callbacks in the driver, in order
    assert remote.rows[0].baseline == "cosface"
    # same draws, rewards, states and failures as the in-process backend
    assert [(r.params, r.state, r.reason) for r in remote.rows] == [(r.params, r.state, r.reason) for r in local.rows]
    assert [r.reward for r in remote.rows] == pytest.approx([r.reward for r in local.rows], nan_ok=True)
    reasons = {r.reason.split(" at ")[0] for r in remote.rows if r.state == "FAIL"}
    assert reasons == {"diverged", "objective returned nan"}  # both kinds of failure occur and are FAIL with reason
    # each round starts from the previous round's best end state: the final state is the best-per-round lineage
    best = _reference_best(remote.rows, rounds, population)
    assert [b.number for b in remote.best_per_round] == [b.number for b in best]
    assert remote.final_state == tuple(b.params["m2"] for b in best)
    assert remote.final_state == local.final_state
    assert remote.rewards_per_round == local.rewards_per_round
    assert len(list((tmp_path / "ray").glob("pop-ray-round*"))) == rounds  # one Tune run per round


def test_ray_backend_rejects_bad_options(ray_cluster):
    with pytest.raises(SearchError, match="unknown backend 'dask'"):
        run_population("margin", lineage_objective, rounds=1, population=1, backend="dask")
    with pytest.raises(SearchError, match=r"gpu=1 but the Ray cluster has 0 GPU"):
        run_population("margin", lineage_objective, rounds=1, population=1, backend="ray",
                       ray=RayOptions(resources_per_trial={"cpu": 1, "gpu": 1}))


def test_a_trained_state_round_trips_through_ray_checkpoints(tmp_path, ray_cluster):
    torch = pytest.importorskip("torch")
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.objective import PopulationObjective

    rounds = 2
    budget = budget_from("proxy", epochs=rounds, batch_size=32, embedding_size=32, eval_pairs=200,
                         reward_metric="accuracy")
    objective = PopulationObjective("synthetic:tiny", budget, cache_dir=str(tmp_path / "data"))
    result = run_population("margin", objective, rounds=rounds, population=2, baselines=["arcface"],
                            backend="ray", ray=RayOptions(storage_path=str(tmp_path / "ray")),
                            study=StudyOptions(name="pop-tiny"))
    assert [r.round for r in result.rows] == [0, 0, 1, 1]
    assert all(r.state == "COMPLETE" for r in result.rows)
    history = result.final_state["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # round 1 resumed round 0's best model, not a fresh one
    assert [h["reward"] for h in history] == [b.reward for b in result.best_per_round]
    assert result.final_state["spec"] == result.best_per_round[-1].spec.to_dict()
    assert all(isinstance(v, torch.Tensor) for v in result.final_state["head"].values())


def broken_objective(spec, state):
    """A candidate whose code is wrong (not a TrialFailed): Ray records the error, the trial is FAIL."""
    raise ValueError("budget has no room for another epoch")


def test_an_erroring_trial_is_fail_with_its_error(tmp_path, ray_cluster):
    result = run_population("margin", broken_objective, rounds=1, population=2, backend="ray",
                            ray=RayOptions(storage_path=str(tmp_path / "ray")), study=StudyOptions(name="pop-broken"))
    assert [r.state for r in result.rows] == ["FAIL", "FAIL"]
    assert [r.reason for r in result.rows] == ["the trial raised ValueError: budget has no room for another epoch"] * 2
    assert result.best_per_round == [None] and result.final_state is None
