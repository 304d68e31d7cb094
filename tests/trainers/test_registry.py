"""Registry gate: promoted models register, `champion` moves only for a better loadable model, fresh-process load."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from marginsearch.losses import named
from marginsearch.trainers.backbones import EmbeddingModel, TinyCNN
from marginsearch.trainers.images import Preprocess
from marginsearch.trainers.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    champion,
    register_and_gate,
    set_challenger,
    verify_loads,
)
from marginsearch.trainers.tracking import CampaignTracker, resolve_tracking_uri

SIZE = 32


def _model(seed: int) -> EmbeddingModel:
    torch.manual_seed(seed)
    return EmbeddingModel(TinyCNN(embedding_size=16, width=8, input_size=SIZE)).eval()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store, a search run, a trial run and three promoted models (accuracies 0.80, 0.70, 0.90)."""
    root = tmp_path_factory.mktemp("registry")
    tracker = CampaignTracker(resolve_tracking_uri(None, root), "registry-test")
    parent = tracker.start_search("search", {}, {}, {})
    trial = tracker.trial_run(parent, "t", named("arcface"), {}, {})
    trial.finish("complete")
    models = {name: _model(seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    accuracy = {"a": 0.80, "b": 0.70, "c": 0.90}
    runs = {name: tracker.log_promoted(parent, trial.run_id, named("arcface"), {"acc": accuracy[name]},
                                       models[name], Preprocess(SIZE, SIZE), f"promoted {name}") for name in models}
    return {"tracker": tracker, "client": tracker.client, "parent": parent, "trial": trial.run_id,
            "models": models, "runs": runs, "accuracy": accuracy, "root": root}


def test_promoted_run_links_trial_and_holds_model(campaign):
    run = campaign["client"].get_run(campaign["runs"]["a"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["marginsearch.trial_run_id"] == campaign["trial"]
    assert run.data.tags["mlflow.parentRunId"] == campaign["parent"]
    assert run.data.metrics["acc"] == 0.80 and run.data.params["spec.target.m2_rad"] == "0.5"
    assert len(run.outputs.model_outputs) == 1


def test_champion_moves_only_through_the_gate(campaign):
    client, runs, acc = campaign["client"], campaign["runs"], campaign["accuracy"]
    first = register_and_gate(client, "emb", runs["a"], "acc", acc["a"])
    assert first.became_champion and first.previous_champion_version is None
    worse = register_and_gate(client, "emb", runs["b"], "acc", acc["b"])
    assert not worse.became_champion and "does not beat" in worse.reason
    assert (worse.previous_champion_version, worse.previous_value) == (first.version, 0.80)
    assert str(champion(client, "emb").version) == first.version
    better = register_and_gate(client, "emb", runs["c"], "acc", acc["c"])
    assert better.became_champion and better.previous_champion_version == first.version
    assert str(champion(client, "emb").version) == better.version
    assert len({first.version, worse.version, better.version}) == 3

    # re-running is idempotent: same versions, same decisions, the alias stays
    assert register_and_gate(client, "emb", runs["b"], "acc", acc["b"]) == worse
    assert register_and_gate(client, "emb", runs["a"], "acc", acc["a"]) == first
    assert len(client.search_model_versions("name = 'emb'")) == 3
    assert str(champion(client, "emb").version) == better.version

    version = client.get_model_version("emb", better.version)
    assert version.tags["marginsearch.metric.acc"] == "0.9" and version.tags["marginsearch.named_loss"] == "arcface"
    assert version.tags["marginsearch.trial_run_id"] == campaign["trial"]
    assert version.tags["marginsearch.search_run_id"] == campaign["parent"]
    run_tags = client.get_run(runs["b"]).data.tags
    assert (run_tags["marginsearch.gate.became_champion"] == "false"
            and run_tags["marginsearch.gate.version"] == worse.version)

    set_challenger(client, "emb", worse.version)
    assert str(client.get_model_version_by_alias("emb", CHALLENGER).version) == worse.version


def test_lower_is_better_gate(campaign):
    client, runs = campaign["client"], campaign["runs"]
    first = register_and_gate(client, "emb-err", runs["c"], "err", 0.3, higher_is_better=False)
    higher = register_and_gate(client, "emb-err", runs["a"], "err", 0.4, higher_is_better=False)
    lower = register_and_gate(client, "emb-err", runs["b"], "err", 0.2, higher_is_better=False)
    assert (first.became_champion, higher.became_champion, lower.became_champion) == (True, False, True)
    assert str(champion(client, "emb-err").version) == lower.version


def test_a_model_that_does_not_load_never_gets_an_alias(campaign):
    client, tracker = campaign["client"], campaign["tracker"]
    broken = client.create_run(tracker.experiment_id, run_name="broken").info.run_id
    tracker.log_files(broken, {"model/MLmodel": "flavors:\n  pytorch:\n    model_data: data\n"})
    result = register_and_gate(client, "emb-broken", broken, "acc", 0.99)
    assert not result.became_champion and result.reason.startswith("model does not load")
    assert champion(client, "emb-broken") is None
    assert verify_loads(client, "emb-broken", result.version) is not None
    with pytest.raises(RegistryError, match="does not load"):
        set_challenger(client, "emb-broken", result.version)
    with pytest.raises(RegistryError, match="has no model"):
        register_and_gate(client, "emb-broken", client.create_run(tracker.experiment_id).info.run_id, "acc", 1.0)


def test_champion_loads_in_a_fresh_process_without_marginsearch(campaign, tmp_path):
    client, runs, acc = campaign["client"], campaign["runs"], campaign["accuracy"]
    for name in ("a", "c"):
        register_and_gate(client, "emb-fresh", runs[name], "acc", acc[name])
    images = np.random.default_rng(0).uniform(-1, 1, (5, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent("""
        import sys, numpy as np, torch, mlflow.pytorch
        model = mlflow.pytorch.load_model("models:/emb-fresh@champion")
        with torch.no_grad():
            out = model(torch.from_numpy(np.load("images.npy"))).numpy()
        np.save("embeddings.npy", out)
        print(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("marginsearch", "trainers", "losses", "searchspace")))
    """)
    # MLFLOW_REGISTRY_URI: set by other tests' set_registry_uri
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"}
    env = {**inherited, "MLFLOW_TRACKING_URI": campaign["tracker"].tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # loaded without importing marginsearch
    out = np.load(tmp_path / "embeddings.npy")
    assert out.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        expected = campaign["models"]["c"](torch.from_numpy(images)).numpy()  # c is the better model
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert client.get_model_version_by_alias("emb-fresh", CHAMPION).run_id == runs["c"]


def test_champion_without_a_stored_metric_is_left_alone(campaign):
    client, runs = campaign["client"], campaign["runs"]
    first = register_and_gate(client, "emb-manual", runs["a"], "acc", 0.8)
    result = register_and_gate(client, "emb-manual", runs["c"], "tar", 0.99)
    assert not result.became_champion and "has no stored tar" in result.reason
    assert str(champion(client, "emb-manual").version) == first.version


def test_the_champion_serves_through_pyfunc_on_a_plain_ndarray(campaign):
    import mlflow.pyfunc

    client, runs, acc = campaign["client"], campaign["runs"], campaign["accuracy"]
    register_and_gate(client, "emb-serve", runs["c"], "acc", acc["c"])
    mlflow.set_tracking_uri(campaign["tracker"].tracking_uri)
    mlflow.set_registry_uri(campaign["tracker"].tracking_uri)
    model = mlflow.pyfunc.load_model("models:/emb-serve@champion")  # the path `mlflow models serve` takes
    images = np.random.default_rng(1).uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    out = np.asarray(model.predict(images))
    with torch.no_grad():
        expected = campaign["models"]["c"](torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_export_and_evaluate_take_a_models_uri_and_resize_other_image_sizes(campaign, tmp_path, monkeypatch, capsys):
    import json

    from marginsearch.trainers.cli import main
    from marginsearch.trainers.export import load_torchscript

    client, runs, acc = campaign["client"], campaign["runs"], campaign["accuracy"]
    register_and_gate(client, "emb-export", runs["c"], "acc", acc["c"])
    uri = campaign["tracker"].tracking_uri
    out = tmp_path / "champion.ts"
    assert main(["export", "--model", "models:/emb-export@champion", "--tracking-uri", uri, "--out", str(out)]) == 0
    module, meta = load_torchscript(out)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(module(images).numpy(), campaign["models"]["c"](images).numpy(), atol=1e-5)
    assert meta["input"]["shape"][2:] == [SIZE, SIZE]
    # evaluate on 48×48 images: the registered model's input size comes from its description, images are resized
    from PIL import Image

    rng = np.random.default_rng(2)
    for person in range(4):
        (tmp_path / "faces" / f"p{person}").mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "faces" / f"p{person}" / f"{k}.png")
    capsys.readouterr()
    assert main(["evaluate", "--model", "models:/emb-export@champion", "--tracking-uri", uri,
                 "--data", f"imagefolder:{tmp_path / 'faces'}", "--pairs", "10"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert 0.0 <= metrics["auc"] <= 1.0
