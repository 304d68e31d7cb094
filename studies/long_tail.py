"""Study 4, long tail and hard samples: the benchmark's knobs turned up; which losses hold up (Range loss,
KappaFace, DDL claims)?

    python -m studies.long_tail                          # demo preset, tail_exponent 4, hard_fraction 0.3, seeds 0 1 2
    python -m studies.long_tail --preset demo --tail-exponent 3 --hard-fraction 0.2
    python -m studies.long_tail --reduced                # tiny preset, 2 epochs, seed 0 (CI)

Losses: normface, arcface, kappaface (KappaFace, arXiv 2201.12100), arcface + Range loss (arXiv
1611.08976) and arcface + DDL (arXiv 2002.03662, its student pairs those touching a flagged hard
sample), each on the full budget. Reported on the test identities: TAR@FAR=1e-3 over all pairs,
hard-sample TAR@FAR=1e-3 (pairs touching a hard sample, all negatives) and rank-1 of the rarest
third of training identities (held-out probe images), mean ± std over seeds.

Run time, measured on 2 cores: demo preset (5.6k training images with tail_exponent 4) ≈ 45 s
per run, 15 runs ≈ 11 min beside another job. The bench preset ≈ 8 min per run, ≈ 2 h (an
estimate from its ~13× compute per epoch).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from studies.common import (  # noqa: E402
    StudyOutput,
    command_line,
    log_runs_to_mlflow,
    mean,
    mode_for,
    std,
    study_parser,
    summarise,
    test_metrics,
    tracking_uri,
)

# label → (named loss, auxiliary terms {name: (weight, params)})
VARIANTS: dict[str, tuple[str, dict[str, tuple[float, dict[str, Any]]]]] = {
    "normface": ("normface", {}),
    "arcface": ("arcface", {}),
    "kappaface": ("kappaface", {}),
    "arcface + range": ("arcface", {"range": (0.1, {})}),
    "arcface + ddl": ("arcface", {"ddl": (0.1, {})}),
}
METRICS = {"tail rank-1": "tail_rank1", "hard-sample TAR@FAR=1e-3": "hard_sample_tar@far=1e-3",
           "TAR@FAR=1e-3": "tar@far=1e-3", "head rank-1": "head_rank1", "AUC": "auc"}
KEPT = ("tar@far=1e-3", "tar@far=1e-4", "hard_sample_tar@far=1e-3", "auc", "accuracy", "hard_accuracy",
        "head_rank1", "middle_rank1", "tail_rank1")


def _figure(runs: list[dict], variants: list[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("tail_rank1", "tail rank-1"), ("hard_sample_tar@far=1e-3", "hard-sample TAR@1e-3"),
            ("tar@far=1e-3", "TAR@1e-3")]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(keys)
    for j, (key, title) in enumerate(keys):
        ms = [100 * _nan0(mean(r[key] for r in runs if r["variant"] == v)) for v in variants]
        ss = [100 * _nan0(std(r[key] for r in runs if r["variant"] == v)) for v in variants]
        ax.bar([i + j * width for i in range(len(variants))], ms, width, yerr=ss, capsize=2, label=title)
    ax.set_xticks([i + width for i in range(len(variants))], variants, fontsize=8)
    ax.set_ylabel("% on test (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _nan0(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def main(argv: list[str] | None = None) -> int:
    from marginsearch.losses import named
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.data.synthetic import load_synthetic
    from marginsearch.trainers.train import TrainData, train

    p = study_parser(__doc__, "long_tail")
    p.add_argument("--tail-exponent", type=float, default=4.0, help="power of the long tail (benchmark default 2)")
    p.add_argument("--hard-fraction", type=float, default=0.3, help="fraction of hard images (benchmark default 0.1)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    mode = mode_for(args)
    out = StudyOutput("Long tail and hard samples", Path(args.out), command_line("studies.long_tail", argv), vars(args))
    bench = load_synthetic(mode.preset, tail_exponent=args.tail_exponent, hard_fraction=args.hard_fraction)
    data = TrainData.from_benchmark(bench, f"{mode.preset}-long-tail")
    counts = bench.train.counts()
    runs, t0 = [], time.perf_counter()
    for label in args.variants:
        loss, auxiliary = VARIANTS[label]
        for seed in mode.seeds:
            result = train(named(loss), data, budget_from(mode.full, seed=seed), auxiliary=auxiliary or None)
            metrics = test_metrics(result.model, bench, seed) if result.status == "complete" else {}
            runs.append({"variant": label, "loss": loss, "auxiliary": str(auxiliary), "seed": seed,
                         "status": result.status, "val_reward": result.reward,
                         **{k: metrics.get(k, math.nan) for k in KEPT}})
            print(f"{label:>16} seed {seed}: {result.status}, tail rank-1 {runs[-1]['tail_rank1']:.4f}, "
                  f"TAR@1e-3 {runs[-1]['tar@far=1e-3']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out.add(f"Test identities of `{mode.preset}` with tail_exponent {args.tail_exponent}, hard_fraction "
            f"{args.hard_fraction} ({len(bench.train)} training images, {int((counts <= counts.median()).sum())} "
            f"identities at or below the median count {int(counts.median())}), "
            f"full budget ({mode.full.epochs} epochs), "
            f"seeds {', '.join(map(str, mode.seeds))}",
            summarise(runs, "variant", METRICS, order=args.variants))
    out.figure("long_tail", _figure(runs, args.variants))
    log_runs_to_mlflow(tracking_uri(args), "study-long-tail", runs, lambda r: f"{r['variant']} seed {r['seed']}")
    out.write(runs, {"tail_exponent": args.tail_exponent, "hard_fraction": args.hard_fraction, "preset": mode.preset})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
