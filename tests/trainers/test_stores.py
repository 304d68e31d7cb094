"""Broken places and interrupts through the CLI: one line, exit 2 (or 130/143), nothing recorded changes, a resume
retries.

Stores: a working directory that is a file, a corrupt or truncated mlflow.db / optuna.db (and a
models:/ URI against such a store), a space file that is not UTF-8. Interrupts: SIGINT or SIGTERM
during a trial ends the process with 130 / 143 and one line, the trial's MLflow run KILLED, and the
next run of the same command retries that trial, as after a kill.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.trainers.test_faults import ROOT, campaign_argv, consistency_problems, run_cli


def _one_line(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert done.returncode == code, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _truncated_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("create table t (x text)")
        db.executemany("insert into t values (?)", [("x" * 500,) for _ in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "w"
    target.write_text("not a folder")
    done = run_cli(campaign_argv(target), tmp_path)
    _one_line(done, 2, str(target), "is a file")
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("store", ["mlflow.db", "optuna.db"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_store_is_one_line_and_left_unchanged(tmp_path, store, damage):
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / store
    if damage == "garbage":
        path.write_bytes(b"this is not a SQLite database\n" * 40)
    else:
        _truncated_sqlite(path)
    before = path.read_bytes()
    done = run_cli(campaign_argv(workdir), workdir)
    _one_line(done, 2, str(path))
    assert path.read_bytes() == before
    other = {"mlflow.db": "optuna.db", "optuna.db": "mlflow.db"}[store]
    assert not (workdir / other).exists()  # checked before any store was opened


def test_a_models_uri_against_a_corrupt_store_is_one_line(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"garbage" * 100)
    done = run_cli(["evaluate", "--model", "models:/m@champion", "--data", "synthetic:tiny"], tmp_path)
    _one_line(done, 2, str(path))


def test_a_space_file_that_is_not_utf8_names_the_file(tmp_path):
    space = tmp_path / "latin1.toml"
    space.write_bytes('name = "café"\n'.encode("latin-1"))
    argv = campaign_argv(tmp_path) + ["--set", f"search.space={space}"]
    done = run_cli(argv, tmp_path)
    _one_line(done, 2, str(space), "not UTF-8")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_trial_is_retried_on_resume_like_a_kill(tmp_path, signum, code):
    workdir = tmp_path / "w"
    workdir.mkdir()
    argv = campaign_argv(workdir)
    env = {**os.environ, "MARGINSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "marginsearch.trainers.cli", *argv], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the second trial's first epoch: a trial is running, one is recorded
        if line.strip().startswith("trial   0"):
            break
    for line in proc.stdout:
        if "epoch 1/" in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert len(err.strip().splitlines()[-1:]) == 1 and "run the same command again" in err.strip().splitlines()[-1]
    study = optuna.load_study(study_name="demo-1", storage=f"sqlite:///{workdir / 'optuna.db'}")
    interrupted = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["fail_reason"].startswith("abandoned: interrupted")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = interrupted[0].user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    done = run_cli(argv, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert consistency_problems(workdir) == []
    trials = optuna.load_study(study_name="demo-1", storage=f"sqlite:///{workdir / 'optuna.db'}").get_trials()
    retries = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert len(retries) == 1 and retries[0].params == interrupted[0].params


@pytest.mark.parametrize("target", ["workdir", "mlflow.db", "optuna.db"])
def test_an_unwritable_workdir_or_store_is_one_line_before_anything_opens(tmp_path, monkeypatch, capsys, target):
    """Root passes every permission check, so the read-only place is simulated where the check asks (os.access)."""
    from marginsearch.trainers import stores
    from marginsearch.trainers.cli import main

    workdir = tmp_path / "w"
    workdir.mkdir()
    if target != "workdir":
        with sqlite3.connect(workdir / target) as db:
            db.execute("create table t (x)")
    denied = workdir if target == "workdir" else workdir / target
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    real_access = os.access
    monkeypatch.setattr(stores.os, "access",
                        lambda p, mode: False if Path(p) == denied and mode & os.W_OK else real_access(p, mode))
    capsys.readouterr()
    assert main(campaign_argv(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(denied) in err[0] and "not writable" in err[0], err
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before   # no store was created or changed
