"""Study 1, named baselines: every named loss of the seeds at its defaults, full budget, ≥ 3 seeds, judged on test.

    python -m studies.named_baselines                  # demo preset, 11 losses × seeds 0 1 2, full budget
    python -m studies.named_baselines --preset bench   # the larger bench preset (about 6 h on 2 cores, estimated)
    python -m studies.named_baselines --reduced        # tiny preset, 2 epochs, seed 0 (CI, ~15 s)

Reports test TAR@FAR=1e-3 and 1e-4 (all pairs of the test identities), insightface 10-fold
accuracy, hard-pair accuracy (the judge's `hard_accuracy`) and rank-1 of the long-tail bucket
(held-out images of the rarest third of training identities), each as mean ± std over seeds.

Run time, measured on 2 cores: demo preset ≈ 50 s per run alone, 33 runs ≈ 30 min (50 min beside
another job). The bench preset has ~5.6× the training images at 2.25× the pixels: ≈ 11 min per
run, ≈ 6 h (an estimate from that ratio).
"""
from __future__ import annotations

import time
from pathlib import Path

from studies.common import (  # noqa: E402
    Mode,
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

LOSSES = ("normface", "cosface", "arcface", "combined", "sv-am", "mv-arc", "curricularface", "kappaface",
          "search-softmax", "random-softmax", "am-lfs")
REDUCED_LOSSES = ("normface", "cosface", "arcface")
METRICS = {"TAR@FAR=1e-3": "tar@far=1e-3", "TAR@FAR=1e-4": "tar@far=1e-4", "10-fold accuracy": "accuracy",
           "hard-pair accuracy": "hard_accuracy", "tail rank-1": "tail_rank1", "AUC": "auc"}
KEPT = ("tar@far=1e-2", "tar@far=1e-3", "tar@far=1e-4", "auc", "accuracy", "accuracy_std", "hard_accuracy",
        "hard_sample_tar@far=1e-3", "rank1", "head_rank1", "middle_rank1", "tail_rank1")


def train_named(losses: tuple[str, ...], mode: Mode) -> list[dict]:
    """Train each named loss at its defaults on the full budget for each seed; one dict of test metrics per run."""
    from marginsearch.losses import named
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.data.synthetic import load_synthetic
    from marginsearch.trainers.train import TrainData, train

    bench = load_synthetic(mode.preset)
    data = TrainData.from_benchmark(bench, mode.preset)
    runs, t0 = [], time.perf_counter()
    for loss in losses:
        for seed in mode.seeds:
            result = train(named(loss), data, budget_from(mode.full, seed=seed))
            metrics = test_metrics(result.model, bench, seed) if result.status == "complete" else {}
            runs.append({"loss": loss, "seed": seed, "status": result.status, "val_reward": result.reward,
                         "epochs": mode.full.epochs, "preset": mode.preset,
                         **{k: metrics.get(k, float("nan")) for k in KEPT}})
            print(f"{loss:>15} seed {seed}: {result.status}, test {mode.metric} "
                  f"{runs[-1].get(mode.metric, float('nan')):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return runs


def best_named(runs: list[dict], metric: str) -> str:
    """The named loss with the highest mean test `metric` over its seeds."""
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    return max(losses, key=lambda loss: _finite_or(mean(r[metric] for r in runs if r["loss"] == loss)))


def _finite_or(value: float, default: float = float("-inf")) -> float:
    return value if value == value else default


def _bar_plot(runs: list[dict], metric: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(r["loss"] for r in runs))
    means = [mean(r[metric] for r in runs if r["loss"] == loss) for loss in losses]
    spreads = [std(r[metric] for r in runs if r["loss"] == loss) for loss in losses]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.bar(range(len(losses)), [100 * m for m in means], yerr=[100 * s for s in spreads], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(losses)), losses, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "named_baselines")
    p.add_argument("--losses", nargs="+", default=None, help="named losses (default: the eleven of the issue; "
                                                               "reduced: normface cosface arcface)")
    args = p.parse_args(argv)
    args.losses = args.losses or list(REDUCED_LOSSES if args.reduced else LOSSES)
    mode = mode_for(args)
    out = StudyOutput("Named baselines", Path(args.out), command_line("studies.named_baselines", argv), vars(args))
    runs = train_named(tuple(args.losses), mode)
    out.add(f"Test identities of `{mode.preset}`, full budget ({mode.full.epochs} epochs, {mode.full.backbone} "
            f"backbone), seeds {', '.join(map(str, mode.seeds))}",
            summarise(runs, "loss", METRICS, order=args.losses))
    best = best_named(runs, mode.metric)
    out.add("Best named baseline", f"{best} (highest mean test {mode.metric}).")
    out.figure("named_baselines", _bar_plot(runs, mode.metric, f"named losses on {mode.preset}: test {mode.metric}, "
                                                                 f"mean ± std over {len(mode.seeds)} seed(s)"))
    log_runs_to_mlflow(tracking_uri(args), "study-named-baselines", runs, lambda r: f"{r['loss']} seed {r['seed']}")
    out.write(runs, {"best": best, "metric": mode.metric, "preset": mode.preset, "full_epochs": mode.full.epochs,
                     "reduced": mode.reduced})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
