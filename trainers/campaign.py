"""A campaign: search the loss space on a proxy budget, promote the best to full training, register the champion.

Everything is recorded in MLflow (one experiment per campaign name): a parent run per campaign
with its config and search pictures, one nested run per trial (spec, named loss, reward history,
target-logit curve), one run per promoted model linked to its trial run, and a version of the
registered model per promoted model, the `champion` alias moving only through the gate.

A campaign has a key `<name>-<n>` (its Optuna study name, the tag of its runs). Running the same
config again resumes the newest campaign of that name if it did not finish, else starts the next
one; `new=True` always starts the next one. Resuming tops the study up to its trial count,
reopens the MLflow runs of trials that were cut off, skips promoted models already logged, and
continues a full training from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marginsearch.losses import MarginSpec, identify
from marginsearch.searchspace import load as load_space
from marginsearch.searchspace.results import SearchResult, TrialFailed, TrialRow, current_trial

from .budget import Budget, budget_dict
from .config import CampaignConfig, ConfigError, config_to_toml
from .images import Preprocess
from .judge import LabelledImages, judge, judge_long_tail, judge_pairs
from .objective import data_for
from .sources import PairSet, Split, check_pair_list, evaluation_data, parse_source
from .stores import check_sqlite_file, check_workdir, sqlite_path
from .tracking import (
    MLFLOW_RUN_ATTR,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    OPTUNA_TRIAL_TAG,
    TAG,
    CampaignTracker,
    TrialRun,
    check_tracking_uri,
    figure_files,
    preprocess_from_params,
    resolve_tracking_uri,
)
from .train import few_steps, train

__all__ = ["Promoted", "CampaignResult", "TrackedObjective", "run_campaign", "spec_key", "storage_url", "log_line",
           "open_trial_run", "label_trial_run"]

def spec_key(spec: MarginSpec) -> str:
    """A short stable hash of a spec: the identity of a trial's MLflow run within a campaign."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def storage_url(config: CampaignConfig) -> str:
    """The Optuna storage: the configured one, or sqlite:///<workdir>/optuna.db."""
    return config.search.storage or f"sqlite:///{config.workdir / 'optuna.db'}"


