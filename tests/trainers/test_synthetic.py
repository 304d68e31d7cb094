"""The built-in synthetic benchmark: deterministic, open-set, long-tailed, cached."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from marginsearch.trainers.data import synthetic as syn


def test_tiny_is_deterministic_and_seed_dependent():
    cfg = syn.PRESETS["tiny"]
    a, b = syn.generate(cfg), syn.generate(cfg)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    c = syn.generate(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(a.train.images, c.train.images)


def test_splits_shapes_and_eval_counts():
    cfg = syn.PRESETS["tiny"]
    b = syn.generate(cfg)
    for split, ids in ((b.train, cfg.train_identities), (b.val, cfg.val_identities), (b.test, cfg.test_identities)):
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (3, cfg.image_size, cfg.image_size)
        assert split.num_classes == ids and int(split.labels.max()) == ids - 1
    assert torch.all(b.val.counts() == cfg.eval_images) and torch.all(b.test.counts() == cfg.eval_images)


def test_identities_are_disjoint_across_splits():
    # Identities are latents; a canonical face of each split's identities must differ from all others.
    cfg = dataclasses.replace(syn.PRESETS["tiny"], nuisance=0.0, hard_fraction=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    latents = syn._identity_latents(40, cfg, g)
    assert torch.cdist(latents, latents).add(torch.eye(40) * 1e9).min() > 1e-3
    b = syn.generate(cfg)
    mean_face = lambda split, k: split.images[split.labels == k].float().mean(0)
    for k in range(cfg.test_identities):
        dists = [(mean_face(b.test, k) - mean_face(b.train, j)).abs().mean() for j in range(cfg.train_identities)]
        assert min(dists) > 1.0  # no test identity is a training identity


def test_long_tail_follows_the_power_curve():
    cfg = dataclasses.replace(syn.PRESETS["tiny"], train_identities=50, max_images=30, min_images=2, tail_exponent=2.0)
    counts = syn.generate(cfg).train.counts().sort(descending=True).values
    assert counts[0] == 30 and counts[-1] == 2
    expected = (2 + 28 * (1 - torch.arange(50) / 50.0) ** 2).round().long()
    assert torch.equal(counts, expected)
    flat = syn.generate(dataclasses.replace(cfg, tail_exponent=0.0)).train.counts()
    assert torch.all(flat == 30)


def test_hard_fraction_and_label_noise():
    cfg = dataclasses.replace(syn.PRESETS["tiny"], train_identities=60, max_images=20, hard_fraction=0.3,
                              label_noise=0.2)
    b = syn.generate(cfg)
    assert abs(b.train.hard.float().mean().item() - 0.3) < 0.06
    changed = (b.train.labels != b.train_clean_labels).float().mean().item()
    assert 0.12 < changed < 0.25  # 20% replaced, a few by their own label


def test_cache_round_trip_and_corrupt_entry_regenerates(tmp_path, monkeypatch):
    first = syn.load_synthetic("tiny", cache_dir=tmp_path)
    files = list((tmp_path / "synthetic").glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(syn, "generate", lambda cfg: (_ for _ in ()).throw(AssertionError("regenerated")))
    cached = syn.load_synthetic("tiny", cache_dir=tmp_path)
    assert torch.equal(cached.train.images, first.train.images)
    monkeypatch.undo()
    files[0].write_bytes(b"not a torch file")
    again = syn.load_synthetic("tiny", cache_dir=tmp_path)
    assert torch.equal(again.train.images, first.train.images)


def test_config_and_preset_errors():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        syn.load_synthetic("huge")
    with pytest.raises(ValueError, match="min_images"):
        syn.SyntheticConfig(min_images=0)
    with pytest.raises(ValueError, match="label_noise"):
        syn.SyntheticConfig(label_noise=1.5)
    assert syn.PRESETS["tiny"].key() != syn.PRESETS["demo"].key()


def test_probe_split_holds_out_images_of_every_training_identity_without_changing_the_others():
    cfg = syn.PRESETS["tiny"]
    with_probe = syn.generate(cfg)
    without = syn.generate(dataclasses.replace(cfg, probe_images=0))
    assert without.probe is None
    assert torch.equal(with_probe.test.images, without.test.images)
    assert torch.equal(with_probe.train.images, without.train.images)
    probe = with_probe.probe
    assert probe.num_classes == cfg.train_identities
    assert torch.all(probe.counts() == cfg.probe_images)
    # held out: no probe image is a copy of a training image
    flat_train = with_probe.train.images.flatten(1).float()
    flat_probe = probe.images.flatten(1).float()
    assert torch.cdist(flat_probe, flat_train).min() > 1.0


def test_probe_split_survives_the_cache(tmp_path):
    a = syn.load_synthetic("tiny", cache_dir=tmp_path)
    b = syn.load_synthetic("tiny", cache_dir=tmp_path)
    assert torch.equal(a.probe.images, b.probe.images) and torch.equal(a.probe.labels, b.probe.labels)
