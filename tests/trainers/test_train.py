"""The trainer: a proxy run reports metrics, resumes to the same weights, and stops cleanly on divergence."""
from __future__ import annotations

import math

import pytest
import torch

from marginsearch.losses import named
from marginsearch.trainers.budget import Budget, budget_from
from marginsearch.trainers.data.synthetic import load_synthetic
from marginsearch.trainers.train import TrainData, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TrainData:
    b = load_synthetic("tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    return TrainData.from_benchmark(b, "tiny")


def _budget(**kw) -> Budget:
    return budget_from("proxy", **{"epochs": 2, "batch_size": 32, "embedding_size": 32, "eval_pairs": 200, **kw})


def test_proxy_run_reports_metrics_each_epoch(tiny):
    seen = []
    result = train(named("arcface"), tiny, _budget(), on_epoch=seen.append)
    assert result.status == "complete" and len(result.history) == 2 and seen == result.history
    m = result.metrics
    for key in ("tar@far=1e-2", "auc", "accuracy", "accuracy_std", "val@far=1e-3", "rank1", "hard_accuracy"):
        assert key in m
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["rank1"] <= 1.0
    assert m["pairs_per_class"] == 48  # balanced: all 48 genuine pairs of 8 × 4 images, 48 of the 448 impostor
    assert math.isnan(m["tar@far=1e-6"])  # too few negative pairs among 32 images to estimate it
    assert result.reward == m["tar@far=1e-3"] or math.isnan(m["tar@far=1e-3"])
    assert result.history[0].images_per_second > 0
    x = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8).float() / 127.5 - 1
    e = result.model(x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("loss", ["kappaface", "elasticface-arc"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path, loss):
    budget = _budget(epochs=3)
    straight = train(named(loss), tiny, budget)
    ckpt = tmp_path / "run.pt"
    first = train(named(loss), tiny, budget, checkpoint=ckpt, on_epoch=lambda r: r.epoch == 1)
    assert first.status == "stopped" and len(first.history) == 1
    resumed = train(named(loss), tiny, budget, checkpoint=ckpt)
    assert resumed.status == "complete" and [r.epoch for r in resumed.history] == [1, 2, 3]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.head.state_dict().items(), resumed.head.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.reward == straight.reward or (math.isnan(resumed.reward) and math.isnan(straight.reward))


def test_checkpoint_of_another_spec_is_refused(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    train(named("cosface"), tiny, _budget(epochs=1), checkpoint=ckpt)
    with pytest.raises(ValueError, match="another spec or budget"):
        train(named("arcface"), tiny, _budget(epochs=1), checkpoint=ckpt)


def test_divergence_ends_the_run_with_a_reason(tiny):
    result = train(named("arcface"), tiny, _budget(lr=1e12, grad_clip=None, warmup_epochs=0))
    assert result.status == "diverged"
    assert "loss became" in result.reason and "epoch" in result.reason


def test_callback_exceptions_propagate(tiny):
    class Pruned(Exception):
        pass

    def prune(report):
        raise Pruned(report.epoch)

    with pytest.raises(Pruned):
        train(named("cosface"), tiny, _budget(), on_epoch=prune)


def test_identity_subset_and_budget_errors(tiny):
    result = train(named("cosface"), tiny, _budget(epochs=1, identities=10))
    assert result.head.num_classes == 10
    with pytest.raises(ValueError, match="unknown field"):
        budget_from("proxy", epoch=3)
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        budget_from("huge")
    with pytest.raises(ValueError, match="optimizer must be"):
        Budget(optimizer="lion")


def test_auxiliary_terms_train_and_resume_with_their_state(tiny, tmp_path):
    aux = {"center": (0.1, {"alpha": 0.5}), "ddl": (1.0, {"bins": 50}), "range": (0.05, {})}
    budget = _budget(epochs=2)
    straight = train(named("cosface"), tiny, budget, auxiliary=aux)
    assert straight.status == "complete" and math.isfinite(straight.history[-1].train_loss)
    ckpt = tmp_path / "aux.pt"
    train(named("cosface"), tiny, budget, auxiliary=aux, checkpoint=ckpt, on_epoch=lambda r: True)
    saved = torch.load(ckpt, weights_only=True)["head"]
    assert "aux.center.centers" in saved and saved["aux.center.centers"].abs().sum() > 0
    resumed = train(named("cosface"), tiny, budget, auxiliary=aux, checkpoint=ckpt)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_unknown_auxiliary_term_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="unknown auxiliary loss 'centre'"):
        train(named("cosface"), tiny, _budget(epochs=1), auxiliary={"centre": (0.1, {})})


def test_compiled_backbone_trains_and_returns_the_plain_module(tiny):
    """Budget.compile compiles the backbone's forward for the steps only; the result is an ordinary module."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    eager = train(named("cosface"), tiny, _budget(epochs=1))
    compiled = train(named("cosface"), tiny, _budget(epochs=1, compile=True))
    assert compiled.status == "complete"
    assert ("_compiled_call_impl" not in vars(compiled.model.backbone)
            or compiled.model.backbone._compiled_call_impl is None)
    assert not any(k.startswith("_orig_mod") for k in compiled.model.state_dict())
    # same seed, same data order: the compiled graph computes the same function up to float reassociation
    for a, b in zip(compiled.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


def test_batches_cut_on_the_host_equal_indexing():
    from marginsearch.trainers.train import _batch_images, _stage_images
    images = torch.randint(0, 255, (10, 3, 4, 4), dtype=torch.uint8)
    idx = torch.tensor([3, 1, 7])
    staged = _stage_images(images, torch.device("cpu"))
    assert staged is images
    torch.testing.assert_close(_batch_images(staged, idx, torch.device("cpu")), images[idx])
