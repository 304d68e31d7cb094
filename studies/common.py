"""Shared pieces of the studies: budgets per mode, seeds, test metrics, mean ± std, and the results folder.

A results folder holds `results.md` (the tables, the command that produced them, the time it
took), one PNG per figure, and `runs.json` (every run's numbers, the arguments and the command).
Runs that do not go through a campaign are also logged to MLflow, one run each, so every study's
runs sit in one store beside the campaigns'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn  # noqa: E402

from marginsearch.trainers.budget import Budget, budget_from  # noqa: E402
from marginsearch.trainers.judge import LabelledImages, judge, judge_long_tail  # noqa: E402

__all__ = ["Mode", "mode_for", "study_parser", "mean_std", "fmt", "table", "summarise", "test_metrics",
           "StudyOutput", "command_line", "log_runs_to_mlflow", "TEST_PAIRS", "RESULTS_ROOT"]

# demo: a study in one to two hours on 2 cores; bench (4× the identities at 48×48, ~13× the
# compute per epoch) would take about a day, so it is a --preset away for those with more cores
DEFAULT_PRESET = "demo"
TEST_PAIRS = 3000            # cap on genuine and impostor pairs each for the 10-fold test accuracy (balanced:
                             # min(3000, available) of each kind, as a campaign's promotion)
RESULTS_ROOT = Path(__file__).resolve().parent / "results"

# tiny has too few negative test pairs for TAR@FAR=1e-3 (it is NaN there): reduced runs rank by AUC
REDUCED_BUDGET = {"batch_size": 32, "embedding_size": 32, "eval_pairs": 200, "reward_metric": "auc"}
FULL_BUDGET = {"eval_pairs": 6000}  # twice the default validation pairs: a quieter reward (issue item 2)
STUDY_FULL_EPOCHS = 12       # the studies' full budget (the recorded runs used 12; a campaign's full budget is 10)


@dataclass(frozen=True)
class Mode:
    """What a study spends: preset, proxy and full budgets, the headline metric, seeds."""

    preset: str
    proxy: Budget
    full: Budget
    metric: str
    seeds: tuple[int, ...]
    reduced: bool

    @property
    def source(self) -> str:
        return f"synthetic:{self.preset}"


def mode_for(args: argparse.Namespace) -> Mode:
    """The budgets of a full or `--reduced` run (tiny preset, 1–2 epochs, AUC as the headline metric)."""
    if args.reduced:
        proxy = budget_from("proxy", epochs=1, **REDUCED_BUDGET)
        full = budget_from("full", epochs=args.epochs or 2, **REDUCED_BUDGET)
        return Mode(args.preset or "tiny", proxy, full, "auc", tuple(args.seeds or (0,)), True)
    proxy = budget_from("proxy", epochs=2, identities=500, **FULL_BUDGET)
    full = budget_from("full", epochs=args.epochs or STUDY_FULL_EPOCHS, **FULL_BUDGET)
    return Mode(args.preset or DEFAULT_PRESET, proxy, full, "tar@far=1e-3", tuple(args.seeds or (0, 1, 2)), False)


def study_parser(doc: str, study: str) -> argparse.ArgumentParser:
    """The options every study shares: --reduced, --seeds, --out, --preset, --epochs, --mlflow."""
    summary = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph, on one line
    p = argparse.ArgumentParser(description=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="tiny preset, 1-2 epochs, few specs (CI; seconds)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2; reduced: 0)")
    p.add_argument("--out", default=str(RESULTS_ROOT / study), help="results folder")
    p.add_argument("--preset", default=None, help=f"synthetic preset (default {DEFAULT_PRESET}; reduced: tiny)")
    p.add_argument("--epochs", type=int, default=None, help=f"full-budget epochs (default {STUDY_FULL_EPOCHS})")
    p.add_argument("--mlflow", default="", help="MLflow tracking URI (default sqlite:///<out>/../mlflow.db)")
    return p


def tracking_uri(args: argparse.Namespace) -> str:
    """The study's MLflow store: --mlflow, else one SQLite file beside the study folders."""
    return args.mlflow or f"sqlite:///{Path(args.out).resolve().parent / 'mlflow.db'}"


