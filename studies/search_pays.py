"""Study 2, does the search pay: searches of one space at equal proxy compute, the best candidates promoted,
against the best named loss.

    python -m studies.search_pays                      # demo preset, margin space, search seeds 0 1 2
    python -m studies.search_pays --space unified      # the union of all components (16 trials are too few for it)
    python -m studies.search_pays --preset bench --trials 16 --proxy-epochs 2 --population 8
    python -m studies.search_pays --reduced            # tiny preset, 1 proxy epoch per trial, seed 0 (CI)

Methods, each given the same number of proxy epochs (trials × proxy epochs = rounds × population):
- `reward-guided`: the REINFORCE sampler in independent-trial mode (a campaign);
- `population`: the papers' algorithm (`run_population`, one epoch per candidate from the previous
  round's best model), then the last round's best spec retrained on the full budget;
- `tpe`: Optuna's TPE sampler (a campaign).
A campaign promotes its top `--promote` specs by proxy reward to the full budget (trained with a
selection seed, seed + 100) and picks the one with the best full-budget *validation* reward: the
test identities never choose. That spec is then retrained from scratch with the study seed, the
seed each named baseline was trained with, so the champion's test numbers carry no selection luck
and pair with the baselines seed by seed. Campaigns run without pruning and without named
baselines, so every method spends exactly the same proxy epochs; their runs (trials, promoted
models, registry) land in the MLflow experiment `study-search-pays`. The best named loss comes from
study 1's runs.json beside this folder when it was run with the same preset and epochs, else
`--baselines` are trained here on the same seeds. Last, the best named loss is retrained at the
champions' median scale s on the same seeds: how much of the gain is the scale alone.

Run time, measured on 2 cores: demo preset, margin space, 3 methods × 3 seeds, top 3 promoted, study
1's runs reused: 64 min. The bench preset has ~13× the compute per epoch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from studies.common import (  # noqa: E402
    StudyOutput,
    command_line,
    fmt,
    log_runs_to_mlflow,
    mean,
    mode_for,
    std,
    study_parser,
    summarise,
    table,
    test_metrics,
    tracking_uri,
)
from studies.named_baselines import METRICS, best_named, train_named  # noqa: E402

METHODS = ("reward-guided", "population", "tpe")
EXPERIMENT = "study-search-pays"
SELECTION_SEED = 100        # promoted candidates train with seed + 100: the study seed is kept for the final retraining


def _budget_assignments(name: str, budget: Any) -> dict[str, Any]:
    """`budget.<name>.<field>` overrides that make a campaign's budget equal to `budget`."""
    out = {}
    for key, value in dataclasses.asdict(budget).items():
        if key == "identities":
            value = value or 0
        if value is not None:
            out[f"budget.{name}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def retrain(spec: Any, seed: int, mode: Any) -> dict[str, Any]:
    """`spec` trained from scratch on the full budget with `seed`; its test metrics and full-budget validation
    reward."""
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.data.synthetic import load_synthetic
    from marginsearch.trainers.objective import data_for
    from marginsearch.trainers.train import train

    trained = train(spec, data_for(mode.source), budget_from(mode.full, seed=seed))
    metrics = test_metrics(trained.model, load_synthetic(mode.preset), seed) if trained.status == "complete" else {}
    return {"full_val_reward": trained.reward, **metrics}


def campaign_search(method: str, seed: int, mode: Any, args: Any, log: Any) -> dict[str, Any]:
    """One (sampler, seed) campaign: search on the proxy, promote the top specs, pick by full-budget validation,
    retrain; its record."""
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.campaign import run_campaign
    from marginsearch.trainers.config import load_config, override

    config = override(load_config(), {
        "campaign.name": f"search-pays-{method}-s{seed}" + ("" if args.space == "unified" else f"-{args.space}"),
        "campaign.seed": seed,
        "campaign.workdir": str(Path(args.out).resolve() / "work"), "data.train": mode.source,
        "search.space": args.space, "search.sampler": method, "search.pruner": "none", "search.trials": args.trials,
        "search.population": args.population, "search.baselines": [],
        **_budget_assignments("proxy", budget_from(mode.proxy, epochs=args.proxy_epochs, seed=seed)),
        **_budget_assignments("full", budget_from(mode.full, seed=seed + SELECTION_SEED)),
        "promote.top_k": args.promote, "promote.metric": mode.metric, "promote.baseline": False,
        "tracking.uri": tracking_uri(args), "tracking.experiment": EXPERIMENT})
    result = run_campaign(config, log=log)
    best = max(result.promoted, key=lambda p: _finite(p.metrics.get("full/val_reward")))
    log(f"{method} seed {seed}: {len(result.promoted)} promoted, picked {best.label} on full-budget validation "
        f"({best.metrics.get('full/val_reward', math.nan):.4f}); retraining it with seed {seed}")
    history = [(r.number, r.reward) for r in result.search.rows]
    return {"method": method, "seed": seed, "campaign": result.key, "spec": best.spec.to_dict(), "named": best.named,
            "proxy_reward": best.proxy_reward, "promoted_run_id": best.run_id,
            "promoted": [{"s": p.spec.s, "proxy_reward": p.proxy_reward,
                          "full_val_reward": p.metrics.get("full/val_reward"),
                          "selection_test": p.metrics.get(f"test/{mode.metric}")} for p in result.promoted],
            **retrain(best.spec, seed, mode),
            "history": [[(i + 1) * args.proxy_epochs, r] for i, (_, r) in enumerate(history)]}


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


def population_search(seed: int, mode: Any, args: Any, log: Any) -> dict[str, Any]:
    """Population mode with rounds × population = the campaigns' proxy epochs; the last round's best retrained on
    the full budget."""
    from marginsearch.losses import identify
    from marginsearch.searchspace.options import StudyOptions
    from marginsearch.searchspace.population import run_population
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.objective import PopulationObjective

    rounds = max(1, args.trials * args.proxy_epochs // args.population)
    objective = PopulationObjective(mode.source, budget_from(mode.proxy, epochs=rounds, seed=seed))
    result = run_population(args.space, objective, rounds, population=args.population, seed=seed,
                            study=StudyOptions(name=f"search-pays-population-s{seed}"
                                               + ("" if args.space == "unified" else f"-{args.space}")),
                            callbacks=[lambda row: log(f"  round {row.round} trial {row.number} {row.state} "
                                                       f"reward {row.reward}")])
    last = result.best_per_round[-1] or result.best
    spec = last.spec
    log(f"population: retraining the last round's best spec on the full budget ({mode.full.epochs} epochs)")
    history = [[i + 1, r.reward] for i, r in enumerate(result.rows)]
    return {"method": "population", "seed": seed, "campaign": f"population-s{seed}", "spec": spec.to_dict(),
            "named": identify(spec), "proxy_reward": last.reward, "promoted_run_id": "", **retrain(spec, seed, mode),
            "history": history, "rounds": rounds}


def scale_ablation(runs: list[dict], base_name: str, mode: Any, log: Any) -> tuple[list[dict], float]:
    """The best named loss retrained at the searched champions' median scale s, on the study's seeds: the scale's
    share of the gain."""
    import statistics

    from marginsearch.losses import named

    s = statistics.median(r["spec"]["s"] for r in runs)
    log(f"scale ablation: {base_name} at s = {s:.3g} (the champions' median), seeds {list(mode.seeds)}")
    out = [{"loss": f"{base_name} at s = {s:.3g}", "seed": seed, **retrain(named(base_name, s=s), seed, mode)}
           for seed in mode.seeds]
    return out, s


def baseline_runs(args: Any, mode: Any) -> tuple[list[dict], str]:
    """Study 1's runs if they match this mode (same preset, epochs, reducedness), else `--baselines` trained here."""
    path = Path(args.named_results) if args.named_results else Path(args.out).parent / "named_baselines" / "runs.json"
    if path.is_file():
        blob = json.loads(path.read_text())
        if (blob.get("preset"), blob.get("full_epochs"),
                blob.get("reduced")) == (mode.preset, mode.full.epochs, mode.reduced):
            return blob["runs"], f"study 1 ({path})"
        print(f"{path} was run with another preset or budget: training the baselines here", flush=True)
    return train_named(tuple(args.baselines), mode), "trained here"


def _history_figure(runs: list[dict], methods: list[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, run in enumerate(r for r in runs if r["method"] == method):
            points = [(x, y) for x, y in run["history"] if y is not None and math.isfinite(y)]
            if not points:
                continue
            xs, ys = zip(*points)
            best = [max(ys[:k + 1]) for k in range(len(ys))]
            ax.scatter(xs, ys, s=10, alpha=0.5, color=f"C{i}")
            ax.step(xs, best, where="post", color=f"C{i}", label=f"seed {run['seed']}")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("proxy epochs spent")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("proxy reward (dots) and best so far")
    return fig


def _logit_figure(champion: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marginsearch.losses import MarginSpec, named
    from marginsearch.losses.plot import plot_target_logits

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    label = f"champion ({champion['method']}, seed {champion['seed']})"
    plot_target_logits({label: MarginSpec.from_dict(champion["spec"]), "arcface": named("arcface"),
                        "cosface": named("cosface")}, ax=ax)
    return fig


def _champion_table(runs: list[dict], metric: str) -> str:
    """One row per search: the champion's parameters, proxy and full-budget validation rewards, test metric (%)."""
    rows = [[r["method"], r["seed"], _spec_text(r["spec"]), fmt(r.get("proxy_reward", math.nan)),
             fmt(r.get("full_val_reward", math.nan)), fmt(r.get(metric, math.nan))] for r in runs]
    return table(["method", "seed", "champion", "proxy reward", "full-budget val", f"test {metric}"], rows)


def _spec_text(spec: dict) -> str:
    """The numeric fields of a spec, short: 's=17.5, target.m1=0.944, ...' (flags and kinds left out)."""
    from marginsearch.losses import MarginSpec

    flat = MarginSpec.from_dict(spec).flat()
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items()
                     if k != "learnable_scale" and not k.endswith((".kind", ".guard", ".straight_through", ".momentum"))
                     and not isinstance(v, (bool, list)))


def verdict(runs: list[dict], base: list[dict], base_name: str, methods: list[str], metric: str) -> str:
    """Per method: the champion's mean gap to the best named loss on `metric`, and whether it exceeds the seed
    spread."""
    b = [r[metric] for r in base if r["loss"] == base_name]
    lines = []
    for method in methods:
        c = [r.get(metric, math.nan) for r in runs if r["method"] == method]
        gap, spread = mean(c) - mean(b), max(std(c), std(b))
        beats = "beats it by more than the seed spread" if gap > spread else \
            "does NOT beat it by more than the seed spread"
        lines.append(f"- {method}: {fmt(mean(c))} vs {base_name} {fmt(mean(b))}: gap {fmt(gap)} points, seed spread "
                     f"{fmt(spread)} → {beats}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "search_pays")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--space", default="margin",
                   help="built-in search space (default margin; e.g. unified, search-softmax)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per independent-mode search (default 16; reduced 2)")
    p.add_argument("--proxy-epochs", type=int, default=None, help="epochs per proxy trial (default 2; reduced 1)")
    p.add_argument("--population", type=int, default=None, help="candidates per policy round (default 8; reduced 2)")
    p.add_argument("--promote", type=int, default=None,
                   help="top specs per campaign trained on the full budget, the best "
                        "on validation kept (default 3; reduced 2)")
    p.add_argument("--no-scale-ablation", dest="scale_ablation", action="store_false",
                   help="skip retraining the best named loss at the champions' median scale")
    p.add_argument("--baselines", nargs="+", default=["arcface", "cosface"],
                   help="named losses to train when study 1's results are absent")
    p.add_argument("--named-results", default="", help="study 1's runs.json (default ../named_baselines/runs.json)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Some regimes for parameter")  # Optuna's importance on few trials
    mode = mode_for(args)
    args.trials = args.trials or (2 if mode.reduced else 16)
    args.proxy_epochs = args.proxy_epochs or mode.proxy.epochs
    args.population = args.population or (2 if mode.reduced else 8)
    args.promote = args.promote or (2 if mode.reduced else 3)
    out = StudyOutput("Does the search pay?", Path(args.out), command_line("studies.search_pays", argv), vars(args))
    log = lambda line: print(line, flush=True)  # noqa: E731
    runs: list[dict] = []
    t0 = time.perf_counter()
    for seed in mode.seeds:
        for method in args.methods:
            log(f"== {method}, search seed {seed} ({time.perf_counter() - t0:.0f} s)")
            runs.append(population_search(seed, mode, args, log) if method == "population"
                        else campaign_search(method, seed, mode, args, log))
    base, where = baseline_runs(args, mode)
    base_name = best_named(base, mode.metric)
    rows = [{**r, "row": f"{r['method']} (searched)"} for r in runs]
    rows += [{**r, "row": f"{base_name} (best named)"} for r in base if r["loss"] == base_name]
    order = [f"{m} (searched)" for m in args.methods] + [f"{base_name} (best named)"]
    ablation: list[dict] = []
    if args.scale_ablation:
        ablation, s = scale_ablation(runs, base_name, mode, log)
        rows += [{**r, "row": r["loss"]} for r in ablation]
        order.append(ablation[0]["loss"])
    total = args.trials * args.proxy_epochs
    out.add(f"Champion of each search of the `{args.space}` space on the test identities of `{mode.preset}` "
            f"(mean ± std over search seeds {', '.join(map(str, mode.seeds))}; {total} proxy epochs per search, "
            f"full budget {mode.full.epochs} epochs)",
            summarise(rows, "row", {"proxy reward": "proxy_reward", "full-budget val": "full_val_reward", **METRICS},
                      order=order))
    out.add(f"Against the best named loss ({base_name}, from {where}) on test {mode.metric}",
            verdict(runs, base, base_name, args.methods, mode.metric))
    if ablation:
        out.add(f"Is it the scale? {base_name} retrained at the champions' median s = {s:.3g}",
                verdict([{**r, "method": r["loss"]} for r in ablation], base, base_name, [ablation[0]["loss"]],
                        mode.metric)
                + "\n" + verdict(runs, ablation, ablation[0]["loss"], args.methods, mode.metric))
    out.add("Champions per search (chosen by full-budget validation reward, retrained with the study seed)",
            _champion_table(runs, mode.metric))
    champion = max(runs, key=lambda r: _finite(r.get("full_val_reward")))
    out.add("Champion spec (best full-budget validation reward of all searches)",
            f"{champion['method']}, seed {champion['seed']}: named loss "
            f"{champion['named'] or 'none'}; spec `{json.dumps(champion['spec'])}`")
    out.figure("search_history", _history_figure(runs, args.methods))
    out.figure("champion_target_logit", _logit_figure(champion))
    log_runs_to_mlflow(tracking_uri(args), EXPERIMENT + "-summary",
                       [{k: v for k, v in r.items() if k not in ("history", "spec")} for r in runs],
                       lambda r: f"{r['method']} seed {r['seed']}")
    out.write(runs, {"baseline": base_name, "baseline_source": where, "baseline_runs": base, "metric": mode.metric,
                     "champion": champion, "proxy_epochs_per_search": total, "scale_ablation": ablation})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
