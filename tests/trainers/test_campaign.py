"""A tiny campaign end to end: MLflow parent and trial runs, promotion lineage, the registry gate, a second campaign."""
from __future__ import annotations

import os
import re

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from marginsearch.trainers.campaign import run_campaign
from marginsearch.trainers.config import load_config, override

pytestmark = pytest.mark.slow  # end to end: campaigns, kills, Ray or whole studies (make check leaves it out)

TAG = "marginsearch."

TINY = {
    "data.train": "synthetic:tiny", "search.trials": 3, "search.baselines": ["normface", "arcface"],
    "search.population": 2,
    "budget.proxy.epochs": 2, "budget.proxy.identities": 0, "budget.proxy.batch_size": 32,
    "budget.proxy.eval_pairs": 200, "budget.proxy.reward_metric": "auc",
    "budget.full.epochs": 2, "budget.full.batch_size": 32, "budget.full.eval_pairs": 200,
    "budget.full.reward_metric": "auc", "promote.top_k": 1, "promote.metric": "auc",
}


def tiny_config(workdir, **extra):
    return override(load_config(), {**TINY, "campaign.workdir": str(workdir), **extra})


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    """Two campaigns of the same config in one working directory (the second must not disturb the first)."""
    workdir = tmp_path_factory.mktemp("campaign")
    os.environ["MARGINSEARCH_CACHE"] = str(workdir / "cache")
    config = tiny_config(workdir)
    lines: list[str] = []
    first = run_campaign(config, log=lines.append)
    client = MlflowClient(first.tracking_uri)
    snapshot = {r.info.run_id: (r.info.status, dict(r.data.tags)) for r in _runs(client, first)}
    second = run_campaign(config, log=lines.append)
    return config, first, second, snapshot, lines


