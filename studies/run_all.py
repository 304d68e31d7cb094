"""All four studies with one command: named baselines, does the search pay, proxy fidelity, long tail.

    python -m studies.run_all                        # demo preset, seeds 0 1 2
                                                     # (about 2.7 h on 2 cores, measured per study)
    python -m studies.run_all --preset bench         # the larger bench preset (about a day on 2 cores, estimated)
    python -m studies.run_all --reduced              # tiny preset, seed 0, 1-2 epochs (CI; about a minute)

Each study writes results.md, its PNGs and runs.json to <out>/<study>/; all runs go to one MLflow
store, <out>/mlflow.db (look: mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db). The search
study runs its committed design (studies/designs/search_pays.toml; --preset, --seeds and --epochs
do not apply to it) with its own arms, tuned named losses included.
Run times measured on 2 cores (demo preset): named baselines 50 min, search pays 102 min (--jobs 2), proxy
fidelity 37 min, long tail 11 min.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from studies import long_tail, named_baselines, proxy_fidelity, search_pays  # noqa: E402
from studies.common import RESULTS_ROOT  # noqa: E402

STUDIES = {"named_baselines": named_baselines.main, "search_pays": search_pays.main,
           "proxy_fidelity": proxy_fidelity.main, "long_tail": long_tail.main}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="tiny preset, 1-2 epochs, few specs (CI)")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS_ROOT), help="results root: one folder per study and mlflow.db")
    p.add_argument("--preset", default=None)
    p.add_argument("--epochs", type=int, default=None, help="full-budget epochs")
    p.add_argument("--only", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    args = p.parse_args(argv)
    root = Path(args.out).resolve()
    shared = [*(["--reduced"] if args.reduced else []), *(["--seeds", *map(str, args.seeds)] if args.seeds else []),
              *(["--preset", args.preset] if args.preset else []),
              *(["--epochs", str(args.epochs)] if args.epochs else []),
              "--mlflow", f"sqlite:///{root / 'mlflow.db'}"]
    t0 = time.perf_counter()
    for name in args.only:
        print(f"\n######## {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        # the search study's seeds, preset and budgets are fixed by its design file (studies/designs/)
        own = [*(["--reduced"] if args.reduced else []), "--mlflow", f"sqlite:///{root / 'mlflow.db'}"] \
            if name == "search_pays" else shared
        code = STUDIES[name]([*own, "--out", str(root / name)])
        if code:
            return code
    print(f"\nall studies done in {time.perf_counter() - t0:.0f} s: {root}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
