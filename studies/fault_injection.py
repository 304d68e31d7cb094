"""Fault injection: SIGKILL small campaigns at random points, resume each until it finishes, check the stores.

    .venv/bin/python -m studies.fault_injection [--campaigns 3] [--kills 4] [--seed 0]

Each kill is either a hook (MARGINSEARCH_FAULT=<phase>:<n>, a SIGKILL the n-th time the campaign
reaches that point, n random) or a SIGKILL after a random delay. After the kills the same command
runs until it exits 0, then `consistency_problems` (tests/trainers/test_faults.py) checks: the
configured number of finished trials, one MLflow run per trial key, nothing RUNNING, the parent
FINISHED in phase done, one finished promoted run per candidate, a champion that loads.
Prints one row per kill and one per campaign.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tests.trainers.test_faults import campaign_argv, consistency_problems, run_cli  # noqa: E402

# phase → the range of n: trials × epochs hits for trial/log, one per trial for finish, per promotion or version
# in the order a campaign reaches them (kills of one campaign are drawn, then sorted in this order)
PHASES = {"delay": (4, 25), "trial": (1, 4), "log": (1, 4), "finish": (1, 2), "promote": (1, 2),
          "promoted-log": (1, 2), "register": (1, 2), "gate": (1, 2), "end": (1, 1)}


def _killed_after(argv: list[str], workdir: Path, seconds: float) -> tuple[int, str]:
    """Run the CLI and SIGKILL it after `seconds` (if still running): (exit code, last stdout line)."""
    env = {**os.environ, "MARGINSEARCH_CACHE": str(workdir.parent / "cache"), "PYTHONPATH": str(ROOT),
           "MARGINSEARCH_FAULT": ""}
    proc = subprocess.Popen([sys.executable, "-m", "marginsearch.trainers.cli", *argv], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.strip()]
    return proc.returncode, lines[-1].strip() if lines else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--campaigns", type=int, default=4)
    p.add_argument("--kills", type=int, default=4, help="kills per campaign")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for c in range(args.campaigns):
            workdir = Path(tmp) / f"c{c}"
            workdir.mkdir()
            argv = campaign_argv(workdir)
            t0, kills = time.perf_counter(), 0
            order = list(PHASES)
            for phase in sorted(rng.sample(order, args.kills), key=order.index):
                n = rng.randint(*PHASES[phase]) if phase != "delay" else round(rng.uniform(*PHASES[phase]), 1)
                if phase == "delay":
                    code, last = _killed_after(argv, workdir, n)
                else:
                    done = run_cli(argv, workdir, f"{phase}:{n}")
                    lines = [line for line in done.stdout.splitlines() if line.strip()]
                    code, last = done.returncode, (lines or [""])[-1].strip()
                outcome = "killed" if code == -signal.SIGKILL else f"exit {code}"
                kills += code == -signal.SIGKILL
                rows.append((c, f"{phase}:{n}", outcome, last[:70]))
                if code == 0:
                    break  # the campaign finished before the fault point: the rest would start a new one
            resumes, code = 0, code if rows and rows[-1][0] == c else 1
            while code != 0 and resumes < 3:  # re-run the same command until it finishes
                resumes += 1
                code = run_cli(argv, workdir).returncode
            problems = consistency_problems(workdir) if code == 0 else [f"resume exit {code}"]
            summary.append((c, kills, resumes, time.perf_counter() - t0, "; ".join(problems) or "consistent"))
    print("| campaign | fault | outcome | last line before the kill |\n|---|---|---|---|")
    for c, fault, outcome, last in rows:
        print(f"| {c} | {fault} | {outcome} | {last} |")
    print("\n| campaign | kills | final runs | seconds | checks |\n|---|---|---|---|---|")
    for c, kills, resumes, seconds, verdict in summary:
        print(f"| {c} | {kills} | {resumes} | {seconds:.0f} | {verdict} |")
    print(f"\n{sum(s[1] for s in summary)} kills in all; "
          f"{sum(s[4] == 'consistent' for s in summary)}/{len(summary)} campaigns consistent")


if __name__ == "__main__":
    main()
