"""Split a face image folder by identity into a training folder and a held-out LFW-style verification set.

`split_identities(source, out)` reads `source/<identity>/<image>` (never changing it) and writes under `out`:

    train/<identity>/<image>        the training identities (hard links, copies where linking fails; same names)
    test/<identity>/<image>         the held-out identities (same)
    pairs_root/<id>/<id>_<NNNN><ext> the held-out images renamed as LFW names them (NNNN 1-based, natural order)
    pairs.txt                       `folds<TAB>n`, then per fold n genuine `name i j` and n impostor
                                    `name1 i name2 j` lines; the folds hold disjoint identities (LFW's View 2)
    split.json                      the options, the counts and the identity lists

Everything is checked before anything is written; the same seed gives the same split and pairs.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import DataError
from .folder import IMAGE_SUFFIXES

__all__ = ["OUTPUTS", "SplitError", "split_identities", "scan_identities", "genuine_pairs", "impostor_pairs",
           "pairs_text"]

OUTPUTS = ("train", "test", "pairs_root", "pairs.txt", "split.json")   # all a split writes, and all overwrite removes

Genuine = tuple[str, int, int]
Impostor = tuple[str, int, str, int]


class SplitError(DataError):
    """A folder that cannot be split as asked (bad options, too few identities or images for the pairs)."""


def natural_key(name: str) -> tuple[Any, ...]:
    """'img10.jpg' after 'img9.jpg': digit runs compare as numbers, the rest case-blind, the name breaks ties."""
    parts = re.split(r"(\d+)", name)   # odd positions are the digit runs
    return (tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


def scan_identities(root: Path) -> dict[str, list[Path]]:
    """root/<identity>/<image> → {identity: its images in natural order}; hidden entries, imageless folders left out."""
    out: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
        if files:
            out[folder.name] = sorted(files, key=lambda p: natural_key(p.name))
    return out


def _pair_at(index: int, count: int) -> tuple[int, int]:
    """The index-th (i, j), 1 ≤ i < j ≤ count, in lexicographic order."""
    i = 1
    while index >= count - i:
        index -= count - i
        i += 1
    return i, i + 1 + index


def genuine_pairs(ids: list[str], counts: dict[str, int], n: int, rng: random.Random) -> list[Genuine]:
    """n distinct same-identity pairs, spread over `ids` round-robin in a shuffled order each round."""
    pools = {}
    for name in ids:
        possible = counts[name] * (counts[name] - 1) // 2
        pools[name] = [_pair_at(k, counts[name]) for k in rng.sample(range(possible), min(possible, n))]
    out: list[Genuine] = []
    order = list(ids)
    while len(out) < n:   # the caller checked that the pools hold n pairs together
        rng.shuffle(order)
        for name in order:
            if pools[name] and len(out) < n:
                i, j = pools[name].pop()
                out.append((name, i, j))
    return out


def impostor_pairs(ids: list[str], counts: dict[str, int], n: int, rng: random.Random) -> list[Impostor]:
    """n distinct different-identity pairs: two identities drawn uniformly, then one image of each (few: a sample)."""
    possible = _impostors_possible(ids, counts)
    if possible <= 4 * n:
        every = [(a, i, b, j) for a, b in itertools.combinations(ids, 2)
                 for i in range(1, counts[a] + 1) for j in range(1, counts[b] + 1)]
        return rng.sample(every, n)
    seen: set[frozenset[tuple[str, int]]] = set()
    out: list[Impostor] = []
    while len(out) < n:   # more than 4n pairs exist, so most draws are new
        a, b = rng.sample(ids, 2)
        i, j = rng.randint(1, counts[a]), rng.randint(1, counts[b])
        key = frozenset({(a, i), (b, j)})
        if key not in seen:
            seen.add(key)
            out.append((a, i, b, j))
    return out


def _impostors_possible(ids: list[str], counts: dict[str, int]) -> int:
    """How many different-identity image pairs `ids` hold."""
    total = sum(counts[name] for name in ids)
    return (total * total - sum(counts[name] ** 2 for name in ids)) // 2


def _check_options(test_fraction: float, folds: int, pairs_per_fold: int, min_images: int,
                   max_images: int | None) -> None:
    """Refuse options out of range."""
    if not 0 < test_fraction < 1:
        raise SplitError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    for name, value in (("folds", folds), ("pairs_per_fold", pairs_per_fold), ("min_images", min_images)):
        if value < 1:
            raise SplitError(f"{name} must be ≥ 1, got {value}")
    if max_images is not None and max_images < min_images:
        raise SplitError(f"max_images {max_images} is below min_images {min_images}")


def _check_places(source: Path, out: Path, overwrite: bool) -> None:
    """The source is a folder, `out` a new or empty folder (or overwrite), and neither lies where the other writes."""
    if not source.is_dir():
        raise SplitError(f"{source}: not a folder (expected <identity>/<image> sub-folders)")
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise SplitError(f"{out}: lies inside the source folder {source}; choose a folder outside it")
    written = next((dst / name for name in OUTPUTS if dst / name == src or dst / name in src.parents), None)
    if written is not None:
        raise SplitError(f"{source}: lies in {written}, which the split writes; choose another out folder")
    if "@" in str(dst):
        raise SplitError(f"{out}: a pairs: source cannot name a path with '@' ({dst}); choose another out folder")
    if out.exists() and not out.is_dir():
        raise SplitError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SplitError(f"{out}: exists and is not empty; choose a new folder, or overwrite (--overwrite) to "
                         f"replace only its {', '.join(OUTPUTS)}")


def _check_pairs(folds: list[list[str]], counts: dict[str, int], n: int) -> None:
    """Refuse a fold whose identities hold fewer than n genuine or n impostor pairs."""
    for number, ids in enumerate(folds, start=1):
        genuine = sum(counts[name] * (counts[name] - 1) // 2 for name in ids)
        impostor = _impostors_possible(ids, counts)
        for kind, possible in (("genuine", genuine), ("impostor", impostor)):
            if possible < n:
                raise SplitError(f"fold {number} of {len(folds)} ({len(ids)} identities, "
                                 f"{sum(counts[name] for name in ids)} images) allows only {possible} {kind} pairs, "
                                 f"{n} asked: lower pairs_per_fold or folds, or raise test_fraction or min_images")


def pairs_text(fold_ids: list[list[str]], counts: dict[str, int], n: int, rng: random.Random) -> str:
    """pairs.txt: `folds<TAB>n`, then per fold n genuine and n impostor lines among that fold's identities."""
    lines = [f"{len(fold_ids)}\t{n}"]
    for ids in fold_ids:
        lines += ["\t".join(map(str, pair)) for pair in genuine_pairs(ids, counts, n, rng)]
        lines += ["\t".join(map(str, pair)) for pair in impostor_pairs(ids, counts, n, rng)]
    return "\n".join(lines) + "\n"


