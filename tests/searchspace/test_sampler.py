"""RewardGuidedSampler: converges on synthetic objectives, moves from its start, right gradient sign, resumes from
storage."""
from __future__ import annotations

import numpy as np
import optuna
import pytest

from marginsearch.searchspace import RewardGuidedSampler, load
from marginsearch.searchspace.sampler import DRAW_ATTR, ROUND_ATTR, to_unit

optuna.logging.set_verbosity(optuna.logging.WARNING)

MARGIN = load("margin")
DISTS = MARGIN.distributions()
OPTIMUM = {"s": 0.8, "m1": 0.3, "m2": 0.7, "m3": 0.2}  # normalised coordinates


def _quadratic(trial: optuna.Trial) -> float:
    params = MARGIN.suggest(trial)
    return -sum((to_unit(params[n], DISTS[n]) - OPTIMUM[n]) ** 2 for n in params)


def _study(sampler, storage=None, name=None, direction="maximize"):
    return optuna.create_study(direction=direction, sampler=sampler, storage=storage, study_name=name,
                               load_if_exists=True)


def test_mean_converges_to_the_optimum_of_a_quadratic():
    sampler = RewardGuidedSampler(space=MARGIN, seed=0, sigma_decay=0.95, sigma_min=0.05)
    study = _study(sampler)
    study.optimize(_quadratic, n_trials=8 * 30)
    trajectory = sampler.trajectory(study)
    assert len(trajectory) == 31 and trajectory[-1]["rounds"] == 30
    start = np.array([trajectory[0]["mu_unit"][n] for n in OPTIMUM])
    assert start == pytest.approx([to_unit(MARGIN.parameters[n].default, DISTS[n]) for n in OPTIMUM])
    late = np.array([[t["mu_unit"][n] for n in OPTIMUM] for t in trajectory[-10:]]).mean(axis=0)
    target = np.array(list(OPTIMUM.values()))
    assert np.abs(start - target).max() > 0.4
    assert np.abs(late - target).max() < 0.06
    assert trajectory[-1]["sigma"] == pytest.approx(max(0.05, 0.2 * 0.95**30))
    mu_native = sampler.policy(study)["mu"]
    low, high = MARGIN.parameters["s"].low, MARGIN.parameters["s"].high  # s is log-float: μ maps through log space
    assert mu_native["s"] == pytest.approx(np.exp(np.log(low) + trajectory[-1]["mu_unit"]["s"] * np.log(high / low)))


def test_categorical_policy_concentrates_on_the_best_choice():
    def objective(trial):
        c = trial.suggest_categorical("loss", ["a", "b", "c"])
        x = trial.suggest_float("x", 0.0, 1.0)
        return {"a": 0.0, "b": 1.0, "c": 0.3}[c] - 0.1 * x

    sampler = RewardGuidedSampler(seed=3)
    study = _study(sampler)
    study.optimize(objective, n_trials=8 * 25)
    policy = sampler.policy(study)
    assert policy["probs"]["loss"]["b"] > 0.8
    assert policy["mu"]["x"] < 0.5  # x costs reward: μ went down from the centre


@pytest.mark.parametrize("seed", range(5))
def test_first_round_moves_mu_towards_the_better_samples(seed):
    # The public agent's defect (μ stuck at relu(0), log-prob of −|x|) is absent: after one round μ moves
    # by Adam's first step, lr·sign(g), towards the rewarded draws; g computed here from the stored draws.
    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0)

    sampler = RewardGuidedSampler(seed=seed, population=4)
    study = _study(sampler)
    study.optimize(objective, n_trials=4)
    trials = study.trials
    z = np.array([t.system_attrs[DRAW_ATTR + "x"] for t in trials])
    rewards = np.array([t.value for t in trials])
    r = 2 * (rewards - rewards.mean()) / (rewards.max() - rewards.min() + 1e-6)
    pull = np.sum(r * (z - 0.5))  # direction of −∇ loss: towards high-reward draws
    mu = sampler.policy(study)["mu_unit"]["x"]
    assert mu == pytest.approx(0.5 + 0.05 * np.sign(pull), abs=1e-6)
    assert pull > 0  # reward = x, so the better draws lie above the start
    assert [t.system_attrs[ROUND_ATTR] for t in trials] == [0, 0, 0, 0]


