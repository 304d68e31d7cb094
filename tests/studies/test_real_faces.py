"""studies/real_faces.py end to end on a tiny grey folder and pairs list the test writes: the tables and the paired
statistics."""
from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from studies import real_faces


def _folder(root, names, per, seed):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(1, per + 1):
            pixels = np.clip(rng.normal(20 * k + 30, 12, (16, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{j:04d}.png")


def test_reduced_run_writes_the_tables_and_pairs_by_seed(tmp_path):
    _folder(tmp_path / "train", [f"t{k:02d}" for k in range(8)], 6, 0)
    test_names = [f"x{k}" for k in range(4)]
    _folder(tmp_path / "test", test_names, 4, 1)
    lines = ["2\t5"]
    for fold in (test_names[:2], test_names[2:]):
        lines += [f"{fold[i % 2]}\t{1 + i % 3}\t{2 + i % 2 + (i % 3 == 2)}" for i in range(5)]
        lines += [f"{fold[0]}\t{1 + i % 4}\t{fold[1]}\t{1 + (i + 1) % 4}" for i in range(5)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["--train", f"imagefolder:{tmp_path / 'train'}",
            "--test", f"pairs:{tmp_path / 'pairs.txt'}@{tmp_path / 'test'}",
            "--test-folder", f"imagefolder:{tmp_path / 'test'}", "--epochs", "1", "--image-size", "16",
            "--batch-size", "8",
            "--val-fraction", "0.25", "--seeds", "0", "1", "--arms", "untrained", "normface", "cosface",
            "--out", str(out)]
    assert real_faces.main(argv) == 0
    text = (out / "results.md").read_text()
    assert "| untrained |" in text and "| cosface − normface | pairs/accuracy |" in text
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, s) for a in ("untrained", "normface", "cosface")
                                                                 for s in (0, 1))
    assert all(0 <= r["pairs/accuracy"] <= 1 and 0 <= r["folder/auc"] <= 1 for r in runs)


def test_paired_difference_and_interval():
    runs = [{"arm": "a", "seed": s, "m": v} for s, v in enumerate([0.5, 0.6, 0.7])]
    runs += [{"arm": "b", "seed": s, "m": v} for s, v in enumerate([0.6, 0.8, 0.8])]   # differences .1 .2 .1
    m, lo, hi, p, n = real_faces.paired(runs, "b", "a", "m")
    assert n == 3 and math.isclose(m, 0.4 / 3) and lo < m < hi and 0 < p < 0.1
    assert real_faces.paired(runs[:1] + runs[3:4], "b", "a", "m")[4] == 1    # one seed: no interval
