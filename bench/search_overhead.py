"""Per-trial overhead of the search and tracking machinery, against the time of a proxy epoch and of a cheap trial.

A no-op objective (spec → 3 reports → constant reward) runs N trials through
`searchspace.run_search` (Optuna backend) with (i) in-memory storage, (ii) SQLite storage (write-ahead
log), (iii) an Optuna journal file (`journal:<path>`), and (iv, v) SQLite or the journal file plus one
MLflow trial run per trial (MLflow on SQLite), opened, logged and labelled as a campaign's
trials are (`campaign.open_trial_run`: `CampaignTracker.trial_run` with its params, spec.json and
target-logit PNG; `log_epoch` × 3; `finish`; the driver's `campaign.label_trial_run` callback),
for the reward-guided sampler and TPE (epoch metrics are queued and written at `finish`, as
a trial of cheap epochs does). Storage, tracking database and parent run are created,
and matplotlib imported, before the clock starts; each cell is one new study, so its time
includes opening the study once. Every cell is timed `--runs` times (runs alternate), and the
percentages use the median. The references are `trainers.train.train` of arcface on
synthetic:demo, judging included: one proxy epoch (`budget_from("proxy", epochs=1,
identities=300)`; a proxy trial of E epochs takes about E times that) and a cheap trial
(`budget_from("proxy", epochs=1, identities=100)`), against which the machinery should cost at
most 3 %. `--profile` prints the top functions of a profiled SQLite + MLflow cell instead.

    .venv/bin/python bench/search_overhead.py --trials 20     # ~1-2 min on 2 cores
    .venv/bin/python bench/search_overhead.py --profile 30    # where the time of a tracked trial goes
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna  # noqa: E402
import torch  # noqa: E402

from marginsearch.losses import MarginSpec, named  # noqa: E402
from marginsearch.searchspace.results import TrialRow  # noqa: E402
from marginsearch.searchspace.search import StudyOptions, make_storage, run_search  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.campaign import label_trial_run, open_trial_run  # noqa: E402
from marginsearch.trainers.objective import data_for  # noqa: E402
from marginsearch.trainers.tracking import CampaignTracker, target_logit_png  # noqa: E402
from marginsearch.trainers.train import train  # noqa: E402

try:  # run as a script (python bench/NAME.py) or a module (python -m bench.NAME)
    from .common import markdown_table
except ImportError:
    from common import markdown_table  # type: ignore[no-redef]

REPORTS = 3
REWARD = 0.5
SAMPLERS = ("reward-guided", "tpe")
TARGET_PERCENT = 3.0  # the machinery's share of a cheap trial it should stay under
TRACKED = "SQLite + MLflow trial runs"
JOURNAL_TRACKED = "journal file + MLflow trial runs"


def noop_objective(spec: MarginSpec, report: Callable[[int, float], None]) -> float:
    """Three reports of a constant reward, then the reward: the machinery with no training."""
    for epoch in range(1, REPORTS + 1):
        report(epoch, REWARD)
    return REWARD


class TrackedNoop:
    """The no-op objective with a trial run per trial, opened, logged and labelled as a campaign's trials are."""

    def __init__(self, tracker: CampaignTracker, parent_run_id: str, campaign_key: str) -> None:
        self.tracker, self.parent_run_id, self.campaign_key = tracker, parent_run_id, campaign_key

    def label(self, row: TrialRow) -> None:
        """The campaign's row callback: name and tag the trial's run from the driver."""
        label_trial_run(self.tracker, self.parent_run_id, self.campaign_key, row)

    def __call__(self, spec: MarginSpec, report: Callable[[int, float], None]) -> float:
        with open_trial_run(self.tracker, self.parent_run_id, self.campaign_key, spec, {"data": "none"}) as trial:
            for epoch in range(1, REPORTS + 1):
                trial.log_epoch(epoch, {"reward": REWARD, "train_loss": 1.0, "images_per_second": 1.0})
                report(epoch, REWARD)
            trial.finish("complete")  # the reward is the last epoch's, already logged
        return REWARD


