"""MLflow tracking of a search campaign: one parent run per search, one nested run per trial, promoted models.

Every call goes through an explicit `mlflow.MlflowClient` and run id, never the fluent active-run
stack, so trials can log from Ray workers and separate processes. One owner per run: the
coordinator owns the search run, each trial's process owns its trial run and reopens it (by its
trial key) when the trial is retried or restored. Tracking URIs are absolute (Ray workers chdir).

Run states: complete → FINISHED, pruned → KILLED, failed → FAILED, with the state and the reason
also kept as tags (`marginsearch.state`, `marginsearch.reason`). A run's spec is recorded once in
each of two forms: its flat fields as params (`spec.target.m2_rad` …, the names `MarginSpec.flat()`
prints, as in space files and `--set`) and the exact copy as the artifact `spec.json`.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from torch import nn

from marginsearch.losses import MarginSpec, identify
from marginsearch.losses.errors import MarginsearchError
from marginsearch.searchspace.search import write_ahead_log

from .figures import target_logit_png
from .images import Preprocess

__all__ = ["TrackingError", "CampaignTracker", "TrialRun", "STATES", "STOP_EXCEPTIONS", "TAG", "resolve_tracking_uri",
           "check_tracking_uri", "log_embedding_model", "target_logit_png", "load_mlflow_model", "load_any_model",
           "preprocess_from_params"]


class TrackingError(MarginsearchError):
    """A tracking URI, run or argument the tracking layer cannot use."""


# Trial end states and the MLflow run status each one ends in.
STATES: dict[str, str] = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "abandoned": "KILLED"}

# Exceptions that end a trial run in a state other than "failed", by qualified class name (no imports).
STOP_EXCEPTIONS: dict[str, str] = {"optuna.exceptions.TrialPruned": "pruned",
                                   "builtins.KeyboardInterrupt": "abandoned"}  # SIGINT / SIGTERM: KILLED, retried

TAG = "marginsearch."          # prefix of every tag this module writes
FLUSH_EVERY_S = 5.0            # a trial run writes its queued epoch metrics at most this long after the last write
PARENT_TAG = "mlflow.parentRunId"
OPTUNA_TRIAL_TAG = "optuna.trial_number"   # on each trial run: the Optuna trial it records
OPTUNA_STUDY_TAG = "optuna.study"          # on the campaign and trial runs: the Optuna study name
OPTUNA_STORAGE_TAG = "optuna.storage"      # on the campaign run: where the study lives (absolute)
MLFLOW_RUN_ATTR = "mlflow_run_id"          # Optuna trial user attr: the MLflow run that records it
HEALTH_TIMEOUT_S = 3.0
def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike) -> str:
    """An absolute tracking URI: None → sqlite:////<workdir>/mlflow.db; relative sqlite/file paths → under `workdir`."""
    base = Path(workdir).absolute()
    if uri is None:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path in ("", ":memory:") or os.path.isabs(path):
            return uri
        return f"sqlite:///{base / path}{sep}{query}"
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        path = path[2:] if path.startswith("//") else path
        return uri if os.path.isabs(path) else (base / path).as_uri()
    if "://" not in uri:  # a plain path: a .db file is a SQLite store, anything else a file store
        path = base / uri
        return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()
    return uri