def test_minimisation_and_failures_push_away():
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if x > 0.6:
            raise RuntimeError("diverged")
        return x  # minimised: lower is better, and failures above 0.6 are the worst

    sampler = RewardGuidedSampler(seed=1)
    study = _study(sampler, direction="minimize")
    study.optimize(objective, n_trials=8 * 10, catch=(RuntimeError,))
    assert any(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    assert sampler.policy(study)["mu"]["x"] < 0.25


def test_enqueued_trials_count_as_rewards_but_give_no_gradient():
    sampler = RewardGuidedSampler(seed=0, population=4)
    study = _study(sampler)
    study.enqueue_trial({"x": 0.9})
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=4)
    assert DRAW_ATTR + "x" not in study.trials[0].system_attrs
    assert all(DRAW_ATTR + "x" in t.system_attrs for t in study.trials[1:])
    # reference: the update from the three drawn trials, normalised together with the enqueued one
    z = np.array([t.system_attrs[DRAW_ATTR + "x"] for t in study.trials[1:]])
    rewards = np.array([t.value for t in study.trials])
    r = 2 * (rewards - rewards.mean()) / (rewards.max() - rewards.min() + 1e-6)
    pull = np.sum(r[1:] * (z - 0.5))
    assert sampler.policy(study)["mu_unit"]["x"] == pytest.approx(0.5 + 0.05 * np.sign(pull), abs=1e-6)


def test_pruned_trials_teach_only_when_asked():
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, step=1)
        if trial.number % 2:
            raise optuna.TrialPruned()
        return x

    policies = {}
    for use_pruned in (False, True):
        sampler = RewardGuidedSampler(seed=5, population=4, use_pruned=use_pruned)
        study = _study(sampler)
        study.optimize(objective, n_trials=4)
        policies[use_pruned] = sampler.policy(study)["mu_unit"]["x"]
        used = [t for t in study.trials if use_pruned or t.state == optuna.trial.TrialState.COMPLETE]
        z = np.array([t.system_attrs[DRAW_ATTR + "x"] for t in used])
        rewards = np.array([t.intermediate_values[1] for t in used])
        r = 2 * (rewards - rewards.mean()) / (rewards.max() - rewards.min() + 1e-6)
        assert policies[use_pruned] == pytest.approx(0.5 + 0.05 * np.sign(np.sum(r * (z - 0.5))), abs=1e-6)


def test_state_rebuilt_from_sqlite_equals_the_uninterrupted_run(tmp_path):
    def sampler():
        return RewardGuidedSampler(space=MARGIN, seed=7, population=4)

    straight_sampler = sampler()
    straight = _study(straight_sampler, f"sqlite:///{tmp_path}/a.db", "s")
    straight.optimize(_quadratic, n_trials=14)

    url = f"sqlite:///{tmp_path}/b.db"
    _study(sampler(), url, "s").optimize(_quadratic, n_trials=7)  # stops mid-round
    resumed_sampler = sampler()  # as in a fresh process: no cached state
    resumed = _study(resumed_sampler, url, "s")
    resumed.optimize(_quadratic, n_trials=7)

    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]
    assert resumed_sampler.policy(resumed) == straight_sampler.policy(straight)
    assert resumed_sampler.trajectory(resumed) == straight_sampler.trajectory(straight)
    assert straight_sampler.policy(straight)["rounds"] == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="population"):
        RewardGuidedSampler(population=0)
    with pytest.raises(ValueError, match="normalise"):
        RewardGuidedSampler(normalise="max")


def test_the_policy_is_replayed_once_per_trial_not_once_per_parameter():
    sampler = RewardGuidedSampler(space=MARGIN, seed=0, population=4)
    replays: list[int] = []
    real = sampler._finished

    def counted(study):
        replays.append(len(study.trials))
        return real(study)

    sampler._finished = counted
    study = _study(sampler)
    study.optimize(_quadratic, n_trials=12)
    assert len(MARGIN.parameters) > 1 and len(replays) == 12  # one study read per trial, whatever its parameters
    per_parameter = RewardGuidedSampler(space=MARGIN, seed=0, population=4)  # a replay at every parameter
    per_parameter._trial_policy = lambda study, trial, k: per_parameter._policy_before(study, k)
    again = _study(per_parameter)
    again.optimize(_quadratic, n_trials=12)
    assert [t.params for t in again.trials] == [t.params for t in study.trials]  # alone in its study: same draws
