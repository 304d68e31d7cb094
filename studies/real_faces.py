"""Do margins beat NormFace on real faces? Named losses trained on a real face set, judged on held-out identities.

The design is fixed here, before the run:
- Data (the user's, never committed): `--train` an imagefolder: or recordio: source; its last
  `--val-fraction` of identities (name order) is the validation split, reported only (nothing is
  selected on it, nor on test); `--test` a pair list (pairs: or bin:, the insightface 10-fold
  accuracy) of identities that are not in `--train`; `--test-folder` the same held-out identities
  as labelled images (all-pairs TAR@FAR=1e-3 and AUC).
- Arms: the backbone untrained (the floor), NormFace, CosFace and ArcFace at their papers'
  defaults (s=64; m=0.35 cosine units, m=0.5 radians). Nothing is tuned per arm.
- Budget: the full budget with `--epochs`, `--image-size`, the tiny backbone; every arm the same.
- Seeds: `--seeds` (default 0 1 2 3). A seed fixes the initial weights and the data order, the same
  in every arm, so each margin is compared with NormFace seed by seed: the mean paired difference,
  its 95 % t interval and the paired t-test p-value, on the headline metric (10-fold accuracy on
  the test pairs) and on the test folder's AUC.

    python -m studies.real_faces --train imagefolder:DIR --test pairs:pairs.txt@ROOT --test-folder imagefolder:DIR2
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marginsearch.losses import named
from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
from marginsearch.trainers.budget import budget_from
from marginsearch.trainers.judge import judge, judge_pairs
from marginsearch.trainers.sources import PairSet, Split, evaluation_data, training_data
from marginsearch.trainers.train import train

from .common import RESULTS_ROOT, TEST_PAIRS, StudyOutput, command_line, fmt, mean_std, table

ARMS = ("untrained", "normface", "cosface", "arcface")
METRICS = {"test pairs 10-fold accuracy": "pairs/accuracy", "test folder AUC": "folder/auc",
           "test folder TAR@FAR=1e-3": "folder/tar@far=1e-3", "val AUC": "val/auc"}
PAIRED = ("pairs/accuracy", "folder/auc")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="imagefolder:DIR or recordio:FILE.rec")
    p.add_argument("--test", required=True, help="pairs:pairs.txt@ROOT or bin:FILE.bin (identities not in --train)")
    p.add_argument("--test-folder", default="", help="imagefolder: of the held-out identities (TAR@FAR, AUC)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--out", default=str(RESULTS_ROOT / "real_faces"))
    return p


def _judge(model: Any, test: PairSet, folder: Any, val: Any, seed: int) -> dict[str, float]:
    out = {f"pairs/{k}": v for k, v in judge_pairs(model, test.images, test.issame).items()}
    if folder is not None:
        out.update({f"folder/{k}": v for k, v in judge(model, folder, pairs=TEST_PAIRS, seed=seed).items()})
    out.update({f"val/{k}": v for k, v in judge(model, val, pairs=TEST_PAIRS, seed=seed).items()})
    return out


def paired(runs: Sequence[dict[str, Any]], arm: str, base: str, key: str) -> tuple[float, float, float, float, int]:
    """(mean difference arm − base over the seeds both ran, 95 % t interval low, high, paired t p-value, n)."""
    from scipy import stats

    by_seed = {r["seed"]: r[key] for r in runs if r["arm"] == base}
    diffs = [r[key] - by_seed[r["seed"]] for r in runs if r["arm"] == arm and r["seed"] in by_seed]
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan, math.nan, n
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if s > 0 else (0.0 if m else 1.0)
    return m, m - half, m + half, p, n


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = StudyOutput("Real faces: margins against NormFace", Path(args.out),
                      command_line("studies.real_faces", argv), vars(args))
    data = training_data(args.train, split=Split(val_fraction=args.val_fraction))
    test = evaluation_data(args.test)
    if not isinstance(test, PairSet):
        raise SystemExit("--test must be a pair list (pairs: or bin:)")
    folder = evaluation_data(args.test_folder) if args.test_folder else None
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        budget = budget_from("full", epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                             seed=seed)
        for arm in args.arms:
            if arm == "untrained":
                import torch

                torch.manual_seed(seed)
                preprocess = data.preprocess(budget)
                model = EmbeddingModel(build_backbone(budget.backbone, budget.embedding_size, preprocess.size))
                model.preprocess = preprocess
                seconds = 0.0
            else:
                result = train(named(arm), data, budget)
                model, seconds = result.model, sum(r.seconds for r in result.history)
            runs.append({"arm": arm, "seed": seed, "train_seconds": seconds,
                         **_judge(model.eval(), test, folder, data.val, seed)})
            print(f"seed {seed} {arm:<10} test pairs accuracy {fmt(runs[-1]['pairs/accuracy'])} "
                  f"folder AUC {fmt(runs[-1].get('folder/auc', math.nan))} ({seconds:.0f} s)", flush=True)
    rows = [[arm, *(mean_std(r.get(k, math.nan) for r in runs if r["arm"] == arm) for k in METRICS.values()),
             sum(r["arm"] == arm for r in runs)] for arm in args.arms]
    out.add("Test and validation metrics (mean ± std over seeds, %)", table(["arm", *METRICS, "n"], rows))
    lines = []
    for arm in (a for a in args.arms if a not in ("normface", "untrained")):
        for key in PAIRED:
            m, lo, hi, p, n = paired(runs, arm, "normface", key)
            lines.append([f"{arm} − normface", key, f"{100 * m:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]",
                          "<0.001" if p < 0.001 else f"{p:.3f}", n])
    out.add("Paired differences against NormFace (percentage points; same seed = same init and data order)",
            table(["comparison", "metric", "mean", "95 % t interval", "paired t p", "seeds"], lines))
    samples = f"{len(data.labels)} training images of {data.num_classes} identities"
    out.add("Data", f"{samples}; validation {len(data.val.labels)} images of {len(set(data.val.labels.tolist()))} "
            f"identities; test {len(test.issame)} pairs ({int(test.issame.sum())} genuine); image size "
            f"{args.image_size}, {args.epochs} epochs, backbone {budget.backbone}.")
    out.write(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
