"""Run the demo campaign (the README's main job) and write what it produced to docs/ for the README.

    python bench/demo_campaign.py                 # fresh working directory out/demo-report, ~10 min on 2 cores

Writes docs/demo_campaign.md (timing, the promoted models against the named baselines, every
trial) and docs/demo_search_history.png, docs/demo_champion_curve.png.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from marginsearch.losses import named  # noqa: E402
from marginsearch.losses.plot import plot_target_logits  # noqa: E402
from marginsearch.trainers import figures  # noqa: E402
from marginsearch.trainers.campaign import run_campaign  # noqa: E402
from marginsearch.trainers.config import load_config, override  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/demo-report")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    from marginsearch.trainers.cli import parse_assignments

    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    config = override(load_config(), {"campaign.workdir": str(workdir), **parse_assignments(args.set)})
    t0 = time.perf_counter()
    result = run_campaign(config, log=lambda line: print(line, flush=True))
    minutes = (time.perf_counter() - t0) / 60
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    figures.search_history(result.search.rows, f"demo campaign {result.key}").savefig(
        docs / "demo_search_history.png", dpi=110)
    best = max(result.promoted, key=lambda p: p.metrics.get(result.gate_metric, -1.0))
    curves = {f"champion candidate ({best.label})": best.spec, "arcface": named("arcface"), "cosface": named("cosface")}
    plot_target_logits(curves, docs / "demo_champion_curve.png")
    cmd = "python bench/demo_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"`marginsearch campaign` on the embedded defaults finished in {minutes:.1f} min "
            f"(torch {torch.__version__}, {os.cpu_count()} CPU cores; `{cmd.strip()}`).\n\n"
            f"{result.summary().split(chr(10) + 'load it:')[0]}\n\nAll trials (proxy budget, validation reward "
            f"{config.budget['proxy'].reward_metric}):\n\n{result.search.to_markdown()}\n")
    (docs / "demo_campaign.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
