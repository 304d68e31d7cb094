"""Do margins matter on the built-in benchmark? Named losses × seeds, full budget, judged on the test identities.

    python bench/margins_matter.py                      # demo preset, 3 seeds, full budget (~8 min on 2 cores)
    python bench/margins_matter.py --losses normface arcface --seeds 0 --budget proxy

Prints a markdown table (mean ± std over seeds of test TAR@FAR=1e-3 and 10-fold accuracy) and
writes it, with every run's numbers, to --out (default docs/margins_matter.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: E402

from marginsearch.losses import named  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.data.synthetic import load_synthetic  # noqa: E402
from marginsearch.trainers.judge import LabelledImages, judge  # noqa: E402
from marginsearch.trainers.train import TrainData, train  # noqa: E402


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std; 0 for one value), in percent."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--losses", nargs="+", default=["normface", "cosface", "arcface", "kappaface"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", default="full")
    p.add_argument("--out", default="docs/margins_matter.md")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bench = load_synthetic(args.preset)
    data = TrainData.from_benchmark(bench, args.preset)
    test = LabelledImages(bench.test.images, bench.test.labels, bench.test.hard, "test")
    runs, t0 = [], time.perf_counter()
    for loss in args.losses:
        for seed in args.seeds:
            budget = budget_from(args.budget, seed=seed)
            result = train(named(loss), data, budget)
            metrics = judge(result.model, test, pairs=3000, seed=seed)
            runs.append({"loss": loss, "seed": seed, "status": result.status, "val_reward": result.reward,
                         **{k: metrics[k] for k in ("tar@far=1e-3", "tar@far=1e-4", "accuracy", "auc", "rank1")}})
            print(f"{loss:>10} seed {seed}: test TAR@FAR=1e-3 {metrics['tar@far=1e-3']:.4f}  "
                  f"10-fold acc {metrics['accuracy']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    lines = [f"Test identities of `{args.preset}` ({len(test.labels)} images, {int(test.labels.max()) + 1} identities), "
             f"`{args.budget}` budget ({budget_from(args.budget).epochs} epochs, {budget_from(args.budget).backbone} "
             f"backbone), seeds {', '.join(map(str, args.seeds))}; mean ± std in %.",
             "", "| loss | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 10-fold accuracy | rank-1 |", "|---|---|---|---|---|"]
    for loss in args.losses:
        rs = [r for r in runs if r["loss"] == loss]
        lines.append(f"| {loss} | {mean_std([r['tar@far=1e-3'] for r in rs])} | {mean_std([r['tar@far=1e-4'] for r in rs])} | "
                     f"{mean_std([r['accuracy'] for r in rs])} | {mean_std([r['rank1'] for r in rs])} |")
    cmd = "python bench/margins_matter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(lines) + f"\n\nProduced by `{cmd.strip()}` in {time.perf_counter() - t0:.0f} s " \
                              f"(torch {torch.__version__}, {os.cpu_count()} CPU cores).\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n<!-- runs\n" + json.dumps(runs, indent=1) + "\n-->\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
