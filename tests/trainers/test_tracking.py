"""MLflow tracking layer: parent/nested runs, reopening, end states, abandoned runs, URI checks (one SQLite store)."""
from __future__ import annotations

import json
import socket
import time

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