def log_line(line: str) -> None:
    """A log line on stdout that keeps tqdm's progress bars (on stderr) intact in a terminal and a piped log."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _epoch_metrics(report: Any) -> dict[str, float]:
    return {"reward": report.reward, "train_loss": report.train_loss, "images_per_second": report.images_per_second,
            **{f"val/{k}": v for k, v in report.metrics.items()}}


def open_trial_run(tracker: CampaignTracker, parent_run_id: str, campaign_key: str, spec: MarginSpec,
                   params: Mapping[str, Any]) -> TrialRun:
    """Open the run of `spec`'s trial (key `<campaign key>/<spec_key>`), or reopen it when the trial is a retry.

    Within an Optuna trial (`current_trial()`) the run is named and tagged after it, the trial's
    user attr `mlflow_run_id` names the run back, and only a retried trial looks for an earlier run
    (first the one its inherited `mlflow_run_id` names); elsewhere (a Ray worker) the tracker
    searches by key and the driver names the run (`label_trial_run`).
    """
    key = f"{campaign_key}/{spec_key(spec)}"
    tags: dict[str, Any] = {f"{TAG}campaign_key": campaign_key}
    context = current_trial()
    if context is None:
        return tracker.trial_run(parent_run_id, key, spec, params, tags)
    tags.update({OPTUNA_TRIAL_TAG: context.number, OPTUNA_STUDY_TAG: context.study_name})
    name = f"trial {context.number} · {identify(spec) or 'searched'}"
    recorded = context.user_attrs.get(MLFLOW_RUN_ATTR)  # only a retry inherits one
    retried = context.retry_of is not None
    trial = tracker.trial_run(parent_run_id, key, spec, params, tags, run_name=name,
                              run_id=recorded if retried else None, new=not retried)
    if trial.run_id != recorded:
        context.set_user_attr(MLFLOW_RUN_ATTR, trial.run_id)
    return trial


class TrackedObjective:
    """objective(spec, report) for `searchspace.run_search` that records each trial as a nested MLflow run.

    Picklable (Ray ships it to workers): it holds strings, a budget and a tracker that pickles as
    its URI. The run is keyed by campaign and spec, so a retried trial reopens its run.
    """

    def __init__(self, data_source: str, budget: Budget, tracker: CampaignTracker, parent_run_id: str,
                 campaign_key: str, cache_dir: str | None = None, split: Split | None = None) -> None:
        self.data_source, self.budget, self.tracker, self.split = data_source, budget, tracker, split
        self.parent_run_id, self.campaign_key, self.cache_dir = parent_run_id, campaign_key, cache_dir

    def __call__(self, spec: MarginSpec, report: Callable[[int, float], None]) -> float:
        """Train `spec` on the proxy budget, logging every epoch; TrialFailed if it diverges."""
        data = data_for(self.data_source, self.cache_dir, self.split)
        params = {"budget": budget_dict(self.budget), "data": self.data_source}
        trial = open_trial_run(self.tracker, self.parent_run_id, self.campaign_key, spec, params)
        with trial:
            def on_epoch(epoch_report: Any) -> None:
                trial.log_epoch(epoch_report.epoch, _epoch_metrics(epoch_report))
                log_line(f"    epoch {epoch_report.epoch}/{self.budget.epochs}: "
                               f"reward {epoch_report.reward:.4f}, "
                               f"loss {epoch_report.train_loss:.3f}, {epoch_report.seconds:.1f} s")
                if epoch_report.epoch >= self.budget.epochs:
                    trial.exit_state = "complete"  # Ray Tune ends a finished trial with SystemExit too
                report(epoch_report.epoch, epoch_report.reward)

            result = train(spec, data, self.budget, on_epoch=on_epoch)
            if result.status == "diverged":
                trial.finish("failed", f"diverged: {result.reason}")
                raise TrialFailed(f"diverged: {result.reason}")
            if not math.isfinite(result.reward):
                trial.finish("failed", f"reward is {result.reward}")
                raise TrialFailed(f"reward {self.budget.reward_metric} is {result.reward}")
            trial.finish("complete")  # the reward is the last epoch's, already logged
            return result.reward


@dataclass
class Promoted:
    """A candidate trained on the full budget: its spec, test metrics, runs and registry decision."""

    spec: MarginSpec
    named: str | None
    proxy_reward: float | None
    metrics: dict[str, float]
    run_id: str
    trial_run_id: str
    version: str | None = None
    became_champion: bool = False
    gate_reason: str = ""
    preprocess: Preprocess | None = None  # how its images are prepared (None: a run logged before it was recorded)

    @property
    def label(self) -> str:
        return self.named or f"searched {spec_key(self.spec)[:6]}"


@dataclass
class CampaignResult:
    """What a campaign produced, and where to look at it."""

    key: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    model_name: str
    search: SearchResult
    promoted: list[Promoted] = field(default_factory=list)
    champion_version: str | None = None
    champion_label: str | None = None
    gate_metric: str = ""

    def summary(self) -> str:
        """Markdown: promoted models, ranked by the gate's validation metric, with their test numbers; the champion,
        the UI command."""
        metric = self.gate_metric
        name = metric.removeprefix("val/")
        lines = [f"campaign {self.key}: {len(self.search.rows)} trials, {len(self.promoted)} promoted", "",
                 f"| model | named loss | proxy reward | val {name} (gate) | test {name} | 10-fold accuracy | "
                 f"registry | gate |", "|---|---|---|---|---|---|---|---|"]
        for p in sorted(self.promoted, key=lambda p: -p.metrics.get(metric, -math.inf)):
            reward = "" if p.proxy_reward is None else f"{p.proxy_reward:.4f}"
            lines.append(f"| {p.label} | {p.named or '—'} | {reward} | {p.metrics.get(metric, math.nan):.4f} | "
                         f"{p.metrics.get(f'test/{name}', math.nan):.4f} | "
                         f"{p.metrics.get('test/accuracy', math.nan):.4f} | v{p.version} | {p.gate_reason} |")
        if self.champion_version:
            lines += ["", f"champion: {self.model_name} v{self.champion_version} ({self.champion_label})",
                      f"load it:  mlflow.pytorch.load_model('models:/{self.model_name}@champion')"]
        else:
            lines += ["", "champion: none (no promoted model passed the gate)"]
        lines.append(f"look:     {ui_command(self.tracking_uri)}")
        return "\n".join(lines)


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this campaign's store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   (then open http://127.0.0.1:5000)"


# ---------------------------------------------------------------------------- campaign identity
def _campaign_runs(tracker: CampaignTracker, name: str) -> list[Any]:
    return tracker.runs({f"tags.`{TAG}kind`": "search", f"tags.`{TAG}campaign`": name})


def _open_campaign(config: CampaignConfig, tracker: CampaignTracker, new: bool, log: Callable[[str], None],
                   joining: bool = False) -> tuple[str, str]:
    """(campaign key, parent run id): the newest unfinished campaign of this name, or the next one."""
    name = config.campaign.name
    runs = _campaign_runs(tracker, name)
    latest = runs[0] if runs else None
    finished = latest is not None and latest.data.tags.get(f"{TAG}phase") == "done" and latest.info.status == "FINISHED"
    if latest is not None and not new and not finished:  # killed after phase "done" but before the run ended: resume
        key = latest.data.tags[f"{TAG}campaign_key"]
        verb = "joining" if joining else "resuming"
        log(f"{verb} campaign {key} (phase {latest.data.tags.get(f'{TAG}phase', 'search')})")
    else:
        numbers = [int(r.data.tags.get(f"{TAG}campaign_key", "-0").rsplit("-", 1)[-1] or 0) for r in runs]
        key = f"{name}-{max(numbers, default=0) + 1}"
        log(f"starting campaign {key}")
    artifacts = {"campaign.toml": config_to_toml(config), "space.toml": _space_text(config.search.space)}
    params = config.to_dict()  # with the places resolved: what '' and '.' meant when this campaign ran
    params["campaign"]["workdir"] = str(config.workdir)
    params["search"]["storage"] = storage_url(config)
    params["tracking"]["uri"] = tracker.tracking_uri
    tags = {f"{TAG}campaign": name, f"{TAG}data": config.data.train, OPTUNA_STUDY_TAG: key,
            OPTUNA_STORAGE_TAG: storage_url(config)}
    parent = tracker.start_search(key, params, tags,
                                  artifacts, resume_key=key)
    return key, parent


def _space_text(space: str) -> str:
    """The space file's text, logged with the campaign."""
    source = Path(load_space(space).source)
    return source.read_text() if source.is_file() else f"# space {space}\n"


