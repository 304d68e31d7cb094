"""Study 3, proxy fidelity: does the proxy reward rank specs of the `unified` space as the full budget's TEST
metric does, and which proxy is enough?

    python -m studies.proxy_fidelity                    # demo preset, 12 specs, seeds 0 1, proxies 1 2 4
                                                        # (epochs, all identities)
    python -m studies.proxy_fidelity --proxies 1x250 2x250 2  # proxies on the first 250 identities too
    python -m studies.proxy_fidelity --reduced          # tiny preset, 3 specs, proxies of 1 and 2 epochs (CI)

Specs: the named losses of study 1 that the space holds (at most two thirds), then draws of `space.suggest` on a seeded
RandomSampler study, `--specs` in all. A proxy `ExI` trains E epochs on the first I training
identities (I = 0 or absent: all) and scores the validation identities (the search's reward); the
target is the full-budget test metric. Per proxy: Spearman ρ and Kendall τ over the specs (rewards
and targets averaged over seeds), and the reward's seed noise next to the spread between specs
(mean over specs of the std across seeds ÷ std across specs: small is good). The full budget's own
validation reward is the reference row. "Enough" is the cheapest proxy with ρ ≥ --enough.

Run time, measured on 2 cores: demo preset ≈ 72 s per spec and seed (7 proxy epochs and one
12-epoch training), 12 specs × 2 seeds ≈ 30 min alone (37 min partly beside another job). The
bench preset ≈ 13× that per epoch: about 6–7 h (an estimate).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from studies.common import (  # noqa: E402
    StudyOutput,
    command_line,
    fmt,
    log_runs_to_mlflow,
    mean,
    mean_std,
    mode_for,
    std,
    study_parser,
    table,
    test_metrics,
    tracking_uri,
)
from studies.named_baselines import LOSSES  # noqa: E402

SPACE = "unified"


def parse_proxy(text: str) -> tuple[int, int]:
    """'2' → (2 epochs, all identities); '2x500' → (2, 500)."""
    epochs, _, ids = text.partition("x")
    try:
        parsed = int(epochs), int(ids or 0)
    except ValueError:
        raise ValueError(f"--proxies: {text!r} is not EPOCHS or EPOCHSxIDENTITIES (e.g. 2 or 2x500)") from None
    if parsed[0] < 1 or parsed[1] < 0:
        raise ValueError(f"--proxies: {text!r} needs ≥ 1 epoch and ≥ 0 identities")
    return parsed


def specs_for(count: int, seed: int) -> list[tuple[dict[str, Any], Any]]:
    """(params, spec): named losses of study 1 that the space holds (two thirds at most), then random draws;
    `count` in all."""
    import optuna

    from marginsearch.searchspace import load

    space = load(SPACE)
    held = space.baselines()
    chosen = [held[name] for name in LOSSES if name in held][:count - count // 3]  # a third at least: random draws
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while len(chosen) < count:
        chosen.append(space.suggest(study.ask()))
    return [(params, space.to_spec(params)) for params in chosen]


def _proxy_label(epochs: int, identities: int) -> str:
    return f"{epochs} ep × {'all' if not identities else identities} ids"


def _noise_ratio(runs: list[dict], key: str) -> float:
    """Mean over specs of the std across seeds of `key`, over the std across specs of its seed mean."""
    specs = sorted({r["spec_index"] for r in runs})
    within = [std(r[key] for r in runs if r["spec_index"] == i) for i in specs]
    between = std(mean(r[key] for r in runs if r["spec_index"] == i) for i in specs)
    if not between or not math.isfinite(between) or len({r["seed"] for r in runs}) < 2:
        return math.nan
    return mean(within) / between


def _scatter(per_spec: list[dict], proxies: list[str], metric: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(proxies), figsize=(3.4 * len(proxies), 3.2), squeeze=False)
    for ax, label in zip(axes[0], proxies):
        ax.scatter([s[label] for s in per_spec], [s["target"] for s in per_spec], s=14)
        for s in per_spec:
            if s["named"]:
                ax.annotate(s["named"], (s[label], s["target"]), fontsize=6)
        ax.set_xlabel(f"proxy reward ({label})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"full-budget test {metric}")
    return fig


def main(argv: list[str] | None = None) -> int:
    from marginsearch.losses import identify
    from marginsearch.searchspace.fidelity import rank_agreement
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.data.synthetic import load_synthetic
    from marginsearch.trainers.train import TrainData, train

    p = study_parser(__doc__, "proxy_fidelity")
    p.add_argument("--specs", type=int, default=None, help="specs (default 12, ≥ 12 for a meaningful ρ; reduced 3)")
    p.add_argument("--proxies", nargs="+", default=None, help="proxy budgets EPOCHS[xIDENTITIES] (default 1 2 4, all "
                                                             "identities; reduced 1 2)")
    p.add_argument("--enough", type=float, default=0.7, help="Spearman ρ a proxy must reach to be enough")
    p.add_argument("--space-seed", type=int, default=0, help="seed of the random draws of specs")
    args = p.parse_args(argv)
    if args.seeds is None and not args.reduced:
        args.seeds = [0, 1]
    mode = mode_for(args)
    count = args.specs or (3 if mode.reduced else 12)
    proxies = [parse_proxy(t) for t in (args.proxies or (["1", "2"] if mode.reduced else ["1", "2", "4"]))]
    labels = [_proxy_label(*pr) for pr in proxies]
    out = StudyOutput("Proxy fidelity", Path(args.out), command_line("studies.proxy_fidelity", argv), vars(args))
    bench = load_synthetic(mode.preset)
    data = TrainData.from_benchmark(bench, mode.preset)
    specs = specs_for(count, args.space_seed)
    runs, t0 = [], time.perf_counter()
    for i, (params, spec) in enumerate(specs):
        for seed in mode.seeds:
            full = train(spec, data, budget_from(mode.full, seed=seed))
            target = test_metrics(full.model, bench, seed).get(mode.metric, math.nan) if full.status == "complete" \
                else math.nan
            run = {"spec_index": i, "seed": seed, "named": identify(spec) or "",
                   "component": params.get("component", ""),
                   "params": params, "spec": spec.to_dict(), "target": target, "full (val)": full.reward}
            for (epochs, ids), label in zip(proxies, labels):
                proxy = train(spec, data, budget_from(mode.proxy, epochs=epochs, identities=ids or None, seed=seed))
                run[label] = proxy.reward if proxy.status == "complete" else math.nan
            runs.append(run)
            print(f"spec {i} ({run['named'] or run['component']}) seed {seed}: test {mode.metric} {fmt(target)}, "
                  + ", ".join(f"{lb} {fmt(run[lb])}" for lb in labels) + f" ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    per_spec = [{"index": i, "named": runs[i * len(mode.seeds)]["named"],
                 "component": runs[i * len(mode.seeds)]["component"],
                 **{k: mean(r[k] for r in runs if r["spec_index"] == i) for k in ["target", "full (val)", *labels]},
                 "target_spread": mean_std(r["target"] for r in runs if r["spec_index"] == i)}
                for i in range(len(specs))]
    full_cost = mode.full.epochs * 1.0
    classes = data.num_classes
    rows, enough = [], None
    for (epochs, ids), label in sorted(zip(proxies, labels), key=lambda x: x[0][0] * min(x[0][1] or classes, classes)):
        agreement = rank_agreement([s[label] for s in per_spec], [s["target"] for s in per_spec])
        cost = epochs * min(ids or classes, classes) / classes / full_cost
        rows.append([label, f"{cost:.2f}", fmt(agreement["spearman"], False), fmt(agreement["kendall"], False),
                     agreement["n"], fmt(_noise_ratio(runs, label), False)])
        if enough is None and math.isfinite(agreement["spearman"]) and agreement["spearman"] >= args.enough:
            enough = label
    reference = rank_agreement([s["full (val)"] for s in per_spec], [s["target"] for s in per_spec])
    rows.append(["full budget, val reward (reference)", "1.00", fmt(reference["spearman"], False),
                 fmt(reference["kendall"], False), reference["n"], fmt(_noise_ratio(runs, "full (val)"), False)])
    out.add(f"Rank agreement with the full-budget test {mode.metric} over {len(specs)} specs of `{SPACE}` on "
            f"`{mode.preset}` (seeds {', '.join(map(str, mode.seeds))})",
            table(["proxy", "cost (× full)", "Spearman ρ", "Kendall τ", "n", "seed noise / spec spread"], rows))
    out.add("What proxy budget is enough", f"{enough}: the cheapest proxy with Spearman ρ ≥ {args.enough}." if enough
            else f"No proxy reaches Spearman ρ ≥ {args.enough} on this benchmark.")
    out.add("Per spec (rewards averaged over seeds; the target with its seed spread)",
            table(["spec", "named", "component", *labels, f"full test {mode.metric}"],
                  [[s["index"], s["named"] or "—", s["component"], *(fmt(s[lb]) for lb in labels), s["target_spread"]]
                   for s in per_spec]))
    out.figure("proxy_vs_full", _scatter(per_spec, labels, mode.metric))
    log_runs_to_mlflow(tracking_uri(args), "study-proxy-fidelity",
                       [{k: (str(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in runs],
                       lambda r: f"spec {r['spec_index']} seed {r['seed']}")
    out.write(runs, {"per_spec": per_spec, "enough": enough, "metric": mode.metric, "proxies": labels})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