# what MLflow 3 stores accept: a path, file:, sqlite/postgresql/mysql/mssql, an http(s) server, Databricks
TRACKING_SCHEMES = frozenset({"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                              "databricks-uc", "uc"})


def check_tracking_uri(uri: str) -> None:
    """TrackingError at once if an http(s) server is silent for 3 s or a sqlite/file store's folder is missing."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme.split("+")[0] not in TRACKING_SCHEMES:  # a SQLAlchemy driver suffix (postgresql+psycopg2) is fine
        raise TrackingError(f"tracking URI {uri}: unknown scheme {scheme!r}; use one of "
                            + ", ".join(sorted(s for s in TRACKING_SCHEMES if s)))
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
                return
        except urllib.error.HTTPError:
            return  # the server answered (an auth wall or a proxy still means it is up)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"tracking server {uri} is unreachable ({reason}); start it (mlflow server ...) "
                                f"or use a sqlite://// URI") from None
    for prefix in ("sqlite:///", "file:"):
        if not uri.startswith(prefix):
            continue
        path = uri[len(prefix):].partition("?")[0]
        path = path[2:] if prefix == "file:" and path.startswith("//") else path
        if path in ("", ":memory:"):
            return
        if not os.path.isabs(path):
            raise TrackingError(f"tracking URI {uri} is relative; pass resolve_tracking_uri(uri, workdir)")
        if not Path(path).parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {Path(path).parent} does not exist")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings → dotted keys; values as strings cut to MLflow's param limit."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return out


def _tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VAL_LENGTH]


def _literal(value: str) -> str:
    """A quoted literal for an MLflow filter string."""
    if "'" in value:
        raise TrackingError(f"search value {value!r} contains a single quote")
    return f"'{value}'"


def _png(figure: Any) -> bytes:
    """PNG bytes of a matplotlib Figure (or bytes unchanged)."""
    if isinstance(figure, (bytes, bytearray)):
        return bytes(figure)
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def figure_files(figures: Mapping[str, Any]) -> dict[str, bytes]:
    """Artifact files figures/<name>.png of matplotlib Figures (or PNG bytes), for `log_files`."""
    return {f"figures/{name if name.endswith('.png') else name + '.png'}": _png(figure)
            for name, figure in figures.items()}


def _local_folder(artifact_uri: str) -> Path | None:
    """The folder of a local artifact URI (file: on this host, or an absolute path), None for any other."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" and os.path.isabs(artifact_uri) else None


def _write_files(folder: Path, files: Mapping[str, str | bytes]) -> None:
    """Each name → text/bytes as a file under `folder` (sub-folders made)."""
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else str(content).encode())


class TrialRun:
    """One run this process owns: log per-epoch metrics, then finish it; as a context manager exceptions end it too.

    `exit_state` is the state a `SystemExit` (Ray Tune stopping the trial) ends the run in: "pruned"
    unless the caller sets it to "complete" before its last report.
    """

    def __init__(self, client: mlflow.MlflowClient, run_id: str, resumed: bool = False,
                 flush_every_s: float = FLUSH_EVERY_S, params: Sequence[Param] = ()) -> None:
        self.client = client
        self.run_id = run_id
        self.resumed = resumed
        self.exit_state = "pruned"
        self.state: str | None = None
        self.flush_every_s = flush_every_s
        self._last_step = 0
        self._pending: list[tuple[int, Mapping[str, float]]] = []
        self._params = list(params)  # a new run's params ride with its first write
        self._written = time.monotonic()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queue one epoch's metrics; they are written (one batch for all queued epochs) once `flush_every_s` has
        passed since the last write, and at `finish`: a trial of cheap epochs costs one write, a slow one shows
        each epoch as it ends. NaN/inf values are kept out of the history and noted as tags."""
        self._last_step = int(epoch)
        self._pending.append((int(epoch), dict(metrics)))
        if time.monotonic() - self._written >= self.flush_every_s:
            self.flush()

    def flush(self, tags: Sequence[RunTag] = (), final: Mapping[str, float] | None = None) -> None:
        """Write the queued epochs (plus `final` metrics at the last step and `tags`) in as few batches as MLflow
        allows."""
        steps = self._pending + ([(self._last_step, final)] if final else [])
        if steps or tags or self._params:
            _log_steps(self.client, self.run_id, steps, tags, self._params)
        self._pending, self._params, self._written = [], [], time.monotonic()

    def finish(self, state: str, reason: str = "", reward: float | None = None) -> None:
        """End the run: complete → FINISHED, pruned → KILLED, failed → FAILED; a second call is ignored."""
        if state not in STATES:
            raise TrackingError(f"unknown trial state {state!r}; choose one of {sorted(STATES)}")
        if self.state is not None:
            return
        tags = [RunTag(f"{TAG}state", state), RunTag(f"{TAG}reason", _tag_value(reason))]
        self.flush(tags, None if reward is None else {"reward": reward})
        self.client.set_terminated(self.run_id, STATES[state])
        self.state = state

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        """Finish by how the block ended (SystemExit → exit_state, pruning → pruned, else failed); never swallows."""
        if exc is None:
            self.finish("complete")
        elif isinstance(exc, SystemExit):
            self.finish(self.exit_state, f"stopped by the scheduler (SystemExit {exc.code})")
        else:
            names = [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]
            state = next((STOP_EXCEPTIONS[n] for n in names if n in STOP_EXCEPTIONS), "failed")
            self.finish(state, f"{type(exc).__name__}: {exc}")
        return False


_NAME_SWAPS = (("@", "_at_"), ("=", "_"), ("<", "_lt_"), (">", "_gt_"), ("±", "_pm_"))


def mlflow_name(name: str) -> str:
    """An evaluator metric name as MLflow accepts it: 'tar@far=1e-3' → 'tar_at_far_1e-3'."""
    for old, new in _NAME_SWAPS:
        name = name.replace(old, new)
    return name


def _log_metrics(client: mlflow.MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                 tags: Sequence[RunTag] = ()) -> None:
    """Finite metrics and `tags` in one `log_batch` (more only past MLflow's limits); a non-finite value becomes tag
    marginsearch.nonfinite.<key>."""
    _log_steps(client, run_id, [(step, metrics)], tags)


def _log_steps(client: mlflow.MlflowClient, run_id: str, steps: Sequence[tuple[int, Mapping[str, float]]],
               tags: Sequence[RunTag] = (), params: Sequence[Param] = ()) -> None:
    """`_log_metrics` for several steps at once: (step, metrics) pairs, in order, with `params`, in as few
    `log_batch` calls as MLflow's limits allow (a later step's non-finite tag replaces an earlier one's)."""
    stamp = int(time.time() * 1000)
    by_step: dict[tuple[str, int], Metric] = {}  # one value per (key, step): a later one replaces an earlier one
    nonfinite: dict[str, str] = {}
    for step, metrics in steps:
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                by_step[(mlflow_name(key), step)] = Metric(mlflow_name(key), value, stamp, step)
            else:
                nonfinite[f"{TAG}nonfinite.{mlflow_name(key)}"] = f"{value} at step {step}"
    finite = list(by_step.values())
    labels = [*tags, *(RunTag(k, v) for k, v in nonfinite.items())]
    fresh = list(params)
    while finite or labels or fresh:
        param_part, fresh = fresh[:MAX_PARAMS_TAGS_PER_BATCH], fresh[MAX_PARAMS_TAGS_PER_BATCH:]
        tag_room = MAX_PARAMS_TAGS_PER_BATCH - len(param_part)  # params and tags share MLflow's per-batch limit
        tag_part, labels = labels[:tag_room], labels[tag_room:]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(tag_part) - len(param_part))
        metric_part, finite = finite[:room], finite[room:]
        client.log_batch(run_id, metrics=metric_part, params=param_part, tags=tag_part)


@dataclass
class _Opened:
    """A trial run this tracker opened or reopened: its id and the name and tags it set (from its caller)."""

    run_id: str
    name: str
    tags: dict[str, str]


class CampaignTracker:
    """The MLflow experiment of one campaign (created on first use) and the runs in it.

    It remembers the trial runs it opened (by parent run and trial key), so the process that ran a
    trial labels its run without searching for it; a tracker rebuilt elsewhere (a Ray worker, a
    resumed campaign) starts with no memory and searches.
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        if not experiment_name:
            raise TrackingError("experiment name must not be empty")
        check_tracking_uri(tracking_uri)
        write_ahead_log(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        # the registry lives in the same store: never the process-wide registry URI another caller may have set
        self.client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._experiment_id()
        self._opened: dict[tuple[str, str], _Opened] = {}

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickles as (URI, name), so a Ray worker rebuilds its own client."""
        return CampaignTracker, (self.tracking_uri, self.experiment_name)

    def _experiment_id(self) -> str:
        """Get, restore or create the experiment; SQLite stores keep artifacts in mlartifacts/ beside the db."""
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri[len("sqlite:///"):].partition("?")[0])
                location = (db.parent / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(self.experiment_name, artifact_location=location)
            except MlflowException:  # another process created it first
                found = self.client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    raise TrackingError(f"cannot create experiment {self.experiment_name!r} "
                                        f"at {self.tracking_uri}") from None
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    # ------------------------------------------------------------------ helpers
    def runs(self, filters: Mapping[str, str]) -> list[Any]:
        """All active runs of the experiment whose tags/attributes equal `filters` (keys such as tags.`name`), newest
        first."""
        return self._search(filters)

    def _search(self, filters: Mapping[str, str]) -> list[Any]:
        """All active runs of the experiment whose tags/attributes equal `filters`, newest first."""
        clauses = " and ".join(f"{key} = {_literal(value)}" for key, value in filters.items())
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], clauses, max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log_params(self, run_id: str, params: Mapping[str, str], logged: Mapping[str, str] | None = None) -> None:
        """Log params absent from the run (MLflow refuses to change one); changed values are noted in a tag.

        `logged`: the run's params as the caller last read them ({} for a run it just created); None reads them.
        """
        logged = self.client.get_run(run_id).data.params if logged is None else logged
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        for i in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=fresh[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            self.client.set_tag(run_id, f"{TAG}changed_params", _tag_value(", ".join(changed)))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on any run in one batch."""
        self._set_tags(run_id, tags)

    def _set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_files(self, run_id: str, files: Mapping[str, str | bytes], artifact_uri: str | None = None) -> None:
        """Write each name → text/bytes as an artifact file (names may hold sub-folders), in one upload.

        `artifact_uri`: the run's, when the caller has it (`create_run` returns it); a local one
        (file: or a path, as beside a SQLite store) is written straight into, as MLflow's local
        artifact repository would, without the run read that finding it costs.
        """
        for name in files:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise TrackingError(f"artifact name {name!r} must be a relative path inside the run")
        folder = _local_folder(artifact_uri) if artifact_uri else None
        if folder is not None:
            _write_files(folder, files)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _write_files(Path(tmp), files)
            self.client.log_artifacts(run_id, tmp)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics on any run (search progress, say) in one batch; non-finite values become tags."""
        _log_metrics(self.client, run_id, metrics, step)

    # ------------------------------------------------------------------ search (parent) runs
    def label_trial_run(self, parent_run_id: str, trial_key: str, number: int, study_name: str, label: str) -> None:
        """Name a trial run `trial <number> · <label>` and tag it with its Optuna trial and study (any backend, from
        the driver).

        A run this tracker opened with that name and those tags already is left alone; one it opened
        otherwise is updated by id; any other is searched for by trial key.
        """
        name = f"trial {number} · {label}"
        tags = {OPTUNA_TRIAL_TAG: _tag_value(number), OPTUNA_STUDY_TAG: _tag_value(study_name)}
        opened = self._opened.get((parent_run_id, trial_key))
        if opened is not None:
            if opened.name == name and all(opened.tags.get(k) == v for k, v in tags.items()):
                return
            run_ids = [opened.run_id]
        else:
            runs = self._search({f"tags.`{PARENT_TAG}`": parent_run_id, f"tags.`{TAG}trial_key`": trial_key})
            run_ids = [run.info.run_id for run in runs[:1]]
        for run_id in run_ids:
            self.client.update_run(run_id, name=name)
            self._set_tags(run_id, tags)
            if opened is not None:
                opened.name, opened.tags = name, {**opened.tags, **tags}

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The newest active run whose tags equal all of `tags`, or None."""
        runs = self._search({f"tags.`{k}`": str(v) for k, v in tags.items()})
        return runs[0].info.run_id if runs else None

    def start_search(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                     artifacts: Mapping[str, str | bytes], resume_key: str | None = None) -> str:
        """Open the campaign's parent run, or with `resume_key` reopen the run tagged with it (RUNNING again)."""
        key_tags = {f"{TAG}campaign_key": resume_key} if resume_key else {}
        run_id = self.find_run({**key_tags, f"{TAG}kind": "search"}) if resume_key else None
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={**{k: _tag_value(v) for k, v in tags.items()}, **key_tags,
                                               f"{TAG}kind": "search"})
            run_id = run.info.run_id
        else:
            resumed = int(self.client.get_run(run_id).data.tags.get(f"{TAG}resumed", "0")) + 1
            self.client.update_run(run_id, status="RUNNING")
            self._set_tags(run_id, {**tags, f"{TAG}resumed": resumed})
        self._log_params(run_id, _flatten(params))
        if artifacts:
            self.log_files(run_id, artifacts)
        return run_id

    def end_search(self, parent_run_id: str, table_markdown: str, figures: Mapping[str, Any],
                   metrics: Mapping[str, float]) -> None:
        """Log the results table (results.md), figures (figures/<name>.png) and final metrics; end FINISHED."""
        self.log_files(parent_run_id, {"results.md": table_markdown, **figure_files(figures)})
        _log_metrics(self.client, parent_run_id, metrics, 0)
        self.client.set_terminated(parent_run_id, "FINISHED")

    def close_abandoned(self, parent_run_id: str,
                        reason: str = "its worker stopped before ending the run") -> list[str]:
        """Mark child runs still RUNNING as KILLED (state "abandoned"); call only while no worker is logging."""
        runs = self._search({f"tags.`{PARENT_TAG}`": parent_run_id, "attributes.status": "RUNNING"})
        for run in runs:
            TrialRun(self.client, run.info.run_id).finish("abandoned", reason)
        return [run.info.run_id for run in runs]

    # ------------------------------------------------------------------ trial (nested) runs
    def trial_run(self, parent_run_id: str, trial_key: str, spec: MarginSpec, params: Mapping[str, Any],
                  tags: Mapping[str, Any], run_name: str | None = None, *, run_id: str | None = None,
                  new: bool = False) -> TrialRun:
        """Open the trial's nested run (named `run_name`, else after its key), or reopen the one with the same trial
        key.

        The earlier run is looked for in turn: `run_id` (the run the caller's records name, such as a
        retried Optuna trial's `mlflow_run_id`) if it holds this trial key; with `new` (the caller
        knows the trial never ran before) only among the runs this tracker opened; else by a search
        of the experiment for the trial key.
        """
        found = self._earlier_run(parent_run_id, trial_key, run_id, new)
        loss = identify(spec) or "none"
        all_params = {**_flatten(spec.flat(), "spec."), **_flatten(params)}
        fresh: list[Param] = []
        if found is not None:
            run_id = found.info.run_id
            reopened = int(found.data.tags.get(f"{TAG}reopened", "0")) + 1
            self.client.update_run(run_id, status="RUNNING", name=run_name)
            self._set_tags(run_id, {**tags, f"{TAG}reopened": reopened})
            self._log_params(run_id, all_params, found.data.params)
            name = run_name or found.info.run_name
        else:
            name = run_name or f"trial {trial_key}"
            run = self.client.create_run(self.experiment_id, run_name=name, tags={
                **{k: _tag_value(v) for k, v in tags.items()}, PARENT_TAG: parent_run_id,
                f"{TAG}trial_key": trial_key, f"{TAG}kind": "trial", f"{TAG}named_loss": loss})
            run_id = run.info.run_id
            fresh = [Param(k, v) for k, v in all_params.items()]  # written with the run's first batch
            self.log_files(run_id, {"spec.json": json.dumps(spec.to_dict(), indent=2),
                                    "target_logit.png": target_logit_png(spec, loss if loss != "none" else "trial")},
                           run.info.artifact_uri)
        self._opened[(parent_run_id, trial_key)] = _Opened(run_id, name, {k: _tag_value(v) for k, v in tags.items()})
        return TrialRun(self.client, run_id, resumed=found is not None, params=fresh)

    def _earlier_run(self, parent_run_id: str, trial_key: str, run_id: str | None, new: bool) -> Run | None:
        """The active run of this trial key, if any (see `trial_run` for where it is looked for)."""
        if run_id and (run := self._trial_run_by_id(run_id, parent_run_id, trial_key)) is not None:
            return run
        if new:
            opened = self._opened.get((parent_run_id, trial_key))
            return None if opened is None else self._trial_run_by_id(opened.run_id, parent_run_id, trial_key)
        found = self._search({f"tags.`{PARENT_TAG}`": parent_run_id, f"tags.`{TAG}trial_key`": trial_key})
        return found[0] if found else None

    def _trial_run_by_id(self, run_id: str, parent_run_id: str, trial_key: str) -> Run | None:
        """The run `run_id` if it is active and records this trial key under this parent, else None."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        tags = run.data.tags
        if (run.info.lifecycle_stage != "active" or tags.get(PARENT_TAG) != parent_run_id
                or tags.get(f"{TAG}trial_key") != trial_key):
            return None
        return run

    # ------------------------------------------------------------------ promoted models
    def log_promoted(self, parent_run_id: str, trial_run_id: str, spec: MarginSpec, metrics: Mapping[str, float],
                     model: nn.Module, preprocess: Preprocess | None, name: str,
                     params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str:
        """A finished run holding a promoted model (MLflow pt2, loads without marginsearch), linked to its trial run.

        `preprocess`: how its images are prepared (None: the model's own); logged as params preprocess.* too.
        """
        preprocess = preprocess or _own_preprocess(model)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **{k: _tag_value(v) for k, v in (tags or {}).items()},
            PARENT_TAG: parent_run_id, f"{TAG}trial_run_id": trial_run_id, f"{TAG}kind": "promoted",
            f"{TAG}named_loss": identify(spec) or "none"})
        with TrialRun(self.client, run.info.run_id) as promoted:
            self._log_params(promoted.run_id, {**_flatten(spec.flat(), "spec."), **_flatten(params or {}),
                                               **_flatten(_preprocess_params(preprocess), "preprocess.")})
            promoted.log_epoch(0, metrics)
            self.log_files(promoted.run_id, {"spec.json": json.dumps(spec.to_dict(), indent=2)})
            log_embedding_model(self.client, self.experiment_id, promoted.run_id, model, preprocess,
                                {"spec": spec.to_dict(), "trial_run_id": trial_run_id})
        return run.info.run_id


def _preprocess_params(preprocess: Preprocess) -> dict[str, Any]:
    """The run params that say how a promoted model's images are prepared."""
    return {"height": preprocess.height, "width": preprocess.width, "fit": preprocess.fit}


def preprocess_from_params(params: Mapping[str, str]) -> Preprocess | None:
    """The `Preprocess` a promoted run's params record (preprocess.*), or None for a run logged before them."""
    try:
        return Preprocess(int(params["preprocess.height"]), int(params["preprocess.width"]),
                          params.get("preprocess.fit", "resize"))
    except (KeyError, ValueError):
        return None


def _own_preprocess(model: nn.Module) -> Preprocess:
    """The model's recorded `Preprocess`, else its backbone's input size stretched (`export.own_preprocess`)."""
    from .export import own_preprocess

    return own_preprocess(model)


def log_embedding_model(client: mlflow.MlflowClient, experiment_id: str, run_id: str, model: nn.Module,
                        preprocess: Preprocess | None = None, extra: Mapping[str, Any] | None = None,
                        name: str = "model") -> str:
    """Log images [B,3,H,W] in [−1,1] → embeddings [B,D] as an MLflow LoggedModel `name` of the run (torch.export
    pt2); its id.

    The client-side equivalent of `mlflow.pytorch.log_model`, which reads the global tracking URI
    and experiment: pt2 loads back as a GraphModule without marginsearch and without pickle, with
    a dynamic batch dimension (the example batch is 2), an explicit signature (-1, 3, H, W) and
    requirements. `preprocess` (None: the model's own) sets H×W and is recorded in the model's
    metadata twice: as "preprocess" (what `Preprocess.from_dict` reads, for users) and inside the
    "marginsearch" description (`describe`, what `load_mlflow_model` reads).
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from .export import describe

    preprocess = preprocess or _own_preprocess(model)
    height, width = preprocess.size
    model = copy.deepcopy(model).cpu().eval()
    example = np.random.default_rng(0).uniform(-1.0, 1.0, (2, 3, height, width)).astype(np.float32)
    meta = describe(model, preprocess, extra)
    dim = int(meta["output"]["shape"][1])
    # unnamed tensor specs: pyfunc (and `mlflow models serve`) then pass the ndarray itself to the model,
    # where a named spec would make a dict, which the PyTorch flavour refuses
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, height, width))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="embedding")
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        card = Model(run_id=run_id, model_id=logged.model_id, model_uuid=logged.model_id,
                     artifact_path=logged.artifact_location)
        with warnings.catch_warnings():  # torch.export's note about tensors shared in a group: weights are on CPU here
            warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
            mlflow.pytorch.save_model(model, path, signature=signature, input_example=example, mlflow_model=card,
                                      pip_requirements=requirements, serialization_format="pt2",
                                      metadata={"preprocess": preprocess.to_dict(), "marginsearch": meta})
        client.log_model_artifacts(logged.model_id, path)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def load_mlflow_model(uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A logged or registered model (`models:/name@champion`, `models:/name/3`, `runs:/<id>/model`) and its description.

    `tracking_uri` names the store (None: ./mlflow.db). The description is the one logged with the
    model (input shape, preprocess, normalisation, spec). Its `Preprocess` is set on the module as
    `preprocess`, so the judge prepares images of any size as training did; a model logged before
    "preprocess" was recorded gets a square stretched to its described input shape, else to its
    signature's (H, W).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from .export import recorded_preprocess
    from .stores import check_sqlite_file, sqlite_path

    store = resolve_tracking_uri(tracking_uri, Path.cwd())
    check_tracking_uri(store)
    if (path := sqlite_path(store)) is not None:
        if not path.is_file():
            raise TrackingError(f"{uri}: the MLflow store {path} does not exist (pass --tracking-uri)")
        check_sqlite_file(path, "MLflow store")
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        model = mlflow.pytorch.load_model(uri)
        card = Model.load(uri)
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"{uri}: cannot load from {store} ({str(exc).splitlines()[0]})") from None
    metadata = card.metadata or {}
    meta = dict(metadata.get("marginsearch") or {})
    if "preprocess" not in meta and isinstance(metadata.get("preprocess"), Mapping):
        meta["preprocess"] = metadata["preprocess"]
    if not meta.get("input") and card.signature is not None and card.signature.inputs is not None:
        shapes = [spec.shape for spec in card.signature.inputs.inputs if getattr(spec, "shape", None)]
        if shapes and len(shapes[0]) == 4:  # a model logged elsewhere: its signature's (-1, 3, H, W)
            meta["input"] = {"shape": ["batch", *(int(v) for v in shapes[0][1:])]}
    try:
        preprocess = recorded_preprocess(meta, uri)
    except MarginsearchError as exc:
        raise TrackingError(str(exc)) from None
    model.preprocess = preprocess
    meta["preprocess"] = preprocess.to_dict()
    return model, meta


def load_any_model(path_or_uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """`load_mlflow_model` for a models:/ or runs:/ URI, else `load_model` of a bundle or TorchScript file."""
    from .export import load_model

    if path_or_uri.startswith(("models:/", "runs:/")):
        return load_mlflow_model(path_or_uri, tracking_uri)
    return load_model(path_or_uri)

