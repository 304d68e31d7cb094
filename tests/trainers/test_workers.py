"""Two `marginsearch search --worker` processes on one campaign (one SQLite Optuna study, one MLflow store), then
promote.

The second worker joins while the first is running trials: neither fails nor closes the other's
live trials and runs, every trial is recorded once in Optuna and MLflow, and `marginsearch promote`
finishes the campaign as if one process had searched.
"""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from tests.trainers.test_faults import CAMPAIGN, ROOT, campaign_argv, consistency_problems, run_cli

pytestmark = pytest.mark.slow
TRIALS = 6


def test_two_cli_workers_share_one_campaign_then_promote(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    argv = campaign_argv(workdir)
    argv[argv.index(f"search.trials={CAMPAIGN['search.trials']}")] = f"search.trials={TRIALS}"
    search = ["search", "--worker", *argv[1:]]
    env = {**os.environ, "MARGINSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "marginsearch.trainers.cli", *search], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in first.stdout:  # wait until the first worker has opened the campaign and started its trials
        seen.append(line)
        if line.lstrip().startswith("trial"):
            break
    second = run_cli(search, workdir)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting campaign demo-1" in "".join(seen)
    assert "joining campaign demo-1" in second.stdout
    study = optuna.load_study(study_name="demo-1", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    assert [t for t in trials if t.state == TrialState.FAIL] == []  # no live trial was failed by the other worker
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == TRIALS + 1
    done = run_cli(["promote", *argv[1:]], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert consistency_problems(workdir, n_trials=TRIALS + 1) == []
