"""Faults: diverging candidates, SIGKILL at any phase then resume, two workers on one study, determinism.

The kill test runs `marginsearch campaign` in a subprocess with MARGINSEARCH_FAULT=<phase>:<n>
(a SIGKILL at the n-th time the campaign reaches that point), then re-runs the same command
until it finishes, and checks the stores with `consistency_problems` (also used by
studies/fault_injection.py, which kills at ≥ 10 random points).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from marginsearch.losses import MarginSpec
from marginsearch.searchspace.results import FAIL_REASON
from marginsearch.searchspace.sampler import RewardGuidedSampler
from marginsearch.searchspace.search import retried_numbers
from marginsearch.trainers.campaign import run_campaign, spec_key
from marginsearch.trainers.config import load_config, override

pytestmark = pytest.mark.slow  # end to end: campaigns, kills, Ray or whole studies (make check leaves it out)

TAG = "marginsearch."
ROOT = Path(__file__).resolve().parents[2]
TRIALS, BASELINES = 3, ["arcface"]
CAMPAIGN = {
    "data.train": "synthetic:tiny", "search.trials": TRIALS, "search.baselines": BASELINES, "search.population": 2,
    "budget.proxy.epochs": 2, "budget.proxy.identities": 0, "budget.proxy.batch_size": 32,
    "budget.proxy.eval_pairs": 200, "budget.proxy.reward_metric": "auc",
    "budget.full.epochs": 2, "budget.full.batch_size": 32, "budget.full.eval_pairs": 200,
    "budget.full.reward_metric": "auc", "promote.top_k": 1, "promote.metric": "auc",
}
STATUS_OF_STATE = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def campaign_argv(workdir: Path) -> list[str]:
    """`marginsearch campaign` on the tiny campaign in `workdir` (2 promotions: the best searched and the best
    baseline)."""
    sets = {**CAMPAIGN, "campaign.workdir": str(workdir)}
    return ["campaign", *[arg for k, v in sets.items()
                          for arg in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]]


def run_cli(argv: list[str], workdir: Path, fault: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (a SIGKILL at `fault` = '<phase>:<n>' if given)."""
    env = {**os.environ, "MARGINSEARCH_CACHE": str(workdir.parent / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(ROOT), "MARGINSEARCH_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "marginsearch.trainers.cli", *argv], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def consistency_problems(workdir: Path, n_trials: int = TRIALS + len(BASELINES)) -> list[str]:
    """What is wrong with a finished campaign in `workdir` (empty: nothing lost, nothing duplicated, nothing left
    RUNNING)."""
    from marginsearch.trainers.registry import champion, verify_loads

    problems: list[str] = []
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # not the process-wide registry URI another test may have set
    exp = client.get_experiment_by_name("marginsearch-demo")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get(f"{TAG}kind") == "search"]
    if len(parents) != 1:
        problems.append(f"{len(parents)} campaign runs (one expected: a resume must not start a new campaign)")
    parent = parents[0]
    if parent.info.status != "FINISHED" or parent.data.tags.get(f"{TAG}phase") != "done":
        problems.append(f"parent run is {parent.info.status}, phase {parent.data.tags.get(f'{TAG}phase')}")
    problems += [f"run {r.info.run_name} left RUNNING" for r in runs if r.info.status == "RUNNING"]
    trial_runs = [r for r in runs if r.data.tags.get(f"{TAG}kind") == "trial"]
    per_key = Counter(r.data.tags[f"{TAG}trial_key"] for r in trial_runs)
    problems += [f"trial key {k} has {n} runs" for k, n in per_key.items() if n != 1]
    by_key = {r.data.tags[f"{TAG}trial_key"]: r for r in trial_runs}

    study = optuna.load_study(study_name=parent.data.tags[f"{TAG}campaign_key"],
                              storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    retried = retried_numbers(trials)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried)]
    if len(counted) != n_trials:
        problems.append(f"{len(counted)} finished trials, {n_trials} configured")
    problems += [f"trial {t.number} is {t.state.name}" for t in trials
                 if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in trials:
        if t.number in retried and not t.user_attrs.get(FAIL_REASON, "").startswith("abandoned"):
            problems.append(f"retried trial {t.number} has no 'abandoned' reason")
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    for t in counted:
        key = f"{study.study_name}/{spec_key(MarginSpec.from_dict(t.user_attrs['spec']))}"
        run = by_key.get(key)
        if run is None:
            problems.append(f"trial {t.number} ({t.state.name}) has no MLflow run")
        elif run.data.tags.get(f"{TAG}state") != states[t.state.name]:
            problems.append(f"trial {t.number} is {t.state.name} but its run says {run.data.tags.get(f'{TAG}state')}")
    if len(by_key) != len({spec_key(MarginSpec.from_dict(t.user_attrs["spec"])) for t in counted}):
        problems.append(f"{len(by_key)} trial runs for {len(counted)} counted trials")
    promoted = Counter(r.data.tags.get(f"{TAG}promoted_key") for r in runs
                       if r.data.tags.get(f"{TAG}kind") == "promoted" and r.info.status == "FINISHED")
    problems += [f"promoted key {k} has {n} finished runs" for k, n in promoted.items() if n != 1]
    current = champion(client, "marginsearch-demo")
    if current is None:
        problems.append("no champion alias")
    elif (why := verify_loads(client, "marginsearch-demo", str(current.version))) is not None:
        problems.append(f"champion v{current.version} does not load: {why}")
    return problems


# ---------------------------------------------------------------------------- 2. kill and resume
KILL_SEQUENCES = {  # 13 kills over the 8 fault points; each sequence is one campaign killed again and again
    "trial-finish-modellog-gate": ("trial:3", "finish:1", "promoted-log:1", "gate:2"),
    "trial-training-modellog-gate": ("trial:2", "promote:2", "promoted-log:1", "gate:1"),
    "log-training-modellog-register-end": ("log:2", "promote:2", "promoted-log:2", "register:2", "end:1"),
}


@pytest.mark.parametrize("kills", list(KILL_SEQUENCES.values()), ids=list(KILL_SEQUENCES))
def test_a_campaign_killed_in_each_phase_resumes_to_a_complete_consistent_state(tmp_path, kills):
    workdir = tmp_path / "w"
    workdir.mkdir()
    argv = campaign_argv(workdir)
    for fault in kills:
        done = run_cli(argv, workdir, fault)
        assert done.returncode == -signal.SIGKILL, f"{fault} did not kill: {done.returncode} {done.stderr[-2000:]}"
    done = run_cli(argv, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming campaign demo-1" in done.stdout
    assert consistency_problems(workdir) == []
    # the kill during a trial left an Optuna trial that was failed as abandoned and retried with the same params
    study = optuna.load_study(study_name="demo-1", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    retries = [t for t in trials if "retry_history" in t.system_attrs]
    assert all(t.params == trials[t.system_attrs["failed_trial"]].params for t in retries)
    if kills[0].startswith("trial:"):  # a kill during a trial left one failed as abandoned and retried
        assert retries


# ---------------------------------------------------------------------------- 1. diverging candidates
def test_a_diverging_candidate_fails_with_its_reason_in_optuna_and_mlflow_and_the_search_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    # No MarginSpec in its validated ranges (s ≤ 1024, guarded targets) makes the loss non-finite on tiny;
    # a learning rate of 1e20 without clipping does, at the second step, for every candidate.
    config = override(load_config(), {**CAMPAIGN, "campaign.workdir": str(tmp_path), "search.trials": 2,
                                      "budget.proxy.lr": 1e20, "budget.proxy.grad_clip": None})
    result = run_campaign(config, phases=("search",), log=lambda line: None)
    assert [r.state for r in result.search.rows] == ["FAIL"] * 3  # the search went on after each failure
    client = MlflowClient(result.tracking_uri)
    for trial in result.search.study.get_trials():
        assert trial.user_attrs[FAIL_REASON].startswith("diverged: loss became nan")
        key = spec_key(MarginSpec.from_dict(trial.user_attrs["spec"]))
        run = client.get_run(client.search_runs(
            [client.get_experiment_by_name(result.experiment).experiment_id],
            f"tags.`{TAG}trial_key` = 'demo-1/{key}'")[0].info.run_id)
        assert run.info.status == "FAILED" and run.data.tags[f"{TAG}state"] == "failed"
        assert run.data.tags[f"{TAG}reason"] == trial.user_attrs[FAIL_REASON]


def _round(values: list[tuple[float, float | None]]) -> optuna.Study:
    """Round 0 (population 4) of a 1-parameter study: (draw, reward) per trial, reward None → a FAIL trial."""
    study = optuna.create_study(direction="maximize", sampler=RewardGuidedSampler(population=4, seed=0))
    dist = FloatDistribution(0.0, 1.0)
    for z, value in values:
        state = TrialState.FAIL if value is None else TrialState.COMPLETE
        study.add_trial(optuna.create_trial(state=state, value=value, params={"x": z}, distributions={"x": dist},
                                            system_attrs={"reward_guided:draw:x": z, "reward_guided:round": 0}))
    return study


def test_the_sampler_scores_a_failed_trial_as_the_worst_reward_of_its_round():
    mu = {name: RewardGuidedSampler(population=4, seed=0).policy(_round(values))["mu_unit"]["x"] for name, values in {
        "fail": [(0.2, 0.6), (0.4, 0.5), (0.6, 0.7), (0.8, None)],
        "worst": [(0.2, 0.6), (0.4, 0.5), (0.6, 0.7), (0.8, 0.5)],
        "skipped": [(0.2, 0.6), (0.4, 0.5), (0.6, 0.7)]}.items()}
    assert mu["fail"] == pytest.approx(mu["worst"], abs=1e-12)
    # by hand: r = 2(R − mean)/(max − min); grad of μ = −mean r·(z − μ)/σ²; Adam's first step is lr·sign(grad), lr 0.05
    R, z = [0.6, 0.5, 0.7, 0.5], [0.2, 0.4, 0.6, 0.8]
    r = [2 * (v - sum(R) / 4) / (max(R) - min(R) + 1e-6) for v in R]
    grad = -sum(ri * (zi - 0.5) for ri, zi in zip(r, z)) / 4 / 0.2 ** 2
    assert grad > 0 and mu["fail"] == pytest.approx(0.5 - 0.05, abs=1e-6)  # the failure at z=0.8 pushes μ away
    assert mu["skipped"] == pytest.approx(0.5 + 0.05, abs=1e-6)  # without it μ would have moved towards it


# ---------------------------------------------------------------------------- 3. concurrent workers
def _worker(storage: str, tracking_uri: str, parent: str, cache: str, n_trials: int, seed: int) -> None:
    os.environ["MARGINSEARCH_CACHE"] = cache
    from marginsearch.searchspace.search import StudyOptions, run_search
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.campaign import TrackedObjective
    from marginsearch.trainers.tracking import CampaignTracker

    budget = budget_from("proxy", epochs=1, identities=0, batch_size=32, eval_pairs=200, reward_metric="auc")
    objective = TrackedObjective("synthetic:tiny", budget, CampaignTracker(tracking_uri, "workers"), parent, "shared")
    run_search("margin", objective, sampler="random", n_trials=n_trials, seed=seed,
               study=StudyOptions(storage, "shared", resume=True))


def test_two_worker_processes_on_one_study_and_one_mlflow_store_record_every_trial_once(tmp_path, monkeypatch):
    from marginsearch.searchspace.search import make_storage
    from marginsearch.trainers.tracking import CampaignTracker

    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # stores before fan-out
    optuna.create_study(storage=make_storage(storage), study_name="shared", direction="maximize")
    tracker = CampaignTracker(uri, "workers")
    parent = tracker.start_search("shared", {}, {}, {}, resume_key="shared")
    n_trials = 4
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(storage, uri, parent, str(tmp_path / "cache"), n_trials, seed))
               for seed in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(240)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    assert n_trials <= len(finished) <= n_trials + 1  # a worker stops once the study has n_trials; one may be in flight
    assert all(t.state != TrialState.RUNNING for t in trials)
    runs = tracker.runs({"tags.`mlflow.parentRunId`": parent})
    keys = Counter(r.data.tags[f"{TAG}trial_key"] for r in runs)
    expected = Counter(f"shared/{spec_key(MarginSpec.from_dict(t.user_attrs['spec']))}" for t in finished)
    assert keys == expected  # every trial exactly once
    assert all(r.info.status in STATUS_OF_STATE.values() for r in runs)


# ---------------------------------------------------------------------------- 5. determinism
def test_the_same_config_and_seed_give_the_same_trials_and_rewards_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    outcomes = []
    for name in ("a", "b"):
        config = override(load_config(), {**CAMPAIGN, "campaign.workdir": str(tmp_path / name), "search.trials": 3,
                                          "budget.proxy.epochs": 1})
        study = run_campaign(config, phases=("search",), log=lambda line: None).search.study
        outcomes.append([(t.number, t.state, t.params, t.values, t.user_attrs.get("spec")) for t in study.get_trials()])
    assert len(outcomes[0]) == 4 and outcomes[0] == outcomes[1]
    assert len({json.dumps(o[2], sort_keys=True) for o in outcomes[0]}) == 4  # four different candidates
