"""Population-mode search (AM-LFS / Search-Softmax rounds): learning curve and policy mean per round, as a plot.

    python -m studies.population_demo out/population.png                     # demo preset, margin space, 8 rounds × 8
    python -m studies.population_demo out/pop.png --preset tiny --rounds 2 --population 2   # smoke run

Each round trains `population` candidates for one epoch from the previous round's best model.
Prints the result table and writes a two-panel figure: rewards per round (all candidates and the
best) and the sampler's mean μ per parameter (normalised to [0, 1] of its range) per round.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from marginsearch.searchspace import PopulationResult, run_population  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.objective import PopulationObjective  # noqa: E402

TINY = {"batch_size": 32, "embedding_size": 32, "eval_pairs": 200, "reward_metric": "accuracy"}


def plot(result: PopulationResult, path: Path, title: str) -> None:
    """Rewards per round (left) and policy mean per parameter in normalised units (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, rewards in enumerate(result.rewards_per_round):
        done = [r for r in rewards if r is not None]
        left.scatter([k] * len(done), done, s=12, color="tab:gray", alpha=0.6)
    best = [(k, row.reward) for k, row in enumerate(result.best_per_round) if row is not None]
    left.plot([k for k, _ in best], [r for _, r in best], "o-", color="tab:red", label="best of round")
    left.set(xlabel="round", ylabel="reward", title="rewards")
    left.legend()
    names = sorted(result.trajectory[-1]["mu_unit"])
    for name in names:
        right.plot(range(len(result.trajectory)), [t["mu_unit"].get(name) for t in result.trajectory], label=name)
    right.set(xlabel="rounds done", ylabel="μ (0..1 of range)", ylim=(0, 1), title="policy mean")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where to write the figure (.png)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--space", default="margin")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="optuna", choices=("optuna", "ray"),
                   help="candidates in this process or as Ray Tune trials")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    budget = budget_from("proxy", epochs=args.rounds, seed=args.seed, **(TINY if args.preset == "tiny" else {}))
    objective = PopulationObjective(f"synthetic:{args.preset}", budget)
    result = run_population(args.space, objective, rounds=args.rounds, population=args.population, seed=args.seed,
                            backend=args.backend,
                            callbacks=[lambda row: print(f"round {row.round} trial {row.number}: {row.reward}",
                                                         file=sys.stderr)])
    result.print()
    plot(result, args.out, f"population search on synthetic:{args.preset}, space {args.space}")
    summary = args.out.with_suffix(".md")
    summary.write_text(markdown(result, args, time.perf_counter() - t0, argv))
    print(f"\nwrote {args.out} and {summary}")
    return 0


def markdown(result: PopulationResult, args: argparse.Namespace, seconds: float, argv: list[str] | None) -> str:
    """Best and mean reward per round, and the policy mean μ (native units) after the last round."""
    cmd = "python -m studies.population_demo " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Population mode on `synthetic:{args.preset}`, space `{args.space}`: {args.rounds} rounds × "
             f"{args.population} candidates, one epoch each from the previous round's best model "
             f"({seconds / 60:.1f} min; `{cmd.strip()}`).", "",
             "| round | best reward | mean reward | failed |", "|---|---|---|---|"]
    for k, rewards in enumerate(result.rewards_per_round):
        done = [r for r in rewards if r is not None]
        best = max(done) if done else float("nan")
        mean = sum(done) / len(done) if done else float("nan")
        lines.append(f"| {k} | {best:.4f} | {mean:.4f} | {len(rewards) - len(done)} |")
    mu = result.trajectory[-1]["mu"] if result.trajectory else {}
    lines += ["", "Policy mean after the last round: " + ", ".join(f"{k} = {v:.3g}" for k, v in sorted(mu.items()))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
