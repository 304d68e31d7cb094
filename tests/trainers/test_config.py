"""Campaign config: TOML round trip, defaults, overrides, one-line errors naming the key."""
from __future__ import annotations

import pytest

from marginsearch.trainers.config import CampaignConfig, ConfigError, config_to_toml, load_config, override


def test_no_file_is_the_demo_campaign_and_round_trips_through_toml(tmp_path):
    config = load_config()
    assert config == CampaignConfig()
    assert config.data.train == "synthetic:demo" and config.search.backend == "optuna"
    assert config.model_name == "marginsearch-demo" and config.experiment == "marginsearch-demo"
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(config))
    assert load_config(path) == config


def test_file_fields_and_overrides_apply(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[campaign]\nname = "lfw-run"\n[search]\ntrials = 3\nbaselines = ["arcface"]\n'
                    '[budget.full]\nepochs = 2\nmilestones = [0.5]\n')
    config = load_config(path)
    assert config.campaign.name == "lfw-run" and config.search.trials == 3
    assert config.search.baselines == ("arcface",)
    assert config.budget["full"].epochs == 2 and config.budget["full"].milestones == (0.5,)
    assert config.budget["proxy"].identities == 300  # untouched budget keeps the embedded default
    changed = override(config, {"search.backend": "ray", "budget.proxy.epochs": 1, "search.cpus_per_trial": 2})
    assert changed.search.backend == "ray" and changed.budget["proxy"].epochs == 1
    assert changed.search.cpus_per_trial == 2.0 and isinstance(changed.search.cpus_per_trial, float)


@pytest.mark.parametrize("text, message", [
    ("[serch]\ntrials = 3\n", "unknown section(s) serch"),
    ("[search]\ntrails = 3\n", "unknown key(s) trails"),
    ("[search]\ntrials = 'many'\n", "search.trials: expected int"),
    ("[search]\nbackend = 'dask'\n", "search.backend must be 'optuna' or 'ray'"),
    ("[search]\nbaselines = ['arcfcae']\n", "unknown named loss(es) arcfcae"),
    ("[search]\nbaselines = 'arcface'\n", "search.baselines: expected a list of strings"),
    ("[promote]\nbaseline = 1\n", "promote.baseline: expected bool"),
    ("[budget.full]\nepoch = 3\n", "unknown field(s) ['epoch']"),
    ("[budget.full]\nepochs = 0\n", "epochs must be ≥ 1"),
    ("[budget.huge]\nepochs = 3\n", "unknown budget(s) huge"),
    ("[campaign]\nname = 'a b'\n", "campaign.name may hold"),
    ("search = 3\n", "[search] must be a table"),
    ("[search\n", "not valid TOML"),
])
def test_bad_config_gives_one_line_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/campaign.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        override(CampaignConfig(), {"trials": 3})


@pytest.mark.parametrize("assignment, message", [
    ("budget.proxy.epochs=abc", "budget: epochs must be an integer, got 'abc'"),
    ("budget.proxy.epochs=2.5", "budget: epochs must be an integer, got 2.5"),
    ("budget.proxy.lr=1e999", "budget: lr must be a finite number, got inf"),
    ("budget.proxy.lr=abc", "budget: lr must be a finite number, got 'abc'"),
    ("budget.full.batch_size=32.5", "budget: batch_size must be an integer, got 32.5"),
    ("budget.proxy.reward_metric=acc", "reward_metric 'acc' is not a metric of the judge"),
    ("budget.proxy.seed=-1", "seed must be ≥ 0, got -1"),
    ("promote.metric=tar@far=1e-9", "promote.metric: 'tar@far=1e-9' is not a metric of the judge"),
])
def test_typed_fields_are_checked_before_any_store_opens(tmp_path, monkeypatch, capsys, assignment, message):
    from marginsearch.trainers.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["campaign", "--set", assignment]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no store, no data cache, nothing written


def test_train_budget_set_is_typed_too(capsys):
    from marginsearch.trainers.cli import main

    assert main(["train", "--loss", "cosface", "--budget-set", "epochs=abc"]) == 2
    assert "budget: epochs must be an integer, got 'abc'" in capsys.readouterr().err


def test_a_reward_the_validation_split_cannot_define_is_refused_before_any_store(tmp_path, monkeypatch, capsys):
    from marginsearch.trainers.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    assert main(["campaign", "--set", "data.train=synthetic:tiny", "--set", "budget.proxy.eval_pairs=200",
                 "--set", "budget.proxy.identities=0"]) == 2  # tiny's validation split: too few impostor pairs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget.proxy.reward_metric: tar@far=1e-3 needs at least 1000 impostor pairs" in err[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()  # no store was opened


def test_an_accuracy_reward_with_too_few_pairs_for_ten_folds_is_refused(tmp_path, monkeypatch, capsys):
    from marginsearch.trainers.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    assert main(["campaign", "--set", "data.train=synthetic:tiny", "--set", "budget.proxy.eval_pairs=5",
                 "--set", "budget.proxy.reward_metric=accuracy"]) == 2  # 5 of each kind: too few for 10 folds
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget.proxy.reward_metric: accuracy needs at least 10 genuine and 10 impostor " \
        "pairs for 10 folds" in err[0]
    assert "(pairs = 5 caps each kind)" in err[0] and "budget.proxy.eval_pairs ≥ 10" in err[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