# ---------------------------------------------------------------------------- search
def _search(config: CampaignConfig, tracker: CampaignTracker, key: str, parent: str,
            log: Callable[[str], None], retry_running: bool = True) -> SearchResult:
    from marginsearch.searchspace.search import RayOptions, StudyOptions, run_search

    s = config.search
    if retry_running:
        _retry_abandoned_trials(config, key, log)
    objective = TrackedObjective(config.data.train, config.budget["proxy"], tracker, parent, key,
                                 split=config.data.split)
    log(f"search: {s.trials} trials + {len(s.baselines)} named baselines over space '{s.space}' "
        f"({s.backend}, {s.sampler} sampler, {s.pruner} pruner, proxy {config.budget['proxy'].epochs} epochs)")
    result = run_search(s.space, objective, backend=s.backend, sampler=s.sampler, n_trials=s.trials + len(s.baselines),
                        seed=config.campaign.seed, population=s.population, pruner=s.pruner,
                        baselines=list(s.baselines), study=StudyOptions(storage_url(config), key, resume=True),
                        ray=RayOptions(address=s.ray_address or None,
                                       resources_per_trial={"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial},
                                       storage_path=str(config.workdir / "ray_results")),
                        callbacks=[lambda row: log(_row_line(row)),
                                   lambda row: label_trial_run(tracker, parent, key, row)])
    if result.study is not None:  # the study names the MLflow campaign run that records it
        result.study.set_user_attr("mlflow_parent_run_id", parent)
        result.study.set_user_attr("mlflow_tracking_uri", tracker.tracking_uri)
    return result


def label_trial_run(tracker: CampaignTracker, parent: str, key: str, row: TrialRow) -> None:
    """From the driver, after each trial: its MLflow run named `trial N · loss` and tagged with the Optuna trial
    (Ray too; a run this process opened so already is left alone)."""
    if row.spec is not None:
        tracker.label_trial_run(parent, f"{key}/{spec_key(row.spec)}", row.number, key,
                                row.baseline or row.named or "searched")


def _retry_abandoned_trials(config: CampaignConfig, key: str, log: Callable[[str], None]) -> None:
    """Trials left RUNNING by a killed campaign process: FAIL, and enqueued again with the same params (same MLflow
    run)."""
    import optuna

    from marginsearch.searchspace.search import make_storage, retry_abandoned

    try:
        study = optuna.load_study(study_name=key, storage=make_storage(storage_url(config)))
    except KeyError:
        return  # a new campaign: no study yet
    failed = retry_abandoned(study, "abandoned: its process stopped before the trial ended (campaign resumed)")
    if failed:
        log(f"search: trial(s) {', '.join(map(str, failed))} left RUNNING by a stopped process "
            "marked FAIL and enqueued again")


def _row_line(row: TrialRow) -> str:
    what = row.baseline or row.named or "sampled"
    reward = "" if row.reward is None else f"reward {row.reward:.4f}"
    return f"  trial {row.number:>3} {what:<14} {row.state:<8} {reward} {row.reason}".rstrip()


def _search_figures(result: SearchResult) -> dict[str, Any]:
    from . import figures

    out = {"search_history": figures.search_history(result.rows, f"search {result.study_name}")}
    if result.study is not None:
        out["parameter_importance"] = figures.parameter_importance(result.study)
        sampler = result.study.sampler
        if hasattr(sampler, "trajectory"):
            out["policy_trajectory"] = figures.policy_trajectory(sampler.trajectory(result.study))
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------- promotion
def _candidates(rows: list[TrialRow], top_k: int, with_baseline: bool) -> list[TrialRow]:
    """The top-k distinct complete specs by reward, plus the best named baseline if it is not among them."""
    done = sorted((r for r in rows if r.state == "COMPLETE" and r.spec is not None and r.reward is not None),
                  key=lambda r: -r.reward)
    picked: list[TrialRow] = []
    for row in done:
        if len(picked) < top_k and all(row.spec != p.spec for p in picked):
            picked.append(row)
    baselines = [r for r in done if r.baseline or r.named]
    if with_baseline and baselines and all(baselines[0].spec != p.spec for p in picked):
        picked.append(baselines[0])
    return picked


def _evaluate(config: CampaignConfig, model: Any, seed: int) -> dict[str, float]:
    """Test metrics (prefix test/), long-tail buckets on a synthetic source, and each verification set (prefix
    <name>/)."""
    metrics: dict[str, float] = {}
    test_source = config.data.test or config.data.train
    kind, rest = parse_source(test_source)
    if not config.data.test and kind != "synthetic":
        return metrics  # a real training source names its test set in [data] test
    test = evaluation_data(test_source, split="test")
    if isinstance(test, PairSet):
        metrics.update({f"test/{k}": v for k, v in judge_pairs(model, test.images, test.issame).items()})
    else:
        metrics.update({f"test/{k}": v for k, v in judge(model, test, pairs=3000, seed=seed).items()})
    if kind == "synthetic":
        from .data.synthetic import load_synthetic

        bench = load_synthetic(rest)
        if bench.probe is not None:
            probe = LabelledImages(bench.probe.images, bench.probe.labels, None, "probe")
            metrics.update({f"test/{k}": v for k, v in judge_long_tail(model, probe, bench.train.counts()).items()})
    for source in config.data.verification:
        pairs = evaluation_data(source)
        if not isinstance(pairs, PairSet):
            raise ConfigError(f"data.verification: {source} is not a pair list (use bin:... or pairs:...@root)")
        metrics.update({f"{pairs.name}/{k}": v for k, v in judge_pairs(model, pairs.images, pairs.issame).items()})
    return metrics


def _promote_one(config: CampaignConfig, tracker: CampaignTracker, key: str, parent: str, row: TrialRow,
                 log: Callable[[str], None]) -> Promoted:
    spec = row.spec
    skey = spec_key(spec)
    promoted_key = f"{key}/promoted/{skey}"
    trial_run_id = tracker.find_run({f"{TAG}trial_key": f"{key}/{skey}"}) or ""
    named = row.baseline or identify(spec)
    done = tracker.runs({f"tags.`{TAG}promoted_key`": promoted_key, "attributes.status": "FINISHED"})
    if done:
        log(f"promote: {named or skey} already trained and logged (run {done[0].info.run_id[:8]})")
        metrics = dict(done[0].data.metrics)
        return Promoted(spec, named, row.reward, _native_metrics(metrics), done[0].info.run_id, trial_run_id,
                        preprocess=preprocess_from_params(done[0].data.params))
    budget = config.budget["full"]
    log(f"promote: training {named or 'searched spec ' + skey} on the full budget ({budget.epochs} epochs)")
    data = data_for(config.data.train, split=config.data.split)
    checkpoint = config.workdir / "checkpoints" / key / f"{skey}.pt"
    result = train(spec, data, budget, checkpoint=checkpoint, progress=True)
    if result.status == "diverged":
        raise TrialFailed(f"promoted spec {skey} diverged on the full budget: {result.reason}")
    metrics = _evaluate(config, result.model, budget.seed)
    metrics.update({f"val/{k}": v for k, v in result.metrics.items()})  # the full budget's last validation: the gate
    metrics["full/val_reward"] = result.reward
    run_id = tracker.log_promoted(parent, trial_run_id, spec, metrics, result.model, result.model.preprocess,
                                  name=f"promoted {named or skey}",
                                  params={"budget": budget_dict(budget), "data": config.data.train},
                                  tags={f"{TAG}promoted_key": promoted_key, f"{TAG}campaign_key": key})
    return Promoted(spec, named, row.reward, metrics, run_id, trial_run_id, preprocess=result.model.preprocess)


def _native_metrics(logged: dict[str, float]) -> dict[str, float]:
    """MLflow metric names back to the evaluator's ('test/tar_at_far_1e-3' → 'test/tar@far=1e-3')."""
    out = {}
    for k, v in logged.items():
        head, _, tail = k.rpartition("/")
        tail = tail.replace("_at_far_", "@far=") if "_at_far_" in tail else tail
        out[f"{head}/{tail}" if head else tail] = v
    return out


def _register(config: CampaignConfig, tracker: CampaignTracker, promoted: list[Promoted], metric: str,
              log: Callable[[str], None]) -> None:
    """Register every promoted model; the gate compares them on `metric` (validation: test never chooses)."""
    from .registry import register_and_gate, set_challenger

    for p in sorted(promoted, key=lambda p: p.metrics.get(metric, -math.inf)):  # best last: it meets the gate last
        gate = register_and_gate(tracker.client, config.model_name, p.run_id, metric,
                                 p.metrics.get(metric, math.nan),
                                 description=_description(p, f"test/{config.promote.metric}"))
        p.version, p.became_champion, p.gate_reason = gate.version, gate.became_champion, gate.reason
        log(f"registry: {config.model_name} v{gate.version} ({p.label}): {gate.reason}")
    losers = [p for p in promoted if p.version and not _is_champion(tracker, config.model_name, p.version)]
    if losers:
        runner_up = max(losers, key=lambda p: p.metrics.get(metric, -math.inf))
        set_challenger(tracker.client, config.model_name, runner_up.version)


def _description(p: Promoted, metric: str) -> str:
    """A registered version's description: the loss, its test metric, how to prepare its input, and the spec fields
    that make it."""
    fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.spec.flat().items()
                       if not k.endswith(".kind"))
    shape = f"[B, 3, {p.preprocess.height}, {p.preprocess.width}], fit {p.preprocess.fit}" if p.preprocess else \
        "[B, 3, H, W]"
    return (f"{p.label}: {metric.removeprefix('test/')} {p.metrics.get(metric, math.nan):.4f} on the test identities; "
            f"input float32 RGB {shape}, in [-1, 1] (x / 127.5 - 1), prepared as the model's metadata \"preprocess\" "
            f"says: Preprocess.from_dict(mlflow.models.get_model_info(uri).metadata[\"preprocess\"])"
            f".batch([\"a.jpg\", ...]) (marginsearch.trainers.images); spec {fields}")


