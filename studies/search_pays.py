"""Study 2, does the search pay? The committed design (studies/designs/search_pays.toml), run in three stages.

    python -m studies.search_pays                 # the committed design (102 min on 2 cores, --jobs 2)
    python -m studies.search_pays --reduced       # search_pays_reduced.toml: tiny preset, seconds (CI)
    python -m studies.search_pays --design my.toml --out results/mine

A. Proxy fidelity among the candidates that matter: a reward-guided search's top half (16 specs),
   each trained at every candidate proxy budget and at the full budget on 2 seeds; the cheapest
   (proxy, reward) whose Spearman ρ against the full-budget *validation* reward reaches the design's
   goal becomes the proxy of stage B.
B. Arms at equal compute on every unit (seed × benchmark draw): reward-guided (REINFORCE, rounds ×
   population trials), TPE, random search, and the named losses with s tuned on a grid. Each arm's
   top specs by proxy reward are trained on the full budget (seed + 100), the best on validation is
   the champion, retrained from scratch on seed + 200 and only then judged on the test identities.
C. Transfer, no search: the reward-guided champion and the tuned named loss (each the best on draw 0's
   validation) on other settings, and a sweep of s against the number of classes.

Every training's result is cached under <out>/cache/ as JSON, so an interrupted run resumes where it
stopped; --jobs N trains N candidates at once (one torch thread each). The tables, figures and
runs.json go to <out>; the summary runs to MLflow (experiment `study-search-pays`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import tomllib

from studies.common import mean
from studies.stats import spearman

DESIGNS = Path(__file__).resolve().parent / "designs"
RESULTS = Path(__file__).resolve().parent / "results" / "search_pays"
EXPERIMENT = "study-search-pays"
ARMS = ("reward-guided", "tpe", "random", "tuned-named")
MEAN_TAR_FARS = ("tar@far=1e-2", "tar@far=1e-3", "tar@far=1e-4")


# ------------------------------------------------------------------ design
class DesignError(ValueError):
    """A design file that is missing, unreadable or inconsistent (the study prints it on one line, exit code 2)."""


def load_design(path: str | Path) -> dict[str, Any]:
    """The study's design (TOML), checked: units pair seeds with draws, arms are known, proxies are budgets, the
    tuned-named grid has a search arm's compute."""
    try:
        design = tomllib.loads(Path(path).read_text())
        units, s, g = design["units"], design["search"], design["tuned_named"]
        if len(units["seeds"]) != len(units["draws"]) or not set(units["draws"]) <= set(design["benchmark"]["draws"]):
            raise DesignError(f"{path}: units.seeds and units.draws must pair up, with draws from benchmark.draws")
        unknown = set(s["arms"]) - set(ARMS)
        if unknown:
            raise DesignError(f"{path}: unknown arm(s) {sorted(unknown)}; arms: {', '.join(ARMS)}")
        grid = len(g["losses"]) * len(g["scales"]) * g["repeats"]
        if "tuned-named" in s["arms"] and grid != s["rounds"] * s["population"]:
            raise DesignError(f"{path}: the tuned-named grid (losses × scales × repeats) must have rounds × "
                              "population trainings, the compute of a search arm")
        if design["fidelity"]["generator"]["proxy"] not in design["proxies"]:
            raise DesignError(f"{path}: fidelity.generator.proxy must name one of [proxies]")
    except KeyError as exc:
        raise DesignError(f"{path}: missing key {exc}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DesignError(f"{path}: {exc}") from None
    return design


def proxy_budget(design: dict[str, Any], name: str) -> dict[str, Any]:
    """A proxy's budget: the full budget with the proxy's fields changed."""
    return {**design["budget"]["full"], **design["proxies"][name]}


def spec_key(spec: dict[str, Any]) -> str:
    """A spec dict as text, the same for equal specs: what dedups and pairs specs across runs."""
    return json.dumps(spec, sort_keys=True)


def units_of(design: dict[str, Any]) -> list[tuple[int, int]]:
    """(seed, draw) of every unit."""
    return list(zip(design["units"]["seeds"], design["units"]["draws"]))


# ------------------------------------------------------------------ one training (runs in a worker)
_BENCH: dict[str, Any] = {}


def benchmark(setting: dict[str, Any]) -> Any:
    """The synthetic benchmark of `setting` ({"preset": ..., other SyntheticConfig fields}), once per process."""
    from marginsearch.trainers.data.synthetic import PRESETS, load_synthetic

    key = json.dumps(setting, sort_keys=True)
    if key not in _BENCH:
        fields = {k: v for k, v in setting.items() if k != "preset"}
        _BENCH[key] = load_synthetic(dataclasses.replace(PRESETS[setting["preset"]], **fields))
    return _BENCH[key]


def with_mean_tar(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus mean_tar, the mean TAR over FAR 1e-2, 1e-3, 1e-4 (NaN if one is missing)."""
    values = [metrics.get(k, math.nan) for k in MEAN_TAR_FARS]
    return {**metrics, "mean_tar": sum(values) / len(values)}


def fit(spec: dict[str, Any], budget: dict[str, Any], seed: int, setting: dict[str, Any],
        judge_test: bool = False) -> dict[str, Any]:
    """Train `spec` on `setting`'s benchmark under `budget` with `seed`: the last epoch's validation metrics, the
    training images seen, seconds; the test metrics only when `judge_test`."""
    from marginsearch.losses import MarginSpec
    from marginsearch.trainers.budget import budget_from
    from marginsearch.trainers.train import TrainData, train
    from studies.common import test_metrics

    bench = benchmark(setting)
    data = TrainData.from_benchmark(bench, setting["preset"])
    b = budget_from("full", **budget, seed=seed)
    t0 = time.perf_counter()
    trained = train(MarginSpec.from_dict(spec), data, b)
    n = len(data.subset(b.identities).labels)
    out: dict[str, Any] = {"status": trained.status, "val": with_mean_tar(trained.metrics),
                           "images": (n // b.batch_size) * b.batch_size * len(trained.history),
                           "seconds": time.perf_counter() - t0}
    if judge_test:
        out["test"] = with_mean_tar(test_metrics(trained.model, bench, seed)) if trained.status == "complete" else {}
    return out


def reward_of(result: dict[str, Any], reward: str) -> float:
    """The reward a search sees: a validation metric of a finished training, NaN otherwise."""
    value = result["val"].get(reward, math.nan) if result["status"] == "complete" else math.nan
    return float(value) if value is not None else math.nan


def _init_worker(threads: int) -> None:
    import optuna
    import torch

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ stage A: proxy fidelity
def generator_search(design: dict[str, Any]) -> dict[str, Any]:
    """The reward-guided search whose top half the fidelity stage measures: its trials, best first."""
    g = design["fidelity"]["generator"]
    setting = {"preset": design["benchmark"]["preset"], "seed": g["draw"]}
    rows = search(design, "reward-guided", g["seed"], setting, proxy_budget(design, g["proxy"]), g["reward"])["rows"]
    return {"rows": sorted((r for r in rows if math.isfinite(r["reward"])), key=lambda r: -r["reward"])}


def fidelity_specs(design: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`specs` specs from the top half of the generator's trials: every k-th rank, distinct specs only."""
    distinct = list({spec_key(r["spec"]): r for r in rows}.values())
    half = distinct[:max(1, len(distinct) // 2)]
    n = design["fidelity"]["specs"]
    step = max(1, len(half) // n)
    return [r["spec"] for r in half[::step][:n]]


def fidelity_task(design: dict[str, Any], spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """One spec and seed at every candidate proxy and at the full budget (the full budget also judged on test)."""
    g = design["fidelity"]["generator"]
    setting = {"preset": design["benchmark"]["preset"], "seed": g["draw"]}
    proxies = {name: fit(spec, proxy_budget(design, name), seed, setting) for name in design["proxies"]}
    return {"spec": spec, "seed": seed, "proxies": proxies,
            "full": fit(spec, design["budget"]["full"], seed, setting, judge_test=True)}


def choose_proxy(design: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Spearman ρ of each (proxy, reward) against the full-budget validation and test metric, over the measured specs;
    the cheapest reaching the goal on validation (else the best on validation)."""
    metric = design["selection"]["metric"]
    keys = [spec_key(r["spec"]) for r in runs]  # runs[i]'s spec
    specs = list(dict.fromkeys(keys))
    full_val = {s: mean(r["full"]["val"].get(metric) for r, k in zip(runs, keys) if k == s) for s in specs}
    full_test = {s: mean(r["full"].get("test", {}).get(metric) for r, k in zip(runs, keys) if k == s) for s in specs}
    full_images = mean(r["full"]["images"] for r in runs)
    table = []
    for proxy in design["proxies"]:
        for reward in design["fidelity"]["rewards"]:
            rho_val, rho_test = [], []
            for seed in design["fidelity"]["seeds"]:
                by = {k: reward_of(r["proxies"][proxy], reward) for r, k in zip(runs, keys) if r["seed"] == seed}
                rho_val.append(spearman([by[s] for s in specs], [full_val[s] for s in specs]))
                rho_test.append(spearman([by[s] for s in specs], [full_test[s] for s in specs]))
            table.append({"proxy": proxy, "reward": reward, "rho_val": mean(rho_val), "rho_test": mean(rho_test),
                          "rho_val_per_seed": rho_val,
                          "cost": mean(r["proxies"][proxy]["images"] for r in runs) / full_images})
    seeds = design["fidelity"]["seeds"]
    per_seed = {seed: {k: r["full"]["val"].get(metric, math.nan) for r, k in zip(runs, keys) if r["seed"] == seed}
                for seed in seeds}
    rho_seeds = spearman([per_seed[seeds[0]].get(s, math.nan) for s in specs],
                         [per_seed[seeds[-1]].get(s, math.nan) for s in specs]) if len(seeds) > 1 else math.nan
    reached = [t for t in table if t["rho_val"] >= design["fidelity"]["rho_goal"]]
    chosen = min(reached, key=lambda t: (t["cost"], -t["rho_val"])) if reached else \
        max(table, key=lambda t: _finite(t["rho_val"]))
    return table, {**chosen, "reached_goal": bool(reached), "full_seed_to_seed_rho": rho_seeds,
                   "full_val_test_rho": spearman([full_val[s] for s in specs], [full_test[s] for s in specs])}


# ------------------------------------------------------------------ stage B: arms
def search(design: dict[str, Any], arm: str, seed: int, setting: dict[str, Any], proxy: dict[str, Any],
           reward: str) -> dict[str, Any]:
    """A search arm's proxy trials on one unit: rows (spec, reward, round, images) and, reward-guided, the policy
    per round."""
    from marginsearch.searchspace import StudyOptions, load, run_search
    from marginsearch.searchspace.sampler import RewardGuidedSampler

    s = design["search"]
    space = load(s["space"])
    trials: list[dict[str, Any]] = []

    def objective(spec: Any, report: Callable[[int, float], None]) -> float:
        result = fit(spec.to_dict(), proxy, seed, setting)
        trials.append(result)
        return reward_of(result, reward)

    n = s["rounds"] * s["population"]
    sampler: Any = RewardGuidedSampler(space=space, seed=seed, population=s["population"]) \
        if arm == "reward-guided" else arm
    result = run_search(space, objective, sampler=sampler, n_trials=n, seed=seed, population=s["population"],
                        study=StudyOptions(name=f"{arm}-s{seed}"))
    rows = [{"number": r.number, "round": r.number // s["population"], "spec": r.spec.to_dict() if r.spec else None,
             "params": r.params, "reward": r.reward if r.reward is not None else math.nan, "state": r.state,
             "images": t["images"], "seconds": t["seconds"]} for r, t in zip(result.rows, trials, strict=True)]
    out: dict[str, Any] = {"rows": rows}
    if isinstance(sampler, RewardGuidedSampler):
        out["trajectory"] = sampler.trajectory(result.study)
    return out


def tuned_named_trials(design: dict[str, Any], seed: int, setting: dict[str, Any], proxy: dict[str, Any],
                       reward: str) -> dict[str, Any]:
    """The careful user's grid: every named loss × scale, `repeats` proxy trainings each (seeds seed, seed + 1000,
    ...); a point's reward is the mean of its repeats."""
    from marginsearch.losses import named

    g = design["tuned_named"]
    rows: list[dict[str, Any]] = []
    for loss in g["losses"]:
        for s in g["scales"]:
            spec = named(loss, s=float(s)).to_dict()
            results = [fit(spec, proxy, seed + 1000 * r, setting) for r in range(g["repeats"])]
            rows.append({"number": len(rows), "round": None, "spec": spec, "params": {"loss": loss, "s": s},
                         "reward": mean(reward_of(x, reward) for x in results), "state": "COMPLETE",
                         "images": sum(x["images"] for x in results), "seconds": sum(x["seconds"] for x in results)})
    return {"rows": rows}


def arm_task(design: dict[str, Any], arm: str, seed: int, draw: int, proxy_name: str, reward: str) -> dict[str, Any]:
    """One arm on one unit: proxy trials, top specs promoted to the full budget (seed + 100), the best on validation
    retrained on seed + 200 and judged on test. `events` records the order: test is read only after selection."""
    sel = design["selection"]
    setting = {"preset": design["benchmark"]["preset"], "seed": draw}
    proxy, full = proxy_budget(design, proxy_name), design["budget"]["full"]
    found = tuned_named_trials(design, seed, setting, proxy, reward) if arm == "tuned-named" else \
        search(design, arm, seed, setting, proxy, reward)
    events = [f"proxy:{len(found['rows'])}"]
    ranked = sorted((r for r in found["rows"] if math.isfinite(r["reward"])), key=lambda r: -r["reward"])
    top = list({spec_key(r["spec"]): r for r in reversed(ranked)}.values())
    top = sorted(top, key=lambda r: -r["reward"])[:design["search"]["promote"]]
    promoted = []
    for r in top:
        result = fit(r["spec"], full, seed + sel["promotion_seed_offset"], setting)
        events.append("promote")
        promoted.append({"spec": r["spec"], "proxy_reward": r["reward"], "round": r["round"], "number": r["number"],
                         "full_val": result["val"].get(sel["metric"], math.nan), "images": result["images"],
                         "seconds": result["seconds"], "status": result["status"]})
    if not promoted:
        return {"arm": arm, "seed": seed, "draw": draw, **found, "promoted": [], "events": events}
    pick = max(range(len(promoted)), key=lambda i: _finite(promoted[i]["full_val"]))
    events.append(f"select:{pick}")
    final = fit(promoted[pick]["spec"], full, seed + sel["retrain_seed_offset"], setting, judge_test=True)
    events.append("test")
    return {"arm": arm, "seed": seed, "draw": draw, **found, "promoted": promoted, "champion_index": pick,
            "champion": promoted[pick]["spec"], "retrain": final, "events": events}


# ------------------------------------------------------------------ stage C: transfer and the scale sweep
def transfer_task(design: dict[str, Any], setting_name: str, label: str, spec: dict[str, Any],
                  seed: int) -> dict[str, Any]:
    """`spec` trained on a transfer setting (its own benchmark and budget) and judged on its test identities."""
    t = dict(design["transfer"][setting_name])
    budget = {**design["budget"]["full"], **({"epochs": t.pop("epochs")} if "epochs" in t else {})}
    result = fit(spec, budget, seed, t, judge_test=True)
    return {"setting": setting_name, "label": label, "seed": seed, "spec": spec, **result}


def sweep_task(design: dict[str, Any], identities: int, s: float, seed: int) -> dict[str, Any]:
    """CosFace (m = 0.35) at scale `s` trained on the first `identities` classes of draw 0."""
    from marginsearch.losses import named

    setting = {"preset": design["benchmark"]["preset"], "seed": design["benchmark"]["draws"][0]}
    budget = {**design["budget"]["full"], "identities": identities}
    return {"identities": identities, "s": s, "seed": seed,
            **fit(named("cosface", s=float(s)).to_dict(), budget, seed, setting, judge_test=True)}


# ------------------------------------------------------------------ running tasks, cached
class Runner:
    """Runs (function, kwargs) tasks in `jobs` worker processes; each result cached as <cache>/<key>.json."""

    def __init__(self, cache: Path, jobs: int, log: Callable[[str], None]) -> None:
        self.cache, self.jobs, self.log = cache, jobs, log
        self.cached = self.ran = 0  # tasks read from the cache / run by this invocation
        cache.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, kwargs: dict[str, Any]) -> Path:
        blob = json.dumps([name, {k: v for k, v in kwargs.items() if k != "design"}], sort_keys=True)
        digest = hashlib.sha256((blob + json.dumps(kwargs.get("design"), sort_keys=True)).encode()).hexdigest()
        return self.cache / f"{name}-{digest[:16]}.json"

    def map(self, fn: Callable[..., dict[str, Any]], tasks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        tasks = list(tasks)
        out: list[dict[str, Any] | None] = [None] * len(tasks)
        todo = []
        for i, kwargs in enumerate(tasks):
            path = self._path(fn.__name__, kwargs)
            if path.is_file():
                out[i] = json.loads(path.read_text())
            else:
                todo.append(i)
        self.log(f"{fn.__name__}: {len(tasks)} tasks, {len(tasks) - len(todo)} cached, {self.jobs} job(s)")
        self.cached, self.ran = self.cached + len(tasks) - len(todo), self.ran + len(todo)
        if self.jobs <= 1:
            _init_worker(max(1, torch_threads()))
            for i in todo:
                out[i] = self._save(fn.__name__, tasks[i], fn(**tasks[i]))
        elif todo:
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
            with ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                futures = {i: pool.submit(fn, **tasks[i]) for i in todo}
                for done, (i, future) in enumerate(futures.items(), 1):
                    out[i] = self._save(fn.__name__, tasks[i], future.result())
                    self.log(f"  {fn.__name__} {done}/{len(todo)}")
        return [o for o in out if o is not None]

    def _save(self, name: str, kwargs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        path = self._path(name, kwargs)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=_jsonable))
        tmp.replace(path)
        return json.loads(path.read_text())


def torch_threads() -> int:
    """Threads of a single-job run: every core."""
    return os.cpu_count() or 1


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return repr(value)


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


# ------------------------------------------------------------------ the study
def run(design: dict[str, Any], runner: Runner, log: Callable[[str], None]) -> dict[str, Any]:
    """All three stages; everything the report needs."""
    log("== A. proxy fidelity")
    generator = runner.map(generator_search, [{"design": design}])[0]
    specs = fidelity_specs(design, generator["rows"])
    fidelity = runner.map(fidelity_task, [{"design": design, "spec": spec, "seed": seed}
                                          for spec in specs for seed in design["fidelity"]["seeds"]])
    table, chosen = choose_proxy(design, fidelity)
    log(f"   proxy {chosen['proxy']}, reward {chosen['reward']}: ρ = {chosen['rho_val']:.2f} against the full-budget "
        f"validation reward ({'reaches' if chosen['reached_goal'] else 'misses'} the goal)")
    log("== B. arms at equal compute")
    arms = runner.map(arm_task, [{"design": design, "arm": arm, "seed": seed, "draw": draw,
                                  "proxy_name": chosen["proxy"], "reward": chosen["reward"]}
                                 for arm in design["search"]["arms"] for seed, draw in units_of(design)])
    log("== C. transfer")
    picks = transfer_picks(design, arms)
    transfer = runner.map(transfer_task, [{"design": design, "setting_name": name, "label": label, "spec": spec,
                                           "seed": seed}
                                          for name in design["transfer"]["settings"] for label, spec in picks.items()
                                          for seed in design["transfer"]["seeds"]])
    sw = design["scale_sweep"]
    sweep = runner.map(sweep_task, [{"design": design, "identities": ids, "s": s, "seed": seed}
                                    for ids in sw["identities"] for s in sw["scales"] for seed in sw["seeds"]])
    return {"generator": generator, "fidelity_specs": specs, "fidelity": fidelity, "fidelity_table": table,
            "proxy": chosen, "arms": arms, "transfer_picks": picks, "transfer": transfer, "sweep": sweep}


def transfer_picks(design: dict[str, Any], arms: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The reward-guided and tuned-named champions with the best full-budget validation reward on the first draw."""
    draw = design["benchmark"]["draws"][0]
    picks = {}
    for arm, label in (("reward-guided", "searched (reward-guided)"), ("tuned-named", "tuned named")):
        runs = [a for a in arms if a["arm"] == arm and a["draw"] == draw and a.get("promoted")]
        if runs:
            best = max(runs, key=lambda a: _finite(a["promoted"][a["champion_index"]]["full_val"]))
            picks[label] = best["champion"]
    return picks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="the reduced design (tiny preset; CI)")
    p.add_argument("--design", default="", help="a design TOML (default studies/designs/search_pays[_reduced].toml)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (cache/ inside it makes a run resumable)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="trainings at once (default 2)")
    p.add_argument("--mlflow", default="", help="MLflow tracking URI (default sqlite:///<out>/../mlflow.db)")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    path = Path(args.design) if args.design else DESIGNS / ("search_pays_reduced.toml" if args.reduced
                                                            else "search_pays.toml")
    try:
        design = load_design(path)
    except DesignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    log = lambda line: print(line, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    runner = Runner(out / "cache", args.jobs, log)
    data = run(design, runner, log)
    from studies.search_report import report

    data["tasks"] = {"ran": runner.ran, "cached": runner.cached}
    report(design, path, data, out, args, time.perf_counter() - t0, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
