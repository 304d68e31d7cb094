"""The four studies' reduced versions end to end on `tiny` through `studies/run_all.py`: folders, tables, runs,
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
    "search_pays": ("| row | proxy reward | full-budget val | TAR@FAR=1e-3 |",
                    ["| reward-guided (searched) |", "| population (searched) |", "| tpe (searched) |",
                     "(best named) |", " at s = "]),
    "proxy_fidelity": ("| proxy | cost (× full) | Spearman ρ | Kendall τ | n | seed noise / spec spread |",
                       ["| 1 ep × all ids |", "| 2 ep × all ids |", "| full budget, val reward (reference) |"]),
    "long_tail": ("| variant | tail rank-1 | hard-sample TAR@FAR=1e-3 | TAR@FAR=1e-3 |",
                  ["| normface |", "| arcface |", "| kappaface |", "| arcface + range |", "| arcface + ddl |"]),
}
FIGURES = {"named_baselines": ["named_baselines.png"],
           "search_pays": ["search_history.png", "champion_target_logit.png"],
           "proxy_fidelity": ["proxy_vs_full.png"], "long_tail": ["long_tail.png"]}
RUNS = {"named_baselines": 3, "search_pays": 3, "proxy_fidelity": 3, "long_tail": 5}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINSEARCH_CACHE", str(root / "cache"))
        assert run_all.main(["--reduced", "--epochs", "1", "--seeds", "0", "--out", str(root)]) == 0
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


def test_search_pays_compares_with_study_one_and_spends_equal_compute(results):
    blob = json.loads((results / "search_pays" / "runs.json").read_text())
    assert blob["baseline_source"].startswith("study 1")
    named = json.loads((results / "named_baselines" / "runs.json").read_text())
    assert blob["baseline"] == named["best"]
    last_x = {r["method"]: r["history"][-1][0] for r in blob["runs"]}
    assert len(set(last_x.values())) == 1  # every method spent the same proxy epochs
    assert blob["champion"]["spec"]["s"] > 0


def test_search_pays_picks_on_validation_retrains_and_ablates_the_scale(results):
    import statistics

    blob = json.loads((results / "search_pays" / "runs.json").read_text())
    for run in (r for r in blob["runs"] if r["method"] != "population"):
        promoted = run["promoted"]
        assert len(promoted) == 2  # --promote 2 in reduced runs: both trials' specs trained on the full budget
        picked = max(promoted, key=lambda p: p["full_val_reward"])
        assert run["spec"]["s"] == picked["s"]  # chosen on validation, not on test
        assert "auc" in run and "full_val_reward" in run  # the retrained champion's own numbers
    ablation = blob["scale_ablation"]
    median_s = statistics.median(r["spec"]["s"] for r in blob["runs"])
    assert [r["seed"] for r in ablation] == [0] and ablation[0]["loss"] == f"{blob['baseline']} at s = {median_s:.3g}"
    assert blob["champion"] in blob["runs"]


def test_every_run_is_in_the_shared_mlflow_store(results):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {"study-named-baselines", "study-search-pays", "study-proxy-fidelity", "study-long-tail"} <= names
    exp = client.get_experiment_by_name("study-long-tail")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5 and all("tail_rank1" in r.data.metrics for r in runs)