def _is_champion(tracker: CampaignTracker, model_name: str, version: str) -> bool:
    from .registry import champion

    current = champion(tracker.client, model_name)
    return current is not None and str(current.version) == str(version)


# ---------------------------------------------------------------------------- the whole campaign
def _check_inputs(config: CampaignConfig) -> list[str]:
    """One-line errors for a bad space, sampler, pruner, backbone, baseline, reward metric, data source, batch size or
    storage, and for an empty search, before the campaign records anything; the warnings (few steps per epoch)."""
    from marginsearch.searchspace.search import PRUNERS, SearchError, baseline_params, make_sampler, make_storage

    from .backbones import BACKBONES
    from .judge import FOLD_METRICS, FOLDS, undefined_because

    space = load_space(config.search.space)
    make_sampler(config.search.sampler, space, config.campaign.seed)
    if config.search.pruner not in PRUNERS:
        raise SearchError(f"search.pruner: unknown pruner {config.search.pruner!r}; choose one of {', '.join(PRUNERS)}")
    if config.search.trials + len(config.search.baselines) < 1:
        raise ConfigError("the search is empty: search.trials is 0 and search.baselines is []; give one or both")
    for phase, budget in config.budget.items():
        if budget.backbone not in BACKBONES:
            raise ConfigError(f"budget.{phase}.backbone: unknown backbone {budget.backbone!r}; "
                              f"choose one of {', '.join(sorted(BACKBONES))}")
    for source in config.data.verification:
        if parse_source(source)[0] not in ("bin", "pairs"):
            raise ConfigError(f"data.verification: {source} is not a pair list (use bin:... or pairs:...@root)")
    for source in (config.data.test, *config.data.verification):
        if source:
            check_pair_list(source)
    baseline_params(space, list(config.search.baselines))  # every baseline is a point of the space
    data = data_for(config.data.train, split=config.data.split)        # loaded once per process: the trials reuse it
    for phase, budget in config.budget.items():  # a reward the validation split cannot define fails every trial
        why = undefined_because(budget.reward_metric, data.val.labels.cpu().numpy(), budget.eval_pairs,
                                hard=data.val.hard is not None)
        if why is not None:
            other = (f"budget.{phase}.eval_pairs ≥ {FOLDS}" if budget.reward_metric in FOLD_METRICS
                     else "a larger FAR")
            raise ConfigError(f"budget.{phase}.reward_metric: {why} on the validation split; choose reward_metric = "
                              f"\"auc\" (any size) or {other}, or hold out more validation identities")
    warnings = []
    for phase, budget in config.budget.items():
        images = len(data.subset(budget.identities).labels)
        if images < budget.batch_size:
            raise ConfigError(f"budget.{phase}.batch_size: {budget.batch_size} is more than the {images} training "
                              f"images of {config.data.train}")
        warnings.append(few_steps(images, budget, f"budget.{phase}"))
    make_storage(storage_url(config), heartbeat=False)
    return [w for w in warnings if w]


