"""The search study's machinery: its statistics, its design checks, selection on validation only, and the reduced
design end to end (rounds happen, μ moves, arms spend equal compute, test is read only after selection)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from studies import search_pays as sp
from studies.search_report import compute_rows, round_stats
from studies.stats import bootstrap_ci, paired, sign_flip_p, spearman

REDUCED = sp.DESIGNS / "search_pays_reduced.toml"


# ------------------------------------------------------------------ statistics
def test_sign_flip_p_is_exact():
    assert sign_flip_p([1.0] * 6) == pytest.approx(2 / 64)  # only all + and all − reach |mean| = 1
    assert sign_flip_p([1.0, -1.0]) == 1.0
    # [3, 1]: flips give |mean| 2, 1, 1, 2 → p(|mean| ≥ 2) = 1/2
    assert sign_flip_p([3.0, 1.0]) == 0.5


def test_bootstrap_interval_holds_the_mean_and_is_degenerate_without_spread():
    d = [0.1, 0.3, -0.05, 0.2, 0.15]
    lo, hi = bootstrap_ci(d, resamples=2000, seed=1)
    assert lo < np.mean(d) < hi and lo > min(d) and hi < max(d)
    assert bootstrap_ci([0.2] * 4) == pytest.approx((0.2, 0.2))


def test_spearman_matches_the_formula_with_ties():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    d2 = sum((a - b) ** 2 for a, b in zip([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]))
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (5 * 24))
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_paired_uses_common_finite_units_only():
    result = paired({0: 0.5, 1: 0.6, 2: 0.7, 3: math.nan}, {0: 0.4, 1: 0.4, 3: 0.1, 4: 0.9}, resamples=500)
    assert result.n == 2 and result.mean == pytest.approx(0.15) and result.wins == 2


# ------------------------------------------------------------------ the design
def test_committed_design_spends_equal_compute_and_pairs_units(tmp_path):
    design = sp.load_design(sp.DESIGNS / "search_pays.toml")
    s, g = design["search"], design["tuned_named"]
    assert len(g["losses"]) * len(g["scales"]) * g["repeats"] == s["rounds"] * s["population"]
    assert s["rounds"] >= 8 and s["population"] >= 8  # enough rounds for REINFORCE to act (issue 17)
    assert len(design["units"]["seeds"]) >= 5 and len(set(design["units"]["draws"])) >= 2
    assert design["fidelity"]["specs"] >= 16 and len(design["fidelity"]["seeds"]) >= 2  # issue 17, item 2
    bad = (sp.DESIGNS / "search_pays_reduced.toml").read_text().replace("repeats = 2", "repeats = 3")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(sp.DesignError, match="rounds × population"):
        sp.load_design(tmp_path / "bad.toml")


@pytest.mark.parametrize("text, message", [
    ("not toml [", "bad.toml: "),
    ("[benchmark]\npreset = 'demo'\n", "missing key 'units'"),
])
def test_a_bad_design_is_one_line_and_exit_code_2(tmp_path, capsys, text, message):
    (tmp_path / "bad.toml").write_text(text)
    assert sp.main(["--design", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written before the design is known good


def test_choose_proxy_takes_the_cheapest_that_reaches_the_goal():
    design = sp.load_design(REDUCED)
    specs = [{"s": float(s)} for s in range(6)]
    runs = []
    for seed in design["fidelity"]["seeds"]:
        for i, spec in enumerate(specs):
            full = {"status": "complete", "val": {"auc": i / 10}, "images": 100, "test": {"auc": i / 10}}
            cheap = {"status": "complete", "val": {"auc": (5 - i) / 10, "mean_tar": i / 10}, "images": 10}
            dear = {"status": "complete", "val": {"auc": i / 10, "mean_tar": i / 10}, "images": 50}
            runs.append({"spec": spec, "seed": seed, "full": full, "proxies": {"1ep-12ids": cheap, "1ep-all": dear}})
    table, chosen = sp.choose_proxy(design, runs)
    assert len(table) == 4
    assert (chosen["proxy"], chosen["reward"]) == ("1ep-12ids", "mean_tar") and chosen["reached_goal"]
    assert chosen["rho_val"] == pytest.approx(1.0) and chosen["cost"] == pytest.approx(0.1)


# ------------------------------------------------------------------ selection never reads test
@pytest.mark.parametrize("arm", ["reward-guided", "tuned-named"])
def test_arm_picks_on_validation_and_reads_test_once_after_selection(monkeypatch, arm):
    """A fake trainer whose full-budget validation ranks specs opposite to test: the champion must be the
    validation best, and test is read once, for it, after the pick."""
    design = sp.load_design(REDUCED)
    calls = []

    def fake_fit(spec, budget, seed, setting, judge_test=False):
        s = spec["s"]
        full = budget.get("identities") is None and budget["epochs"] == design["budget"]["full"]["epochs"] \
            and seed >= 100
        val = -abs(math.log(s / 20.0)) if full else s / 100.0  # proxy prefers big s; full-budget val prefers s ≈ 20
        calls.append(("test" if judge_test else ("full" if full else "proxy"), s))
        out = {"status": "complete", "val": {"auc": val, "mean_tar": val}, "images": 7, "seconds": 0.0}
        if judge_test:
            out["test"] = {"auc": -val}
        return out

    monkeypatch.setattr(sp, "fit", fake_fit)
    result = sp.arm_task(design, arm, seed=0, draw=0, proxy_name="1ep-12ids", reward="auc")
    promoted = result["promoted"]
    assert len(promoted) == design["search"]["promote"]
    best = max(range(len(promoted)), key=lambda i: promoted[i]["full_val"])
    assert result["champion_index"] == best and result["champion"] == promoted[best]["spec"]
    assert [c[0] for c in calls].count("test") == 1 and calls[-1] == ("test", result["champion"]["s"])
    assert result["events"][-2:] == [f"select:{best}", "test"]
    assert all("test" not in p for p in promoted)


# ------------------------------------------------------------------ the reduced design end to end
@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_pays")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINSEARCH_CACHE", str(root / "data"))
        assert sp.main(["--reduced", "--out", str(root / "out"), "--jobs", "1",
                        "--mlflow", f"sqlite:///{root / 'mlflow.db'}"]) == 0
    return root


@pytest.mark.slow
def test_reduced_study_rounds_happen_and_the_policy_moves(reduced):
    blob = json.loads((reduced / "out" / "runs.json").read_text())
    s = blob["design"]["search"]
    for run in (a for a in blob["arms"] if a["arm"] == "reward-guided"):
        assert len(run["rows"]) == s["rounds"] * s["population"]
        assert len(run["trajectory"]) == s["rounds"] + 1
        first, last = run["trajectory"][0]["mu_unit"], run["trajectory"][-1]["mu_unit"]
        assert max(abs(first[k] - last[k]) for k in first) > 1e-3
    assert [r["round"] for r in round_stats(blob["arms"], "reward-guided", s["population"])] == list(range(s["rounds"]))


@pytest.mark.slow
def test_reduced_study_arms_spend_equal_compute_and_select_before_test(reduced):
    blob = json.loads((reduced / "out" / "runs.json").read_text())
    rows = compute_rows(blob["arms"], blob["design"]["search"]["arms"], blob["design"]["tuned_named"]["repeats"])
    assert len({r["total_images"] for r in rows}) == 1 and rows[0]["total_images"] > 0
    assert len({r["proxy_images"] for r in rows}) == 1 and len({r["proxy_trials"] for r in rows}) == 1
    for run in blob["arms"]:
        assert run["events"][-1] == "test" and run["events"][-2].startswith("select:")
        assert run["champion_index"] == max(range(len(run["promoted"])), key=lambda i: run["promoted"][i]["full_val"])
    units = {(a["seed"], a["draw"]) for a in blob["arms"]}
    assert {d for _, d in units} == {0, 1}


@pytest.mark.slow
def test_reduced_study_writes_its_report_and_mlflow_runs(reduced):
    from mlflow import MlflowClient

    text = (reduced / "out" / "results.md").read_text()
    for needle in ("## Does the search pay?", "reward-guided − arm", "## Compute per arm", "## Per round of",
                   "## Proxy fidelity among the top half", "## Transfer without searching again",
                   "## Scale s against the number of training classes", "search_pays_reduced.toml",
                   "python -m studies.search_pays --reduced"):
        assert needle in text, needle
    assert (reduced / "out" / "policy_per_round.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{reduced / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-search-pays")
    blob = json.loads((reduced / "out" / "runs.json").read_text())
    assert len(client.search_runs([exp.experiment_id])) == len(blob["arms"])
    # a second run reads every training from the cache: same numbers
    again = sp.main(["--reduced", "--out", str(reduced / "out"), "--jobs", "1",
                     "--mlflow", f"sqlite:///{reduced / 'mlflow2.db'}"])
    assert again == 0 and json.loads((reduced / "out" / "runs.json").read_text())["arms"] == blob["arms"]