def _link(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target` (True), or copy it where linking fails (False)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copy2(source, target)
        return False


def _clear(out: Path) -> None:
    """Remove what an earlier split wrote in `out`, nothing else."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def split_identities(source_root: str | Path, out: str | Path, test_fraction: float = 0.25, folds: int = 10,
                     pairs_per_fold: int = 50, min_images: int = 4, max_images: int | None = None, seed: int = 0,
                     overwrite: bool = False) -> dict[str, Any]:
    """Split `source_root/<identity>/<image>` by identity into `out` (see the module docstring) → the summary."""
    source, out = Path(source_root), Path(out)
    _check_options(test_fraction, folds, pairs_per_fold, min_images, max_images)
    _check_places(source, out, overwrite)
    found = scan_identities(source)
    kept = {name: files[:max_images] for name, files in found.items() if len(files) >= min_images}
    if not kept:
        raise SplitError(f"{source}: no identity folder holds ≥ {min_images} {'/'.join(IMAGE_SUFFIXES)} images")
    spaced = next((name for name in kept if any(c.isspace() for c in name)), None)
    if spaced is not None:
        raise SplitError(f"{source / spaced}: identity name {spaced!r} holds whitespace, which pairs.txt cannot "
                         "hold; rename the folder")
    names = sorted(kept)
    rng = random.Random(seed)
    rng.shuffle(names)
    n_train = round(len(names) * (1 - test_fraction))
    train_ids, test_ids = sorted(names[:n_train]), names[n_train:]   # test_ids stay shuffled for the folds
    if len(test_ids) < 2 * folds:
        raise SplitError(f"{source}: {len(kept)} identities with ≥ {min_images} images hold out {len(test_ids)} at "
                         f"test_fraction {test_fraction}; {folds} identity-disjoint folds need ≥ {2 * folds} "
                         "(2 a fold)")
    if not train_ids:
        raise SplitError(f"{source}: test_fraction {test_fraction} holds out all {len(kept)} identities; "
                         "none is left to train on")
    counts = {name: len(kept[name]) for name in test_ids}
    fold_ids = [test_ids[k::folds] for k in range(folds)]   # identity-disjoint, round-robin
    _check_pairs(fold_ids, counts, pairs_per_fold)
    pairs = pairs_text(fold_ids, counts, pairs_per_fold, rng)

    links = [(path, out / "train" / name / path.name) for name in train_ids for path in kept[name]]
    for name in sorted(test_ids):
        for number, path in enumerate(kept[name], start=1):
            links += [(path, out / "test" / name / path.name),
                      (path, out / "pairs_root" / name / f"{name}_{number:04d}{path.suffix.lower()}")]
    if out.is_dir():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    linked = sum(_link(path, target) for path, target in links)
    (out / "pairs.txt").write_text(pairs, encoding="utf-8")
    root = out.resolve()
    summary: dict[str, Any] = {
        "source": str(source.resolve()), "out": str(root),
        "options": {"test_fraction": test_fraction, "folds": folds, "pairs_per_fold": pairs_per_fold,
                    "min_images": min_images, "max_images": max_images, "seed": seed},
        "source_identities": len(found), "source_images": sum(map(len, found.values())),
        "kept_identities": len(kept), "kept_images": sum(map(len, kept.values())),
        "train_identities": len(train_ids), "train_images": sum(len(kept[name]) for name in train_ids),
        "test_identities": len(test_ids), "test_images": sum(counts.values()),
        "pairs": {"folds": folds, "pairs_per_fold": pairs_per_fold, "genuine": folds * pairs_per_fold,
                  "impostor": folds * pairs_per_fold},
        "files": {"linked": linked, "copied": len(links) - linked},
        "data": {"train": f"imagefolder:{root / 'train'}", "test": f"pairs:{root / 'pairs.txt'}@{root / 'pairs_root'}"},
    }
    lists = {"train_ids": train_ids, "test_ids": sorted(test_ids), "fold_ids": fold_ids}
    (out / "split.json").write_text(json.dumps({**summary, **lists}, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    return summary