def run_campaign(config: CampaignConfig, *, new: bool = False, phases: tuple[str, ...] = ("search", "promote"),
                 worker: bool = False, log: Callable[[str], None] = print) -> CampaignResult:
    """Search, then promote and register, recording everything in MLflow; resumable after a kill at any point.

    `worker=True` (search phase only) joins the newest unfinished campaign as one of several
    processes on the same study and stores: it never fails or closes another process's RUNNING
    trials and runs; a trial whose process died is retried once its heartbeat is stale (RDB storages).
    """
    if worker and ("promote" in phases or new):
        raise ConfigError("a worker runs the search phase of an existing or new campaign only (no --new, no promote)")
    import optuna

    # one line per trial comes from `log`; failures keep their reason
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_workdir(config.workdir)             # the places first: nothing is written before they are known good
    uri = resolve_tracking_uri(config.tracking.uri or None, config.workdir)
    for store, what in ((uri, "MLflow store"), (storage_url(config), "Optuna storage")):
        if (path := sqlite_path(store)) is not None:
            check_sqlite_file(path, what)
    config.workdir.mkdir(parents=True, exist_ok=True)
    check_tracking_uri(uri)
    for warning in _check_inputs(config):     # fail fast on bad input before any store is touched
        log(f"warning: {warning}")
    tracker = CampaignTracker(uri, config.experiment)
    key, parent = _open_campaign(config, tracker, new, log, joining=worker)
    if not worker:  # a worker cannot know whether a RUNNING run belongs to a live process: heartbeats decide
        closed = tracker.close_abandoned(parent, "its process stopped before ending the run (campaign resumed)")
        if closed:
            log(f"marked {len(closed)} run(s) left RUNNING by a stopped process as KILLED")
    result = _search(config, tracker, key, parent, log, retry_running=not worker) if "search" in phases else None
    if result is None:
        result = _read_search(config, key)
    figures = _search_figures(result)
    tracker.log_files(parent, {"search_results.md": result.to_markdown()})
    tracker.set_tags(parent, {f"{TAG}phase": "promote"})
    metric = f"val/{config.promote.metric}"  # the gate: full-budget validation; test is reported, never chosen on
    campaign = CampaignResult(key, parent, uri, config.experiment, config.model_name, result, gate_metric=metric)
    if "promote" in phases:
        rows = _candidates(result.rows, config.promote.top_k, config.promote.baseline)
        if not rows and config.promote.top_k + int(config.promote.baseline) > 0:
            reasons = [r.reason for r in result.rows if r.reason]
            raise ConfigError(f"campaign {key}: no trial completed, nothing to promote"
                              + (f" (first failure: {reasons[0]})" if reasons else ""))
        campaign.promoted = [_promote_one(config, tracker, key, parent, row, log) for row in rows]
        _register(config, tracker, campaign.promoted, metric, log)
        from .registry import champion

        current = champion(tracker.client, config.model_name)
        if current is not None:
            campaign.champion_version = str(current.version)
            labels = {p.version: p.label for p in campaign.promoted}
            named = current.tags.get(f"{TAG}named_loss", "none")
            campaign.champion_label = labels.get(str(current.version), named if named != "none" else "a searched spec")
        tracker.set_tags(parent, {f"{TAG}phase": "done"})
        test = f"test/{config.promote.metric}"
        best = max((p.metrics.get(metric, -math.inf) for p in campaign.promoted), default=-math.inf)
        tracker.end_search(parent, campaign.summary(), figures,
                           {"best_proxy_reward": (result.best.reward if result.best else math.nan),
                            "best_promoted_" + metric: best,
                            "champion_" + test: next((p.metrics.get(test, math.nan) for p in campaign.promoted
                                                      if p.became_champion), math.nan)})
    else:
        tracker.log_files(parent, figure_files(figures))
    return campaign


def _read_search(config: CampaignConfig, key: str) -> SearchResult:
    import optuna

    from marginsearch.searchspace.results import rows_of

    space = load_space(config.search.space)
    try:
        study = optuna.load_study(study_name=key, storage=storage_url(config))
    except KeyError:
        raise ConfigError(f"campaign {key} has no search in {storage_url(config)}; "
                          "run `marginsearch search` first") from None
    return SearchResult(rows_of(study, space), config.search.backend, key, storage_url(config), study)

