"""MLflow tracking layer: parent/nested runs, reopening, end states, abandoned runs, URI checks (one SQLite store)."""
from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna as optuna_module
import pytest

from marginsearch.losses import AngularMargin, MarginSpec, named
from marginsearch.trainers.tracking import CampaignTracker, TrackingError, check_tracking_uri, resolve_tracking_uri

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> CampaignTracker:
    root = tmp_path_factory.mktemp("store")
    return CampaignTracker(resolve_tracking_uri(None, root), "campaign-test")


def _parent(tracker: CampaignTracker, name: str) -> str:
    return tracker.start_search(name, {"seed": 0}, {}, {})


def _read(tracker: CampaignTracker, run_id: str, name: str, tmp_path) -> bytes:
    return open(tracker.client.download_artifacts(run_id, name, str(tmp_path)), "rb").read()


def test_resolve_tracking_uri_makes_paths_absolute(tmp_path):
    wd = tmp_path / "work"
    assert resolve_tracking_uri(None, wd) == f"sqlite:///{wd}/mlflow.db"
    assert resolve_tracking_uri(None, wd).startswith("sqlite:////")
    assert resolve_tracking_uri("sqlite:///runs/m.db?timeout=30", wd) == f"sqlite:///{wd}/runs/m.db?timeout=30"
    assert resolve_tracking_uri("sqlite:////abs/m.db", wd) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("file:mlruns", wd) == f"file://{wd}/mlruns"
    assert resolve_tracking_uri("file:///abs/mlruns", wd) == "file:///abs/mlruns"
    assert resolve_tracking_uri("store/x.db", wd) == f"sqlite:///{wd}/store/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", wd) == "http://127.0.0.1:5000"


