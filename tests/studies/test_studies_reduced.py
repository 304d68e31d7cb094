"""The studies' reduced versions end to end on `tiny` through `studies/run_all.py`: folders, tables, runs,
MLflow."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from studies import run_all

pytestmark = pytest.mark.slow  # end to end: campaigns, kills, Ray or whole studies (make check leaves it out)

TABLES = {
    "named_baselines": ("| loss | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 10-fold accuracy | hard-pair accuracy | tail rank-1 |",
                        ["| normface |", "| cosface |", "| arcface |"]),
    "proxy_fidelity": ("| proxy | cost (× full) | Spearman ρ | Kendall τ | n | seed noise / spec spread |",
                       ["| 1 ep × all ids |", "| 2 ep × all ids |", "| full budget, val reward (reference) |"]),
    "long_tail": ("| variant | tail rank-1 | hard-sample TAR@FAR=1e-3 | TAR@FAR=1e-3 |",
                  ["| normface |", "| arcface |", "| kappaface |", "| arcface + range |", "| arcface + ddl |"]),
}
FIGURES = {"named_baselines": ["named_baselines.png"],
           "proxy_fidelity": ["proxy_vs_full.png"], "long_tail": ["long_tail.png"]}
RUNS = {"named_baselines": 3, "proxy_fidelity": 3, "long_tail": 5}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINSEARCH_CACHE", str(root / "cache"))
        # the search study's reduced design has its own tests (test_search_pays.py)
        assert run_all.main(["--reduced", "--epochs", "1", "--seeds", "0", "--out", str(root),
                             "--only", *TABLES]) == 0
    return root


@pytest.mark.parametrize("study", list(TABLES))
def test_each_study_writes_its_tables_figures_and_runs(results, study):
    folder = results / study
    text = (folder / "results.md").read_text()
    header, rows = TABLES[study]
    assert header in text
    for row in rows:
        assert row in text, f"{study}: no row {row!r}"
    assert "python -m studies." in text and "--reduced" in text  # the command that produced it
    for name in FIGURES[study]:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = json.loads((folder / "runs.json").read_text())
    assert len(blob["runs"]) == RUNS[study] and blob["args"]["reduced"] is True


def test_every_run_is_in_the_shared_mlflow_store(results):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {"study-named-baselines", "study-proxy-fidelity", "study-long-tail"} <= names
    exp = client.get_experiment_by_name("study-long-tail")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5 and all("tail_rank1" in r.data.metrics for r in runs)