def fmt(value: float, percent: bool = True) -> str:
    """One number, in percent by default; 'nan' when missing."""
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def mean_std(values: Iterable[float], percent: bool = True) -> str:
    """'mean ± std' over seeds (sample std; 0 for one value), NaN values left out; 'nan' when none is finite."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "nan"
    m = statistics.fmean(finite)
    s = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{fmt(m, percent)} ± {fmt(s, percent)}"


def mean(values: Iterable[float]) -> float:
    """The mean of the finite values; NaN when none is."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def std(values: Iterable[float]) -> float:
    """The sample std of the finite values; 0 for one, NaN for none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summarise(runs: Sequence[Mapping[str, Any]], group: str, metrics: Mapping[str, str],
              order: Sequence[str] | None = None) -> str:
    """A table of `group` × metrics (column title → run key), each cell mean ± std over the group's runs, with n."""
    groups = list(order) if order is not None else list(dict.fromkeys(r[group] for r in runs))
    rows = []
    for g in groups:
        rs = [r for r in runs if r[group] == g]
        rows.append([g, *(mean_std(r.get(key, math.nan) for r in rs) for key in metrics.values()), len(rs)])
    return table([group, *metrics, "n"], rows)


def test_metrics(model: nn.Module, bench: Any, seed: int) -> dict[str, float]:
    """Judge a model on the benchmark's test identities and its long-tail probe (as a campaign's promotion does)."""
    test = LabelledImages(bench.test.images, bench.test.labels, bench.test.hard, "test")
    metrics = judge(model, test, pairs=TEST_PAIRS, seed=seed)
    if bench.probe is not None:
        probe = LabelledImages(bench.probe.images, bench.probe.labels, None, "probe")
        metrics.update(judge_long_tail(model, probe, bench.train.counts()))
    return metrics


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run from the repository root (no git state: the command alone)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python", "-m", module, *args])


@dataclass
class StudyOutput:
    """Collects a study's tables, figures and runs, and writes them to its folder."""

    study: str
    out: Path
    command: str
    args: Mapping[str, Any]
    sections: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, title: str, text: str) -> None:
        """A section of results.md (a table or a paragraph); printed as it comes."""
        self.sections.append((title, text))
        print(f"\n## {title}\n\n{text}\n", flush=True)

    def figure(self, name: str, fig: Any) -> None:
        """A matplotlib figure, saved as <name>.png."""
        self.figures[name] = fig

    def write(self, runs: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Path:
        """results.md, runs.json and the PNGs; the folder."""
        import matplotlib.pyplot as plt

        self.out.mkdir(parents=True, exist_ok=True)
        seconds = time.perf_counter() - self.started
        for name, fig in self.figures.items():
            fig.tight_layout()
            fig.savefig(self.out / f"{name}.png", dpi=110)
            plt.close(fig)
        body = [f"# {self.study}", ""]
        for title, text in self.sections:
            body += [f"## {title}", "", text, ""]
        body += [f"![{name}]({name}.png)\n" for name in self.figures]
        body.append(f"Produced by `{self.command}` in {seconds:.0f} s ({os.cpu_count()} CPU cores); "
                    "numbers in % are mean ± sample std over seeds.")
        (self.out / "results.md").write_text("\n".join(body) + "\n")
        blob = {"study": self.study, "command": self.command, "args": dict(self.args), "seconds": seconds,
                "runs": list(runs), **(extra or {})}
        (self.out / "runs.json").write_text(json.dumps(blob, indent=1, default=_jsonable))
        print(f"wrote {self.out}/results.md, runs.json and {len(self.figures)} figure(s) in {seconds:.0f} s",
              flush=True)
        return self.out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return repr(value)


def log_runs_to_mlflow(uri: str, experiment: str, runs: Sequence[Mapping[str, Any]],
                       name: Callable[[Mapping[str, Any]], str]) -> None:
    """One MLflow run per study run: its string fields as params, its finite numbers as metrics."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    for run in runs:
        created = client.create_run(exp_id, run_name=name(run), tags={"marginsearch.study": experiment})
        params = [mlflow.entities.Param(_metric_name(k), str(v)[:500]) for k, v in run.items()
                  if not isinstance(v, (int, float)) or isinstance(v, bool)]
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(_metric_name(k), float(v), now, 0) for k, v in run.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        client.log_batch(created.info.run_id, metrics=metrics, params=params)
        client.set_terminated(created.info.run_id)


def _metric_name(key: str) -> str:
    """An MLflow-safe name: 'tar@far=1e-3' → 'tar_at_far_1e-3' (as the campaigns log it), other odd characters → '_'."""
    key = key.replace("@far=", "_at_far_")
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-./ ") else "_" for c in key)