def test_unreachable_server_and_missing_folder_fail_fast(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        CampaignTracker(f"http://127.0.0.1:{port}", "x")
    assert time.monotonic() - start < 10  # a guard against hanging on retries, not a benchmark
    assert "\n" not in str(err.value)
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(TrackingError, match="relative"):
        check_tracking_uri("sqlite:///rel/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # folder exists: fine


def test_search_and_trial_runs_hold_params_metrics_tags_artifacts(tracker, tmp_path):
    long_value = "x" * 7000
    parent = tracker.start_search("search A", {"space": {"name": "arc", "budget": 3}, "note": long_value},
                                  {"owner": "test"},
                                  {"space.toml": "[target]\nm2 = 0.5\n", "raw/blob.bin": b"\x00\x01"})
    run = tracker.client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.data.params["space.name"] == "arc" and run.data.params["space.budget"] == "3"
    assert run.data.params["note"] == "x" * 6000  # MLflow's param value limit
    assert run.data.tags["owner"] == "test" and run.data.tags["marginsearch.kind"] == "search"
    assert _read(tracker, parent, "space.toml", tmp_path) == b"[target]\nm2 = 0.5\n"
    assert _read(tracker, parent, "raw/blob.bin", tmp_path) == b"\x00\x01"

    spec = named("arcface")
    trial = tracker.trial_run(parent, "t-0", spec, {"lr": 0.1}, {"sampler": "tpe"})
    for epoch, loss in enumerate([3.0, 2.0, 1.5]):
        trial.log_epoch(epoch, {"loss": loss, "acc": 0.1 * epoch, "grad_norm": float("nan") if epoch == 2 else 1.0})
    trial.finish("complete", reward=0.75)
    child = tracker.client.get_run(trial.run_id)
    assert child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["marginsearch.trial_key"] == "t-0"
    assert tags["marginsearch.named_loss"] == "arcface" and tags["marginsearch.state"] == "complete"
    assert tags["marginsearch.nonfinite.grad_norm"] == "nan at step 2" and tags["sampler"] == "tpe"
    assert child.data.params["spec.target.m2_rad"] == str(spec.target.m2_rad)
    assert child.data.params["spec.s"] == str(spec.s) and child.data.params["lr"] == "0.1"
    history = tracker.client.get_metric_history(trial.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert [m.value for m in tracker.client.get_metric_history(trial.run_id, "grad_norm")] == [1.0, 1.0]
    assert child.data.metrics["reward"] == 0.75
    assert MarginSpec.from_dict(json.loads(_read(tracker, trial.run_id, "spec.json", tmp_path))) == spec
    assert _read(tracker, trial.run_id, "target_logit.png", tmp_path).startswith(PNG_MAGIC)


@pytest.mark.parametrize("flush_every_s", [0.0, 3600.0])
def test_epochs_are_written_live_or_queued_to_finish_with_the_same_history(tracker, monkeypatch, flush_every_s):
    """Slow epochs (flush_every_s passed) are written as they end; cheap ones wait for `finish`: one write."""
    parent = _parent(tracker, f"search flush {flush_every_s}")
    trial = tracker.trial_run(parent, "q", named("cosface"), {}, {})
    trial.flush_every_s = flush_every_s
    batches = []
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (batches.append(k), real(*a, **k))[1])
    for epoch in range(3):
        trial.log_epoch(epoch, {"reward": 0.1 * epoch, "loss": float("inf") if epoch == 1 else 1.0})
        if flush_every_s:  # queued: nothing in the store before finish
            assert tracker.client.get_metric_history(trial.run_id, "reward") == []
    trial.finish("complete", reward=0.2)  # the last epoch's reward again, at the same step
    assert len(batches) == (4 if flush_every_s == 0 else 1)
    history = tracker.client.get_metric_history(trial.run_id, "reward")
    assert sorted({(m.step, round(m.value, 6)) for m in history}) == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert len(history) == (4 if flush_every_s == 0 else 3)  # queued, the final reward and epoch 2's are one write
    run = tracker.client.get_run(trial.run_id)
    assert run.data.tags["marginsearch.nonfinite.loss"] == "inf at step 1" and run.info.status == "FINISHED"


def test_unnamed_spec_is_tagged_none(tracker):
    parent = _parent(tracker, "search unnamed")
    spec = MarginSpec(s=30.0, target=AngularMargin(m2_rad=0.31, m3_cos=0.07))
    trial = tracker.trial_run(parent, "u", spec, {}, {})
    assert tracker.client.get_run(trial.run_id).data.tags["marginsearch.named_loss"] == "none"


def test_resume_key_reopens_the_search_run(tracker):
    first = tracker.start_search("search R", {"seed": 1}, {}, {}, resume_key="campaign-R")
    tracker.client.set_terminated(first, "KILLED")  # the coordinator died
    again = tracker.start_search("search R", {"seed": 1, "extra": 2}, {}, {}, resume_key="campaign-R")
    assert again == first
    run = tracker.client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["marginsearch.resumed"] == "1"
    assert run.data.params["extra"] == "2"
    assert tracker.find_run({"marginsearch.campaign_key": "campaign-R"}) == first
    assert tracker.find_run({"marginsearch.campaign_key": "nobody"}) is None
    assert tracker.start_search("search S", {}, {}, {}, resume_key="campaign-S") != first


def test_reopening_a_trial_key_does_not_duplicate(tracker):
    parent = _parent(tracker, "search reopen")
    spec = named("cosface")
    first = tracker.trial_run(parent, "t-1", spec, {"lr": 0.1}, {})
    first.log_epoch(0, {"loss": 2.0})
    first.finish("failed", "worker lost")
    second = tracker.trial_run(parent, "t-1", spec, {"lr": 0.1}, {})
    assert second.run_id == first.run_id and second.resumed and not first.resumed
    assert tracker.client.get_run(second.run_id).info.status == "RUNNING"
    assert tracker.client.get_run(second.run_id).data.tags["marginsearch.reopened"] == "1"
    other = tracker.trial_run(parent, "t-2", spec, {}, {})
    assert other.run_id != first.run_id
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["marginsearch.trial_key"] for r in children) == ["t-1", "t-2"]


def test_exception_in_context_ends_failed_with_reason(tracker):
    parent = _parent(tracker, "search fail")
    with pytest.raises(RuntimeError, match="diverged"):
        with tracker.trial_run(parent, "f", named("arcface"), {}, {}) as trial:
            trial.log_epoch(0, {"loss": 1.0})
            raise RuntimeError("loss diverged")
    run = tracker.client.get_run(trial.run_id)
    assert run.info.status == "FAILED" and run.data.tags["marginsearch.state"] == "failed"
    assert run.data.tags["marginsearch.reason"] == "RuntimeError: loss diverged"


def test_system_exit_is_reraised_and_ends_the_run(tracker):
    parent = _parent(tracker, "search stop")
    with pytest.raises(SystemExit):
        with tracker.trial_run(parent, "stopped", named("arcface"), {}, {}) as stopped:
            raise SystemExit(0)
    with pytest.raises(SystemExit):
        with tracker.trial_run(parent, "done", named("arcface"), {}, {}) as done:
            done.exit_state = "complete"  # the trial reported its last epoch before Tune stopped it
            raise SystemExit(0)
    assert tracker.client.get_run(stopped.run_id).info.status == "KILLED"
    assert tracker.client.get_run(stopped.run_id).data.tags["marginsearch.state"] == "pruned"
    assert tracker.client.get_run(done.run_id).info.status == "FINISHED"


def test_optuna_pruning_ends_killed_and_explicit_finish_wins(tracker):
    import optuna

    parent = _parent(tracker, "search prune")
    with pytest.raises(optuna.TrialPruned):
        with tracker.trial_run(parent, "p", named("arcface"), {}, {}) as pruned:
            raise optuna.TrialPruned()
    assert tracker.client.get_run(pruned.run_id).info.status == "KILLED"
    with tracker.trial_run(parent, "q", named("arcface"), {}, {}) as trial:
        trial.finish("pruned", "rung 1")
    assert tracker.client.get_run(trial.run_id).data.tags["marginsearch.reason"] == "rung 1"
    with pytest.raises(TrackingError, match="unknown trial state"):
        trial.finish("done")


def test_close_abandoned_kills_only_running_children(tracker):
    parent = _parent(tracker, "search abandoned")
    open_runs = [tracker.trial_run(parent, f"a{i}", named("arcface"), {}, {}).run_id for i in range(2)]
    finished = tracker.trial_run(parent, "a-done", named("arcface"), {}, {})
    finished.finish("complete")
    closed = tracker.close_abandoned(parent)
    assert sorted(closed) == sorted(open_runs)
    for run_id in open_runs:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["marginsearch.state"] == "abandoned"
    assert tracker.client.get_run(finished.run_id).info.status == "FINISHED"
    assert tracker.client.get_run(parent).info.status == "RUNNING"  # the parent is not its own child
    assert tracker.close_abandoned(parent) == []


def test_end_search_logs_table_figures_metrics(tracker, tmp_path):
    from matplotlib.figure import Figure

    parent = _parent(tracker, "search end")
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    tracker.end_search(parent, "| loss | reward |\n|---|---|\n| arcface | 0.7 |\n",
                       {"curves": fig, "raw.png": b"\x89PNG\r\n\x1a\nfake"}, {"best_reward": 0.7})
    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["best_reward"] == 0.7
    assert b"| arcface | 0.7 |" in _read(tracker, parent, "results.md", tmp_path)
    assert _read(tracker, parent, "figures/curves.png", tmp_path).startswith(PNG_MAGIC)
    assert _read(tracker, parent, "figures/raw.png", tmp_path) == b"\x89PNG\r\n\x1a\nfake"


def test_tracker_pickles_by_uri_and_name(tracker):
    import pickle

    clone = pickle.loads(pickle.dumps(tracker))
    assert (clone.tracking_uri, clone.experiment_id) == (tracker.tracking_uri, tracker.experiment_id)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    db_dir = tracker.tracking_uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert experiment.artifact_location == f"file://{db_dir}/mlartifacts"


def _searched_campaign_runs(tracker, monkeypatch) -> tuple[str, optuna_module.Study, dict[str, Any]]:
    """A search of TrackedObjective trials (training faked: 3 epochs, a NaN metric at epoch 2) through Optuna, the
    campaign's label callback included, where trial 1 is interrupted at epoch 2 and retried: parent, study, runs."""
    from marginsearch.searchspace._study import make_storage, retry_abandoned
    from marginsearch.searchspace.search import StudyOptions, run_search
    from marginsearch.trainers import campaign
    from marginsearch.trainers.budget import budget_from

    calls = []

    def fake_train(spec, data, budget, on_epoch):
        calls.append(spec)
        for epoch in range(1, budget.epochs + 1):
            if len(calls) == 2 and epoch == 2:
                raise KeyboardInterrupt  # SIGINT mid-trial: the trial FAILs, a resume retries it
            on_epoch(SimpleNamespace(epoch=epoch, reward=0.1 * epoch, train_loss=2.0 / epoch, images_per_second=100.0,
                                     seconds=0.1, metrics={"tar@far=1e-3": 0.05 * epoch,
                                                           "acc": math.nan if epoch == 2 else 0.5}))
        return SimpleNamespace(status="complete", reward=0.1 * budget.epochs, reason="")

    monkeypatch.setattr(campaign, "train", fake_train)
    monkeypatch.setattr(campaign, "data_for", lambda *args, **kwargs: None)
    monkeypatch.setattr(campaign, "log_line", lambda line: None)
    key = "recorded-1"
    parent = tracker.start_search(key, {}, {}, {})
    objective = campaign.TrackedObjective("synthetic:tiny", budget_from("proxy", epochs=3), tracker, parent, key)
    storage = make_storage(optuna_module.storages.InMemoryStorage())

    def search() -> None:
        run_search("margin", objective, sampler="reward-guided", n_trials=3, seed=0, baselines=["arcface"],
                   study=StudyOptions(storage, key, resume=True),
                   callbacks=[lambda row: campaign.label_trial_run(tracker, parent, key, row)])

    with pytest.raises(KeyboardInterrupt):
        search()
    study = optuna_module.load_study(study_name=key, storage=storage)
    assert retry_abandoned(study, "abandoned: resumed") == [1]
    search()
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return parent, study, {run.data.tags["optuna.trial_number"]: run for run in runs}


def test_a_campaign_trial_run_records_every_param_tag_metric_and_artifact(tracker, monkeypatch):
    """What the MLflow UI shows of each trial run, for a fresh, a baseline and a retried trial (as before the
    per-trial cuts: same keys, same values)."""
    from marginsearch.trainers.budget import budget_dict, budget_from
    from marginsearch.trainers.campaign import spec_key

    parent, study, runs = _searched_campaign_runs(tracker, monkeypatch)
    trials = {t.number: t for t in study.trials}
    assert [trials[n].state.name for n in range(4)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert sorted(runs) == ["0", "2", "3"]  # trial 2 retries trial 1 in trial 1's run
    assert trials[1].user_attrs["mlflow_run_id"] == trials[2].user_attrs["mlflow_run_id"] == runs["2"].info.run_id
    budget = budget_from("proxy", epochs=3)
    for number, label in (("0", "arcface"), ("2", "searched"), ("3", "searched")):
        run, trial = runs[number], trials[int(number)]
        spec = MarginSpec.from_dict(trial.user_attrs["spec"])
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == f"trial {number} · {label}"
        expected_tags = {
            "mlflow.runName": f"trial {number} · {label}", "mlflow.parentRunId": parent,
            "marginsearch.kind": "trial", "marginsearch.campaign_key": "recorded-1",
            "marginsearch.trial_key": f"recorded-1/{spec_key(spec)}", "marginsearch.named_loss": label.replace(
                "searched", "none"), "marginsearch.state": "complete", "marginsearch.reason": "",
            "marginsearch.nonfinite.val/acc": "nan at step 2", "optuna.trial_number": number,
            "optuna.study": "recorded-1", **({"marginsearch.reopened": "1"} if number == "2" else {})}
        assert run.data.tags == expected_tags
        expected_params = {"data": "synthetic:tiny", **{f"budget.{k}": str(v) for k, v in budget_dict(budget).items()},
                           **{f"spec.{k}": str(v) for k, v in spec.flat().items()}}
        assert run.data.params == expected_params
        steps = [1, 1, 2, 3] if number == "2" else [1, 2, 3]  # the retry logs epoch 1 again
        history = {key: [m.step for m in tracker.client.get_metric_history(run.info.run_id, key)]
                   for key in run.data.metrics}
        assert {k: sorted(v) for k, v in history.items()} == {
            "reward": steps, "train_loss": steps, "images_per_second": steps, "val/tar_at_far_1e-3": steps,
            "val/acc": [s for s in steps if s != 2]}
        assert run.data.metrics["reward"] == pytest.approx(0.3)
        assert sorted(a.path for a in tracker.client.list_artifacts(run.info.run_id)) == ["spec.json",
                                                                                          "target_logit.png"]


def test_trial_runs_reopen_by_recorded_id_or_memory_and_label_without_searching(tracker, monkeypatch):
    from marginsearch.trainers.tracking import OPTUNA_STUDY_TAG, OPTUNA_TRIAL_TAG

    parent = _parent(tracker, "search no-search")
    spec = named("arcface")
    tags = {OPTUNA_TRIAL_TAG: 7, OPTUNA_STUDY_TAG: "s"}
    monkeypatch.setattr(tracker, "_search", lambda filters: pytest.fail(f"searched for {filters}"))
    first = tracker.trial_run(parent, "k", spec, {"lr": 0.1}, tags, run_name="trial 7 · arcface", new=True)
    first.finish("failed", "worker lost")
    retried = tracker.trial_run(parent, "k", spec, {"lr": 0.1}, tags, run_id=first.run_id)  # the recorded run
    assert retried.run_id == first.run_id and retried.resumed
    again = tracker.trial_run(parent, "k", spec, {"lr": 0.1}, tags, new=True)  # same key in this process: remembered
    assert again.run_id == first.run_id
    assert tracker.client.get_run(first.run_id).data.tags["marginsearch.reopened"] == "2"
    other = tracker.trial_run(parent, "k2", spec, {}, {}, run_id=first.run_id, new=True)  # not k2's run: a new one
    assert other.run_id != first.run_id and not other.resumed
    renamed: list[tuple[str, str]] = []
    real_update = tracker.client.update_run
    monkeypatch.setattr(tracker.client, "update_run",
                        lambda run_id, status=None, name=None: (renamed.append((run_id, name)),
                                                                real_update(run_id, status, name))[1])
    tracker.label_trial_run(parent, "k", 7, "s", "arcface")  # already so named and tagged: nothing to write
    assert renamed == []
    tracker.label_trial_run(parent, "k2", 8, "s", "cosface")  # opened here under another name: updated by id
    run = tracker.client.get_run(other.run_id)
    assert renamed == [(other.run_id, "trial 8 · cosface")]
    assert run.data.tags[OPTUNA_TRIAL_TAG] == "8" and run.data.tags[OPTUNA_STUDY_TAG] == "s"


def test_a_tracker_without_memory_labels_by_searching(tracker):
    import pickle

    parent = _parent(tracker, "search label elsewhere")
    opened = tracker.trial_run(parent, "w", named("cosface"), {}, {})  # as in a Ray worker: no Optuna trial here
    driver = pickle.loads(pickle.dumps(tracker))
    driver.label_trial_run(parent, "w", 3, "study", "cosface")
    run = tracker.client.get_run(opened.run_id)
    assert run.info.run_name == "trial 3 · cosface" and run.data.tags["optuna.trial_number"] == "3"


def test_log_files_writes_a_local_artifact_folder_directly_and_uploads_any_other(tracker, tmp_path):
    from marginsearch.trainers.tracking import _local_folder

    assert _local_folder("file:///abs/a%20b/artifacts") == Path("/abs/a b/artifacts")
    assert _local_folder("/abs/artifacts") == Path("/abs/artifacts")
    assert _local_folder("mlflow-artifacts:/1/abc/artifacts") is None and _local_folder("s3://b/k") is None
    run = tracker.client.create_run(tracker.experiment_id)
    run_id = run.info.run_id
    tracker.log_files(run_id, {"a/b.txt": "x"}, run.info.artifact_uri)
    tracker.log_files(run_id, {"c.bin": b"y"}, "mlflow-artifacts:/elsewhere")  # not local: through MLflow, to the run
    assert _read(tracker, run_id, "a/b.txt", tmp_path) == b"x" and _read(tracker, run_id, "c.bin", tmp_path) == b"y"
    with pytest.raises(TrackingError, match="relative path"):
        tracker.log_files(run_id, {"../escape.txt": "no"}, run.info.artifact_uri)
    assert not (_local_folder(run.info.artifact_uri).parent / "escape.txt").exists()


def _journal_mode(path) -> str:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def test_mlflow_store_of_a_tracker_is_switched_to_wal_and_keeps_working(tmp_path):
    tracker = CampaignTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "wal")
    run = tracker.client.create_run(tracker.experiment_id)
    tracker.client.log_metric(run.info.run_id, "x", 1.0)
    assert _journal_mode(tmp_path / "mlflow.db") == "wal"
    again = CampaignTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "wal")
    assert again.client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
