"""`split_identities` and `marginsearch split`: a face folder split by identity into train/ and LFW-style pairs."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from marginsearch.trainers.cli import main
from marginsearch.trainers.data import split_identities
from marginsearch.trainers.data.split import SplitError, genuine_pairs, impostor_pairs, natural_key
from marginsearch.trainers.sources import PairSet, evaluation_data, training_data

SMALL = {"folds": 4, "pairs_per_fold": 5}   # 30 kept identities → 8 held out, 2 a fold


def counts_of(k: int) -> int:
    """Images of identity k: 4 to 7."""
    return 4 + k % 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """30 identities of 4–7 tiny images (PNG, grey PGM, one .PNG) named img5, img10, img15, ... (img10 sorts before
    img5 as text), an identity of 2 images, a hidden folder and a stray text file."""
    root = tmp_path_factory.mktemp("faces") / "images"
    rng = np.random.default_rng(0)
    for k in range(30):
        folder = root / f"id{k:02d}"
        folder.mkdir(parents=True)
        for j in range(1, counts_of(k) + 1):
            if k % 3 == 0:
                Image.fromarray(rng.integers(0, 255, (10, 8), dtype=np.uint8)).save(folder / f"img{5 * j}.pgm")
            else:
                suffix = ".PNG" if k == 1 else ".png"
                image = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
                image.save(folder / f"img{5 * j}{suffix}", format="PNG")
    (root / "id00" / "notes.txt").write_text("not an image")
    (root / "few").mkdir()
    for j in range(2):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "few" / f"{j}.png")
    (root / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / ".cache" / "x.png")
    return root


def parse_pairs(path: Path) -> tuple[tuple[int, int], list[list[list[str]]]]:
    """pairs.txt → ((folds, n), per fold its 2n lines split into fields)."""
    lines = path.read_text().splitlines()
    folds, n = map(int, lines[0].split("\t"))
    body = [line.split("\t") for line in lines[1:]]
    return (folds, n), [body[f * 2 * n:(f + 1) * 2 * n] for f in range(folds)]


def files_under(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())}


def test_natural_key_orders_numbers_as_numbers():
    names = ["img10.png", "img9.png", "IMG2.png", "img1.png", "img01.png"]
    assert sorted(names, key=natural_key) == ["img01.png", "img1.png", "IMG2.png", "img9.png", "img10.png"]


@pytest.mark.parametrize("counts, n", [({"a": 3, "b": 3}, 9),              # every impostor pair there is
                                       ({"a": 1, "b": 1, "c": 50}, 25)])   # drawn one by one from 101
def test_impostor_pairs_distinct_valid_and_seeded(counts, n):
    pairs = impostor_pairs(sorted(counts), counts, n, random.Random(0))
    assert len({frozenset({(a, i), (b, j)}) for a, i, b, j in pairs}) == n
    assert all(a != b and 1 <= i <= counts[a] and 1 <= j <= counts[b] for a, i, b, j in pairs)
    assert pairs == impostor_pairs(sorted(counts), counts, n, random.Random(0))
    assert pairs != impostor_pairs(sorted(counts), counts, n, random.Random(1))


def test_genuine_pairs_distinct_valid_and_spread():
    counts = {"a": 10, "b": 4, "c": 2}                   # 45 + 6 + 1 pairs
    every = {(name, i, j) for name, c in counts.items() for i in range(1, c + 1) for j in range(i + 1, c + 1)}
    pairs = genuine_pairs(sorted(counts), counts, 52, random.Random(0))
    assert len(pairs) == 52 and set(pairs) == every
    some = genuine_pairs(sorted(counts), counts, 9, random.Random(0))
    assert len(set(some)) == 9 and set(some) <= every
    assert {name for name, _, _ in some[:3]} == {"a", "b", "c"}   # round-robin: each identity in the first round
    assert some != genuine_pairs(sorted(counts), counts, 9, random.Random(1))


def test_split_writes_disjoint_identities_and_lfw_names(source, tmp_path):
    out = tmp_path / "split"
    summary = split_identities(source, out, **SMALL)
    train, test = files_under(out / "train"), files_under(out / "test")
    kept = {f"id{k:02d}" for k in range(30)}
    assert set(train).isdisjoint(test) and set(train) | set(test) == kept
    assert (summary["source_identities"], summary["kept_identities"]) == (31, 30)
    assert (summary["train_identities"], summary["test_identities"]) == (22, 8)
    assert summary["train_images"] == sum(map(len, train.values()))
    assert summary["test_images"] == sum(map(len, test.values()))
    assert summary["kept_images"] == sum(counts_of(k) for k in range(30))
    assert summary["files"] == {"linked": summary["train_images"] + 2 * summary["test_images"], "copied": 0}
    for name, images in train.items():
        assert images == sorted(p.name for p in (source / name).iterdir() if p.suffix.lower() != ".txt")
    for name in test:
        suffix = next((source / name).glob("img5.*")).suffix
        originals = [source / name / f"img{5 * j}{suffix}" for j in range(1, counts_of(int(name[2:])) + 1)]
        renamed = sorted((out / "pairs_root" / name).iterdir())
        assert [p.name for p in renamed] == [f"{name}_{k:04d}{suffix.lower()}" for k in range(1, len(originals) + 1)]
        assert [p.read_bytes() for p in renamed] == [p.read_bytes() for p in originals]   # _0002 is img10, not img5
    recorded = json.loads((out / "split.json").read_text())
    assert sorted(recorded["train_ids"]) == sorted(train) and sorted(recorded["test_ids"]) == sorted(test)
    assert recorded["options"]["seed"] == 0 and recorded["pairs"]["genuine"] == 20


def test_pairs_load_balanced_in_identity_disjoint_folds(source, tmp_path):
    out = tmp_path / "split"
    summary = split_identities(source, out, **SMALL)
    data = evaluation_data(summary["data"]["test"])
    assert isinstance(data, PairSet) and len(data.issame) == 40 and int(data.issame.sum()) == 20
    assert data.images.shape[0] == 80
    (folds, n), fold_lines = parse_pairs(out / "pairs.txt")
    assert (folds, n) == (4, 5)
    people = []
    for lines in fold_lines:
        assert [len(f) for f in lines] == [3] * n + [4] * n
        assert all(f[0] != f[2] for f in lines[n:])
        assert len({tuple(f) for f in lines}) == 2 * n          # no pair twice
        people.append({f[0] for f in lines} | {f[2] for f in lines[n:]})
    assert all(a.isdisjoint(b) for i, a in enumerate(people) for b in people[i + 1:])
    assert set().union(*people) <= set(json.loads((out / "split.json").read_text())["test_ids"])
    train = training_data(summary["data"]["train"])   # 22 identities, some of them for validation
    assert train.num_classes + len(set(train.val.labels.tolist())) == 22


def test_same_seed_same_split_other_seed_another(source, tmp_path):
    a = split_identities(source, tmp_path / "a", **SMALL, seed=3)
    b = split_identities(source, tmp_path / "b", **SMALL, seed=3)
    c = split_identities(source, tmp_path / "c", **SMALL, seed=4)
    assert (tmp_path / "a" / "pairs.txt").read_text() == (tmp_path / "b" / "pairs.txt").read_text()
    assert files_under(tmp_path / "a" / "train") == files_under(tmp_path / "b" / "train")
    assert (tmp_path / "a" / "pairs.txt").read_text() != (tmp_path / "c" / "pairs.txt").read_text()
    assert a["test_identities"] == b["test_identities"] == c["test_identities"]


def test_min_and_max_images(source, tmp_path):
    summary = split_identities(source, tmp_path / "min", min_images=6, folds=2, pairs_per_fold=5)
    kept = {f"id{k:02d}" for k in range(30) if counts_of(k) >= 6}
    folders = set(files_under(tmp_path / "min" / "train")) | set(files_under(tmp_path / "min" / "test"))
    assert folders == kept and summary["kept_identities"] == len(kept) == 14
    summary = split_identities(source, tmp_path / "max", max_images=4, **SMALL)
    train = files_under(tmp_path / "max" / "train")
    assert summary["kept_images"] == 120 and all(len(images) == 4 for images in train.values())
    seven = next(name for name in train if counts_of(int(name[2:])) == 7)
    suffix = Path(train[seven][0]).suffix
    assert train[seven] == sorted(f"img{5 * j}{suffix}" for j in range(1, 5))   # img5..img20, not img10..img25


def test_copies_where_hard_links_fail(source, tmp_path, monkeypatch):
    def refuse(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    summary = split_identities(source, tmp_path / "split", **SMALL)
    assert summary["files"]["linked"] == 0 and summary["files"]["copied"] > 0
    assert evaluation_data(summary["data"]["test"]).issame.sum() == 20


def test_overwrite_replaces_only_what_a_split_writes(source, tmp_path):
    out = tmp_path / "split"
    split_identities(source, out, **SMALL)
    (out / "train" / "stale").mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(SplitError, match="exists and is not empty.*overwrite"):
        split_identities(source, out, **SMALL, seed=1)
    assert (out / "train" / "stale").is_dir()
    split_identities(source, out, **SMALL, seed=1, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and not (out / "train" / "stale").exists()
    assert json.loads((out / "split.json").read_text())["options"]["seed"] == 1


def spaced_source(root: Path) -> Path:
    for k in range(12):
        (root / ("Ann Lee" if k == 5 else f"p{k}")).mkdir(parents=True)
        for j in range(4):
            Image.fromarray(np.full((4, 4), j, dtype=np.uint8)).save(root / ("Ann Lee" if k == 5 else f"p{k}")
                                                                     / f"{j}.png")
    return root


@pytest.mark.parametrize("options, message", [
    ({"folds": 5}, r"hold out 8 at test_fraction 0\.25; 5 identity-disjoint folds need ≥ 10"),
    ({"folds": 4, "pairs_per_fold": 50}, r"fold 1 of 4 \(2 identities, \d+ images\) allows only \d+ genuine pairs, "
                                         "50 asked"),   # 2 identities of ≤ 7 images: ≤ 42 genuine, ≤ 49 impostor
    ({"folds": 1, "test_fraction": 0.1, "pairs_per_fold": 18},   # 3 identities: ≥ 18 genuine, ≥ 48 impostor
     None),
    ({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
    ({"folds": 0}, "folds must be ≥ 1"),
    ({"pairs_per_fold": 0}, "pairs_per_fold must be ≥ 1"),
    ({"min_images": 5, "max_images": 4}, "max_images 4 is below min_images 5"),
    ({"min_images": 8}, "no identity folder holds ≥ 8"),
])
def test_refused_before_anything_is_written(source, tmp_path, options, message):
    out = tmp_path / "split"
    if message is None:   # the boundary that passes: the same call with one pair more per fold is refused
        split_identities(source, out, **options)
        options = {**options, "pairs_per_fold": 64}   # > 3 × 21 genuine
        message, out = "allows only", tmp_path / "again"
    with pytest.raises(SplitError, match=message):
        split_identities(source, out, **options)
    assert not out.exists()


def test_too_few_impostor_pairs(tmp_path):
    root = tmp_path / "two"
    for name, count in (("a", 40), ("b", 2), ("c", 40)):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.fromarray(np.full((4, 4), j, dtype=np.uint8)).save(root / name / f"{j}.png")
    # seed 0 holds out b and c: 1 + 780 genuine pairs, 2 × 40 = 80 impostor pairs
    with pytest.raises(SplitError, match=r"allows only 80 impostor pairs, 90 asked"):
        split_identities(root, tmp_path / "out", test_fraction=0.6, folds=1, pairs_per_fold=90, min_images=2, seed=0)
    summary = split_identities(root, tmp_path / "out", test_fraction=0.6, folds=1, pairs_per_fold=80, min_images=2)
    assert evaluation_data(summary["data"]["test"]).issame.tolist() == [True] * 80 + [False] * 80


def test_refused_places(source, tmp_path):
    with pytest.raises(SplitError, match="not a folder"):
        split_identities(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(SplitError, match="not a folder"):
        split_identities(tmp_path / "file.png", tmp_path / "out")
    with pytest.raises(SplitError, match="exists and is not a folder"):
        split_identities(source, tmp_path / "file.png")
    with pytest.raises(SplitError, match="lies inside the source folder"):
        split_identities(source, source / "split")
    out = tmp_path / "split"
    split_identities(source, out, **SMALL)
    with pytest.raises(SplitError, match="which the split writes"):   # re-splitting train/ into its own out
        split_identities(out / "train", out, overwrite=True, folds=1, pairs_per_fold=1)
    assert (out / "train").is_dir()
    with pytest.raises(SplitError, match="cannot name a path with '@'"):
        split_identities(source, tmp_path / "a@b")


def test_whitespace_in_an_identity_name_is_refused_by_name(tmp_path):
    root = spaced_source(tmp_path / "faces")
    with pytest.raises(SplitError, match=r"Ann Lee: identity name 'Ann Lee' holds whitespace"):
        split_identities(root, tmp_path / "out", folds=1, pairs_per_fold=1)
    assert not (tmp_path / "out").exists()


def test_cli_split_end_to_end(source, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", "--data", f"imagefolder:{source}", "--out", str(out), "--folds", "4",
                 "--pairs-per-fold", "5", "--max-images", "6", "--seed", "2"]) == 0
    printed, _, toml = capsys.readouterr().out.partition("\n\n[data]")
    summary = json.loads(printed)
    assert summary["pairs"] == {"folds": 4, "pairs_per_fold": 5, "genuine": 20, "impostor": 20}
    assert summary["options"]["max_images"] == 6 and summary["options"]["seed"] == 2
    data = tomllib.loads("[data]" + toml)["data"]
    root = out.resolve()
    assert data == {"train": f"imagefolder:{root / 'train'}",
                    "test": f"pairs:{root / 'pairs.txt'}@{root / 'pairs_root'}"}
    assert evaluation_data(data["test"]).issame.sum() == 20


@pytest.mark.parametrize("argv, message", [
    (["--data", "recordio:x.rec"], "--data expects imagefolder:<dir>"),
    (["--data", "imagefolder:{source}", "--test-fraction", "0"], "test_fraction must be between 0 and 1"),
    (["--data", "imagefolder:{source}", "--folds", "9"], "9 identity-disjoint folds need ≥ 18"),
])
def test_cli_split_bad_input_is_one_line_and_exit_2(source, tmp_path, capsys, argv, message):
    argv = [a.replace("{source}", str(source)) for a in argv]
    assert main(["split", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("marginsearch split: error: ") and message in err
    assert not (tmp_path / "out").exists()