def _runs(client, result):
    exp = client.get_experiment_by_name(result.experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{TAG}campaign_key` = '{result.key}'", max_results=1000)


def _children(client, result):
    exp = client.get_experiment_by_name(result.experiment)
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                              max_results=1000)


def test_parent_and_trial_runs_hold_specs_reward_histories_and_curves(campaigns):
    config, first, _, _, _ = campaigns
    client = MlflowClient(first.tracking_uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[f"{TAG}phase"] == "done"
    assert parent.data.params["search.space"] == "margin"
    parent_files = {a.path for a in client.list_artifacts(first.parent_run_id)}
    assert {"campaign.toml", "space.toml", "results.md", "search_results.md"} <= parent_files
    assert "figures" in parent_files
    trials = [r for r in _children(client, first) if r.data.tags.get(f"{TAG}kind") == "trial"]
    assert len(trials) == 5  # 3 sampled + 2 named baselines, each exactly once
    assert len({r.data.tags[f"{TAG}trial_key"] for r in trials}) == 5
    named = sorted(r.data.tags[f"{TAG}named_loss"] for r in trials if r.data.tags[f"{TAG}named_loss"] != "none")
    assert named == ["arcface", "normface"]
    for run in trials:
        assert run.info.status in ("FINISHED", "KILLED", "FAILED")
        assert "spec.s" in run.data.params and "budget.epochs" in run.data.params
        assert run.data.tags[f"{TAG}state"] in ("complete", "pruned", "failed")
        assert "target_logit.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        history = client.get_metric_history(run.info.run_id, "reward")
        if run.data.tags[f"{TAG}state"] == "complete":
            assert [m.step for m in history][:2] == [1, 2]  # one reward per epoch (and the final one)
            assert history[-1].value == pytest.approx(run.data.metrics["reward"])
    assert len(first.search.rows) == 5


def test_promoted_runs_link_to_their_trials_and_the_champion_loads_and_embeds(campaigns):
    config, first, _, _, _ = campaigns
    client = MlflowClient(first.tracking_uri)
    promoted = [r for r in _children(client, first) if r.data.tags.get(f"{TAG}kind") == "promoted"]
    assert 1 <= len(promoted) == len(first.promoted) <= 2  # top-1 plus the best baseline if it differs
    trial_ids = {r.info.run_id for r in _children(client, first) if r.data.tags.get(f"{TAG}kind") == "trial"}
    for run in promoted:
        assert run.data.tags[f"{TAG}trial_run_id"] in trial_ids
        assert "test/auc" in run.data.metrics and "test/accuracy" in run.data.metrics and "val/auc" in run.data.metrics
    versions = client.search_model_versions(f"name = '{config.model_name}'")
    assert {v.run_id for v in versions} >= {r.info.run_id for r in promoted}
    champion = client.get_model_version_by_alias(config.model_name, "champion")
    mlflow.set_tracking_uri(first.tracking_uri)
    mlflow.set_registry_uri(first.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{config.model_name}@champion")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    emb = model(images)
    assert emb.shape[0] == 3 and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
    champ_value = float(champion.tags[f"{TAG}metric.val/auc"])  # the gate reads validation, never test
    assert champ_value == pytest.approx(max(p.metrics["val/auc"] for p in first.promoted))
    assert f"{TAG}metric.test/auc" not in champion.tags


def test_a_second_campaign_is_added_without_touching_the_first_and_the_alias_moves_only_through_the_gate(campaigns):
    config, first, second, snapshot, lines = campaigns
    assert (first.key, second.key) == ("demo-1", "demo-2")
    client = MlflowClient(first.tracking_uri)
    after = {r.info.run_id: (r.info.status, dict(r.data.tags)) for r in _runs(client, first)}
    assert after == snapshot
    champion = client.get_model_version_by_alias(config.model_name, "champion")
    best_first = max(p.metrics["val/auc"] for p in first.promoted)
    best_second = max(p.metrics["val/auc"] for p in second.promoted)
    # CPU training is deterministic: the second campaign reproduces the first, so no version beats the champion
    assert best_second == pytest.approx(best_first)
    assert all(not p.became_champion for p in second.promoted)
    assert champion.run_id in {p.run_id for p in first.promoted}
    assert any("does not beat champion" in line for line in lines)
    versions = client.search_model_versions(f"name = '{config.model_name}'")
    assert len(versions) == len(first.promoted) + len(second.promoted)
    for v in versions:
        assert v.tags[f"{TAG}gate.became_champion"] in ("true", "false")


def test_search_then_promote_as_two_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tmp_path, **{"search.trials": 1, "search.baselines": ["cosface"], "promote.baseline": False})
    searched = run_campaign(config, phases=("search",), log=lambda _: None)
    client = MlflowClient(searched.tracking_uri)
    assert client.get_run(searched.parent_run_id).data.tags[f"{TAG}phase"] == "promote"
    promoted = run_campaign(config, phases=("promote",), log=lambda _: None)
    assert promoted.key == searched.key and promoted.parent_run_id == searched.parent_run_id
    assert len(promoted.search.rows) == 2 and len(promoted.promoted) == 1
    assert client.get_run(searched.parent_run_id).info.status == "FINISHED"
    assert np.isfinite(promoted.promoted[0].metrics["test/auc"])


def test_the_ray_backend_records_every_trial_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tmp_path, **{"search.backend": "ray", "search.trials": 2, "promote.top_k": 0,
                                      "promote.baseline": False})
    try:
        result = run_campaign(config, log=lambda _: None)
    finally:
        import ray

        ray.shutdown()
    client = MlflowClient(result.tracking_uri)
    trials = [r for r in _children(client, result) if r.data.tags.get(f"{TAG}kind") == "trial"]
    assert len(trials) == len(result.search.rows) == 4
    assert len({r.data.tags[f"{TAG}trial_key"] for r in trials}) == 4
    assert all(r.info.status != "RUNNING" for r in trials)
    assert all(r.data.tags[f"{TAG}state"] in ("complete", "pruned") for r in trials)


def test_the_record_links_optuna_and_mlflow_both_ways_and_reads_on_its_own(campaigns):
    import optuna

    _, first, _, _, _ = campaigns
    client = MlflowClient(first.tracking_uri)
    trial_runs = [r for r in _children(client, first) if r.data.tags.get(f"{TAG}kind") == "trial"]
    study = first.search.study
    by_number = {t.number: t for t in study.get_trials()}
    assert trial_runs and study.user_attrs["mlflow_parent_run_id"] == first.parent_run_id
    for run in trial_runs:
        number = int(run.data.tags["optuna.trial_number"])
        assert run.data.tags["optuna.study"] == first.key
        assert run.info.run_name.startswith(f"trial {number} · ")  # not a hash
        assert by_number[number].user_attrs["mlflow_run_id"] == run.info.run_id  # and back
    assert all(t.user_attrs.get("mlflow_run_id") for t in by_number.values()
               if t.state != optuna.trial.TrialState.WAITING)
    params = client.get_run(first.parent_run_id).data.params
    assert os.path.isabs(params["campaign.workdir"]) and params["search.storage"].startswith("sqlite:////")
    assert params["tracking.uri"] == first.tracking_uri
    version = client.get_model_version(first.model_name, first.champion_version)
    assert "auc" in version.description and "spec " in version.description
    assert re.search(r"input float32 RGB \[B, 3, \d+, \d+\], fit resize", version.description)
    assert 'Preprocess.from_dict(mlflow.models.get_model_info(uri).metadata["preprocess"])' in version.description
    for run in trial_runs:  # the reward is logged once per epoch, not again at the end
        history = client.get_metric_history(run.info.run_id, "reward")
        assert len({m.step for m in history}) == len(history)
