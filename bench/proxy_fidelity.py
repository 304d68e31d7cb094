"""Proxy fidelity: train specs of the margin space with the proxy budget and with 4× its epochs; do the rankings agree?

    python bench/proxy_fidelity.py                          # demo preset, 8 specs (long: ~1 h on 2 cores)
    python bench/proxy_fidelity.py --preset tiny --specs 3  # smoke run (seconds)

Specs are the margin space's named losses followed by random draws (seeded). Prints a markdown
table (proxy and full reward per spec) and Spearman ρ / Kendall τ between the two columns.
"""
from __future__ import annotations

import argparse
import sys
import time

import optuna  # noqa: E402

from marginsearch.losses import MarginSpec, identify  # noqa: E402
from marginsearch.searchspace import TrialFailed, load  # noqa: E402
from marginsearch.searchspace.fidelity import rank_agreement  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.objective import TrainingObjective  # noqa: E402

TINY = {"batch_size": 32, "embedding_size": 32, "eval_pairs": 200, "reward_metric": "accuracy"}  # tiny has too few pairs for TAR


def specs_of(space_name: str, count: int, seed: int) -> list[MarginSpec]:
    """The space's named losses, then random draws, `count` in all."""
    space = load(space_name)
    specs = [space.to_spec(p) for p in space.baselines().values()][:count]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while len(specs) < count:
        specs.append(space.to_spec(space.suggest(study.ask())))
    return specs


def score(objective: TrainingObjective, spec: MarginSpec) -> float:
    """The final reward, NaN for a failed run."""
    try:
        return objective(spec, lambda epoch, reward: None)
    except TrialFailed:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="synthetic preset (tiny, demo, bench)")
    p.add_argument("--space", default="margin")
    p.add_argument("--specs", type=int, default=8, help="how many specs (≥ 8 for a meaningful correlation)")
    p.add_argument("--factor", type=int, default=4, help="full budget = factor × proxy epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    overrides = TINY if args.preset == "tiny" else {}
    proxy = budget_from("proxy", **overrides, **({"epochs": 1} if args.preset == "tiny" else {}))
    full = budget_from(proxy, epochs=proxy.epochs * args.factor)
    source = f"synthetic:{args.preset}"
    rows = []
    for i, spec in enumerate(specs_of(args.space, args.specs, args.seed)):
        t0 = time.perf_counter()
        r_proxy = score(TrainingObjective(source, proxy), spec)
        r_full = score(TrainingObjective(source, full), spec)
        rows.append((i, identify(spec) or "", r_proxy, r_full, time.perf_counter() - t0, spec))
        print(f"spec {i}: proxy {r_proxy:.4f} full {r_full:.4f} ({rows[-1][4]:.0f} s)", file=sys.stderr)
    print(f"## Proxy fidelity: {source}, space {args.space}, proxy {proxy.epochs} epochs vs full {full.epochs} "
          f"epochs, reward {proxy.reward_metric}\n")
    print("| spec | named | proxy | full | seconds | params |\n|---|---|---|---|---|---|")
    for i, name, r_proxy, r_full, seconds, spec in rows:
        flat = {k: v for k, v in spec.flat().items() if k in ("s", "target.m1", "target.m2_rad", "target.m3_cos")}
        params = ", ".join(f"{k}={v:.3g}" for k, v in flat.items())
        print(f"| {i} | {name} | {r_proxy:.4f} | {r_full:.4f} | {seconds:.0f} | {params} |")
    agreement = rank_agreement([r[2] for r in rows], [r[3] for r in rows])
    print(f"\nSpearman ρ = {agreement['spearman']:.3f}, Kendall τ = {agreement['kendall']:.3f} over n = {agreement['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