def time_search(objective: Callable[..., float], sampler: str, trials: int, storage: str | None,
                space: str) -> float:
    """Milliseconds per trial of one `run_search` call of `trials` trials (with the objective's `label` callback)."""
    name, callbacks = f"overhead-{sampler}-{time.monotonic_ns()}", []
    if isinstance(objective, TrackedNoop):
        objective.campaign_key, callbacks = name, [objective.label]  # a campaign's key is its study's name
    start = time.perf_counter()
    result = run_search(space, objective, sampler=sampler, n_trials=trials, seed=0, callbacks=callbacks,
                        study=StudyOptions(storage, name))
    elapsed = time.perf_counter() - start
    if len(result.rows) != trials:
        raise RuntimeError(f"expected {trials} trials, got {len(result.rows)}")
    return 1000.0 * elapsed / trials


def modes(workdir: Path, sampler: str) -> dict[str, tuple[Callable[..., float], str | None]]:
    """(objective, storage) per column; the databases (with their tables) and parent run exist before timing."""
    workdir.mkdir(parents=True, exist_ok=True)
    plain, tracked = (f"sqlite:///{workdir / f'optuna-{kind}{sampler}.db'}" for kind in ("", "tracked-"))
    for url in (plain, tracked):
        make_storage(url, heartbeat=False)
    journal, journal_tracked = (f"journal:{workdir / f'optuna-{kind}{sampler}.log'}" for kind in ("", "tracked-"))
    tracker = CampaignTracker(f"sqlite:///{workdir / 'mlflow.db'}", f"overhead-{sampler}")
    parent = tracker.start_search(f"overhead {sampler}", {}, {}, {})
    return {
        "in-memory": (noop_objective, None),
        "SQLite": (noop_objective, plain),
        "journal file": (noop_objective, journal),
        TRACKED: (TrackedNoop(tracker, parent, f"overhead-{sampler}"), tracked),
        JOURNAL_TRACKED: (TrackedNoop(tracker, parent, f"overhead-{sampler}"), journal_tracked),
    }


def training_seconds(source: str, identities: int) -> tuple[float, Any]:
    """Wall seconds of one epoch of arcface on the proxy budget with `identities` identities (judging included),
    and the budget."""
    data = data_for(source)
    budget = budget_from("proxy", epochs=1, identities=identities)
    start = time.perf_counter()
    result = train(named("arcface"), data, budget)
    if result.status != "complete":
        raise RuntimeError(f"proxy training ended {result.status}: {result.reason}")
    return time.perf_counter() - start, budget


