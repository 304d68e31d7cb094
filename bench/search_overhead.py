"""Per-trial overhead of the search and tracking machinery, against the time of a proxy trial.

A no-op objective (spec → 3 reports → constant reward) runs N trials through
`searchspace.run_search` (Optuna backend) with (i) in-memory storage, (ii) SQLite storage and
(iii) SQLite plus one MLflow trial run per trial, logged as `trainers.campaign.TrackedObjective`
does (`CampaignTracker.trial_run` with its spec.json and target-logit PNG, `log_epoch` × 3,
`finish`), for the reward-guided sampler and TPE. Storage, tracking database and parent run are
created, and matplotlib imported, before the clock starts; each cell is one new study, so its
time includes opening the study once. The reference is one `trainers.train.train` of arcface
with `budget_from("proxy", epochs=1, identities=300)` on synthetic:demo: the wall time of one
proxy epoch, judging included (a proxy trial of E epochs takes about E times that).

    .venv/bin/python bench/search_overhead.py --trials 20     # ~1-2 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna  # noqa: E402
import torch  # noqa: E402

from marginsearch.losses import MarginSpec, named  # noqa: E402
from marginsearch.searchspace.search import StudyOptions, make_storage, run_search  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.campaign import spec_key  # noqa: E402
from marginsearch.trainers.objective import data_for  # noqa: E402
from marginsearch.trainers.tracking import TAG, CampaignTracker, target_logit_png  # noqa: E402
from marginsearch.trainers.train import train  # noqa: E402

try:  # run as a script (python bench/NAME.py) or a module (python -m bench.NAME)
    from .common import markdown_table
except ImportError:
    from common import markdown_table  # type: ignore[no-redef]

REPORTS = 3
REWARD = 0.5
SAMPLERS = ("reward-guided", "tpe")


def noop_objective(spec: MarginSpec, report: Callable[[int, float], None]) -> float:
    """Three reports of a constant reward, then the reward: the machinery with no training."""
    for epoch in range(1, REPORTS + 1):
        report(epoch, REWARD)
    return REWARD


class TrackedNoop:
    """The no-op objective with a trial run per trial, logged as `TrackedObjective` logs it."""

    def __init__(self, tracker: CampaignTracker, parent_run_id: str, campaign_key: str) -> None:
        self.tracker, self.parent_run_id, self.campaign_key = tracker, parent_run_id, campaign_key

    def __call__(self, spec: MarginSpec, report: Callable[[int, float], None]) -> float:
        key = f"{self.campaign_key}/{spec_key(spec)}"
        with self.tracker.trial_run(self.parent_run_id, key, spec, {"data": "none"},
                                    {f"{TAG}campaign_key": self.campaign_key}) as trial:
            for epoch in range(1, REPORTS + 1):
                trial.log_epoch(epoch, {"reward": REWARD, "train_loss": 1.0, "images_per_second": 1.0})
                report(epoch, REWARD)
            trial.finish("complete", reward=REWARD)
        return REWARD


def time_search(objective: Callable[..., float], sampler: str, trials: int, storage: str | None,
                space: str) -> float:
    """Milliseconds per trial of one `run_search` call of `trials` trials."""
    start = time.perf_counter()
    result = run_search(space, objective, sampler=sampler, n_trials=trials, seed=0,
                        study=StudyOptions(storage, f"overhead-{sampler}-{time.monotonic_ns()}"))
    elapsed = time.perf_counter() - start
    if len(result.rows) != trials:
        raise RuntimeError(f"expected {trials} trials, got {len(result.rows)}")
    return 1000.0 * elapsed / trials


def modes(workdir: Path, sampler: str) -> dict[str, tuple[Callable[..., float], str | None]]:
    """(objective, storage) per column; the databases (with their tables) and parent run exist before timing."""
    plain, tracked = (f"sqlite:///{workdir / f'optuna-{kind}{sampler}.db'}" for kind in ("", "tracked-"))
    for url in (plain, tracked):
        make_storage(url, heartbeat=False)
    tracker = CampaignTracker(f"sqlite:///{workdir / 'mlflow.db'}", f"overhead-{sampler}")
    parent = tracker.start_search(f"overhead {sampler}", {}, {}, {})
    return {
        "in-memory": (noop_objective, None),
        "SQLite": (noop_objective, plain),
        "SQLite + MLflow trial runs": (TrackedNoop(tracker, parent, f"overhead-{sampler}"), tracked),
    }


def proxy_epoch_seconds(source: str) -> tuple[float, Any]:
    """Wall seconds of one proxy epoch of arcface (training and judging), and the budget."""
    data = data_for(source)
    budget = budget_from("proxy", epochs=1, identities=300)
    start = time.perf_counter()
    result = train(named("arcface"), data, budget)
    if result.status != "complete":
        raise RuntimeError(f"proxy training ended {result.status}: {result.reason}")
    return time.perf_counter() - start, budget


def main(argv: list[str] | None = None) -> int:
    """Time the machinery, print the table and write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--space", default="margin")
    parser.add_argument("--source", default="synthetic:demo")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_overhead.md"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epoch_s, budget = proxy_epoch_seconds(args.source)
    target_logit_png(named("arcface"), "warm-up")  # the first figure imports matplotlib: not a per-trial cost
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in SAMPLERS:
            time_search(noop_objective, sampler, 3, None, args.space)  # warm-up: imports, first study
            for column, (objective, storage) in modes(Path(tmp), sampler).items():
                rows.append((sampler, column, time_search(objective, sampler, args.trials, storage, args.space)))
    machine = (f"torch {torch.__version__}, optuna {optuna.__version__}, {os.cpu_count()} CPUs, "
               f"{platform.processor() or platform.machine()}")
    command = f".venv/bin/python bench/search_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = ["# Search and tracking overhead per trial", "", f"Command: `{command.rstrip()}`", "",
             f"Machine: {machine}. Space {args.space}, {args.trials} trials per cell, no-op objective with "
             f"{REPORTS} reports. Reference: one proxy epoch of arcface on {args.source} (backbone "
             f"{budget.backbone}, batch {budget.batch_size}, {budget.identities} identities, judging included) "
             f"took {epoch_s:.2f} s. One run per cell: a cell can differ by 2-3× between runs (SQLite and MLflow "
             "write to disk); read the orders of magnitude.", "",
             markdown_table(["sampler", "storage / tracking", "ms per trial", "% of one proxy epoch"],
                            [[sampler, column, f"{ms:.1f}", f"{100.0 * ms / 1000.0 / epoch_s:.2f}"]
                             for sampler, column, ms in rows], align="llrr")]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
