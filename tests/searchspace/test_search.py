"""run_search (Optuna backend) on a synthetic objective: result table, baselines, failures, pruning, resume,
callbacks, tables."""
from __future__ import annotations

import math

import optuna
import pytest

from marginsearch.losses import named
from marginsearch.searchspace import TrialFailed, run_population, run_search
from marginsearch.searchspace.search import PRUNERS, SAMPLERS, SearchError, StudyOptions

optuna.logging.set_verbosity(optuna.logging.ERROR)


def toy(spec, report):
    """Reward peaks at m2 = 0.3 rad; big cosine margins 'diverge'."""
    score = -abs(spec.target.m2_rad - 0.3) - spec.target.m3_cos
    for epoch in (1, 2):
        report(epoch, score * epoch / 2)
    if spec.target.m3_cos > 0.45:
        raise TrialFailed("loss became nan at epoch 2")
    return score


def test_table_has_every_trial_once_with_baselines_named(tmp_path):
    seen = []
    result = run_search("margin", toy, n_trials=10, study=StudyOptions(str(tmp_path / "s.db"), "a"),
                        baselines=["arcface", "cosface", named("arcface")], callbacks=[seen.append])
    assert [r.number for r in result.rows] == list(range(10))
    assert [(r.named, r.baseline) for r in result.rows[:2]] == [("arcface", "arcface"), ("cosface", "cosface")]
    assert [r.number for r in seen] == list(range(10))  # callback once per finished trial, in the driver
    arc = result.rows[0]
    assert arc.reward == pytest.approx(-0.2) and arc.intermediate == {1: pytest.approx(-0.1), 2: pytest.approx(-0.2)}
    assert arc.spec == named("arcface") and arc.state == "COMPLETE"
    assert result.best.reward == max(r.reward for r in result.rows if r.state == "COMPLETE")
    table = result.to_markdown()
    assert table.splitlines()[0].startswith("| trial |") and "| arcface |" in table and len(table.splitlines()) == 14


def test_failures_and_nan_are_fail_with_reason():
    def objective(spec, report):
        if spec.target.m3_cos > 0.3:
            raise TrialFailed("diverged: loss became nan at epoch 1, step 3")
        return math.nan if spec.target.m2_rad > 0.5 else 1.0

    result = run_search("margin", objective, sampler="random", n_trials=16, seed=2)
    fails = [r for r in result.rows if r.state == "FAIL"]
    assert fails and all(r.reward is None for r in fails)
    assert {r.reason for r in fails} == {"diverged: loss became nan at epoch 1, step 3", "objective returned nan"}
    assert all(t.user_attrs["fail_reason"] for t in result.study.trials if t.state.name == "FAIL")


def test_median_pruner_prunes_through_report():
    def objective(spec, report):
        for epoch in range(1, 4):
            report(epoch, spec.target.m2_rad * epoch)
        return spec.target.m2_rad * 3

    result = run_search("margin", objective, sampler="random", pruner="median", n_trials=14, seed=0)
    pruned = [r for r in result.rows if r.state == "PRUNED"]
    assert pruned and all(r.reason.startswith("pruned after epoch") and r.intermediate for r in pruned)


def test_resume_tops_up_and_never_duplicates_baselines(tmp_path):
    storage = str(tmp_path / "s.db")
    run_search("margin", toy, n_trials=5, study=StudyOptions(storage, "r"), baselines="named")
    result = run_search("margin", toy, n_trials=8, study=StudyOptions(storage, "r"), baselines="named")
    assert [r.number for r in result.rows] == list(range(8))
    assert [r.baseline for r in result.rows].count("arcface") == 1
    # combined (no guard, as insightface) is not in it
    assert sorted(r.baseline for r in result.rows if r.baseline) == ["arcface", "cosface", "normface"]
    with pytest.raises(SearchError, match="already exists"):
        run_search("margin", toy, n_trials=8, study=StudyOptions(storage, "r", resume=False))


def test_journal_storage_and_grid_named(tmp_path):
    result = run_search("mv", toy, sampler="grid-named", n_trials=50,
                        study=StudyOptions(f"journal:{tmp_path}/j.log", "g"))
    assert [r.named for r in result.rows] == ["mv-am", "mv-arc"]  # sv-am, sv-arc are the same points
    assert (tmp_path / "j.log").exists()


def test_unified_space_with_tpe_and_an_optuna_sampler_instance():
    flavour = "kappaface:class_margin.r_max=0.999"  # the kappa space's flavour: r̄ clamped (official: no clamp)
    result = run_search("unified", toy, sampler="tpe", n_trials=6, baselines=[flavour], seed=1)
    assert result.rows[0].baseline == flavour and len(result.rows) == 6
    result = run_search("margin", toy, sampler=optuna.samplers.RandomSampler(seed=0), n_trials=3)
    assert len(result.rows) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "dask"}, "unknown backend 'dask'"),
    ({"sampler": "bayes"}, "unknown sampler 'bayes'"),
    ({"pruner": "sometimes"}, "unknown pruner 'sometimes'"),
    ({"baselines": ["sphereface"]}, "cannot express 'sphereface'"),
    ({"n_trials": 0}, "n_trials must be"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_search("margin", toy, **{"n_trials": 2, **kwargs})


def test_tables_list_the_documented_choices():
    assert set(SAMPLERS) == {"reward-guided", "tpe", "cmaes", "random", "grid-named"}
    assert set(PRUNERS) == {"none", "median", "hyperband"}


def test_population_mode_carries_the_best_state_forward():
    def objective(spec, state):
        lineage = (state or ()) + (spec.target.m2_rad,)
        return -abs(spec.target.m2_rad - 0.3), lineage  # the state records which specs trained it

    result = run_population("margin", objective, rounds=4, population=4, baselines=["arcface"])
    assert [r.round for r in result.rows] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert result.rows[0].named == "arcface"
    assert len(result.final_state) == 4
    assert list(result.final_state) == [row.spec.target.m2_rad for row in result.best_per_round]
    for rewards, best in zip(result.rewards_per_round, result.best_per_round):
        assert best.reward == max(rewards)
    assert len(result.trajectory) == 5 and result.trajectory[-1]["rounds"] == 4