def profile(trials: int, space: str, top: int) -> str:
    """The `top` functions by cumulative time of one profiled SQLite + MLflow cell (reward-guided), as text."""
    target_logit_png(named("arcface"), "warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        time_search(noop_objective, "reward-guided", 3, None, space)
        objective, storage = modes(Path(tmp), "reward-guided")[TRACKED]
        profiler = cProfile.Profile()
        ms = profiler.runcall(time_search, objective, "reward-guided", trials, storage, space)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(r"marginsearch|wt-|/optuna/|/mlflow/|matplotlib/figure|PIL/Image", top)
    return f"{ms:.1f} ms per trial under the profiler ({trials} trials)\n{out.getvalue()}"


def main(argv: list[str] | None = None) -> int:
    """Time the machinery, print the table and write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--space", default="margin")
    parser.add_argument("--source", default="synthetic:demo")
    parser.add_argument("--runs", type=int, default=3, help="timings of every cell and reference (median used)")
    parser.add_argument("--cheap-identities", type=int, default=100, help="identities of the cheap reference trial")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="print the TOP functions of a profiled SQLite + MLflow cell; time nothing else")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_overhead.md"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.profile:
        print(profile(args.trials, args.space, args.profile))
        return 0
    load_before = os.getloadavg()
    references: dict[str, list[float]] = {"epoch": [], "cheap": []}
    budgets: dict[str, Any] = {}
    training_seconds(args.source, args.cheap_identities)  # warm-up: the first training in a process is slower
    for _ in range(args.runs):
        for name, identities in (("epoch", 300), ("cheap", args.cheap_identities)):
            seconds, budgets[name] = training_seconds(args.source, identities)
            references[name].append(seconds)
    epoch_s, cheap_s = (statistics.median(references[name]) for name in ("epoch", "cheap"))
    target_logit_png(named("arcface"), "warm-up")  # the first figure imports matplotlib: not a per-trial cost
    timings: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for sampler in SAMPLERS:
                time_search(noop_objective, sampler, 3, None, args.space)  # warm-up: imports, first study
                for column, (objective, storage) in modes(Path(tmp) / f"run{run}", sampler).items():
                    ms = time_search(objective, sampler, args.trials, storage, args.space)
                    timings.setdefault((sampler, column), []).append(ms)
    load_after = os.getloadavg()
    rows = [(sampler, column, runs, statistics.median(runs)) for (sampler, column), runs in timings.items()]
    machine = (f"torch {torch.__version__}, optuna {optuna.__version__}, {os.cpu_count()} CPUs, "
               f"{platform.processor() or platform.machine()}")
    command = f".venv/bin/python bench/search_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    epoch_b, cheap_b = budgets["epoch"], budgets["cheap"]
    tracked = {f"{sampler}, {column}": 100.0 * ms / 1000.0 / cheap_s for sampler, column, _, ms in rows
               if column in (TRACKED, JOURNAL_TRACKED)}
    verdict = "met" if max(tracked.values()) <= TARGET_PERCENT else "not met"
    lines = ["# Search and tracking overhead per trial", "", f"Command: `{command.rstrip()}`", "",
             f"Machine: {machine}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
             f"Space {args.space}, {args.trials} trials per cell, no-op objective with {REPORTS} reports. "
             f"References (arcface on {args.source}, backbone {epoch_b.backbone}, batch {epoch_b.batch_size}, "
             f"judging included; after one warm-up training, median of {args.runs}): one proxy epoch "
             f"({epoch_b.identities} identities) took {epoch_s:.2f} s "
             f"({', '.join(f'{s:.2f}' for s in references['epoch'])}); a cheap trial (1 epoch, "
             f"{cheap_b.identities} identities) took {cheap_s:.2f} s "
             f"({', '.join(f'{s:.2f}' for s in references['cheap'])}). Each cell ran {args.runs} times (listed; "
             "percentages of the median). Cells vary between runs and between invocations (SQLite and MLflow "
             "write to disk, other processes share the CPUs): read the orders of magnitude.", "",
             markdown_table(["sampler", "storage / tracking", "ms per trial (each run)", "ms per trial (median)",
                             "% of one proxy epoch", "% of a cheap trial"],
                            [[sampler, column, ", ".join(f"{m:.1f}" for m in runs), f"{ms:.1f}",
                              f"{100.0 * ms / 1000.0 / epoch_s:.2f}", f"{100.0 * ms / 1000.0 / cheap_s:.2f}"]
                             for sampler, column, runs, ms in rows], align="llrrrr"), "",
             f"Target ≤ {TARGET_PERCENT:.0f} % of a cheap trial for the whole machinery (MLflow trial runs on "
             "either storage): " + ", ".join(f"{cell} {percent:.2f} %" for cell, percent in tracked.items())
             + f": {verdict} for the worst cell (it is {TARGET_PERCENT:.0f} % of a trial of "
             f"{max(tracked.values()) * cheap_s / TARGET_PERCENT:.1f} s); best cell "
             f"{min(tracked.values()):.2f} %."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
