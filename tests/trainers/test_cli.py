"""The console script: train → evaluate → export on the tiny benchmark; bad input exits 2 with one line."""
from __future__ import annotations

import json

import pytest

from marginsearch.trainers.cli import main, parse_assignments


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))


def test_train_evaluate_export(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--loss", "arcface", "--set", "target.m2_rad=0.4", "--data", "synthetic:tiny",
                 "--budget", "proxy",
                 "--budget-set", "epochs=1", "--budget-set", "batch_size=32", "--budget-set", "eval_pairs=100",
                 "--aux", "range:0.1:margin=0.5", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["status"] == "complete" and "accuracy" in summary["metrics"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", "synthetic:tiny", "--split", "test",
                 "--pairs", "100"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "tar@far=1e-3" in metrics
    assert main(["export", "--model", str(out / "model.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.ts")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "m.ts"), "--data", "synthetic:tiny", "--pairs", "100"]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["train", "--loss", "arcfcae"], "unknown"),
    (["train", "--loss", "arcface", "--set", "margin=0.5"], "margin"),
    (["train", "--loss", "arcface", "--set", "m=4"], "m"),
    (["train", "--loss", "arcface", "--set", "target.m2_rad=4"], "target.m2_rad"),
    (["train", "--loss", "cosface", "--data", "imagefolder:/nonexistent/faces"], "does not exist"),
    (["train", "--loss", "cosface", "--data", "ftp:faces"], "unknown data source kind 'ftp'"),
    (["train", "--loss", "cosface", "--budget", "huge"], "unknown budget 'huge'"),
    (["train", "--loss", "cosface", "--budget-set", "epoch=3"], "unknown field"),
    (["train", "--loss", "cosface", "--set", "m"], "key=value"),
    (["evaluate", "--model", "/nonexistent/model.pt", "--data", "synthetic:tiny"], "does not exist"),
    (["train", "--loss", "cosface", "--data", "synthetic:huge"], "unknown synthetic preset"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_parse_assignments_types():
    assert parse_assignments(["m=0.4", "guard=easy", "a=[-1, -2]", "straight_through=true"]) == {
        "m": 0.4, "guard": "easy", "a": [-1, -2], "straight_through": True}
