"""Model registry gate: register a promoted run's model, move the `champion` alias only when it wins.

Each version carries its lineage and the metric it was gated on as tags (`marginsearch.*`, `marginsearch.metric.<name>`)
and the gate's decision (`marginsearch.gate.*`); the decision is also tagged on the run. Gating is
idempotent: the same run gives the same version and, once decided, the same decision. An alias
only ever points at a version whose model loads and maps a zero batch to finite outputs. Gate
from one process (the campaign coordinator): two concurrent gates may both see the old champion.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from marginsearch.losses.errors import MarginsearchError

from .tracking import mlflow_name

__all__ = ["CHAMPION", "CHALLENGER", "GateResult", "RegistryError", "register_and_gate", "set_challenger",
           "champion", "verify_loads"]

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG = "marginsearch."
GATE = "marginsearch.gate."
METRIC = "marginsearch.metric."


class RegistryError(MarginsearchError):
    """A run, model or version the registry gate cannot use."""


@dataclass(frozen=True)
class GateResult:
    """What the gate did with one run's model version."""

    version: str
    became_champion: bool
    previous_champion_version: str | None
    previous_value: float | None
    reason: str


def _float_or_none(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def _ensure_registered_model(client: mlflow.MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, tags={f"{TAG}kind": "embedding"})
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise RegistryError(f"cannot create registered model {model_name!r}: {exc.message}") from None


def _existing_version(client: mlflow.MlflowClient, model_name: str, run_id: str,
                      artifact_path: str) -> ModelVersion | None:
    """The earliest version of `model_name` registered from this run's `artifact_path`, if any."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    mine = [v for v in versions if v.tags.get(f"{TAG}artifact_path", artifact_path) == artifact_path]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def _model_source(client: mlflow.MlflowClient, run_id: str, artifact_path: str) -> tuple[str, str | None]:
    """(artifact URI, logged model id) of the run's model `artifact_path`: a LoggedModel output, else run artifacts."""
    run = client.get_run(run_id)
    for output in (run.outputs.model_outputs if run.outputs else []):
        logged = client.get_logged_model(output.model_id)
        if logged.name == artifact_path:
            return logged.artifact_location, logged.model_id
    if any(f.path == f"{artifact_path}/MLmodel" for f in client.list_artifacts(run_id, artifact_path)):
        return f"{run.info.artifact_uri}/{artifact_path}", None
    raise RegistryError(f"run {run_id} has no model {artifact_path!r} (no logged model or {artifact_path}/MLmodel)")


def verify_loads(client: mlflow.MlflowClient, model_name: str, version: str) -> str | None:
    """None if the version's PyTorch model loads and maps a zero batch (batch 2) to finite outputs, else why not."""
    import mlflow.pytorch
    import torch
    from mlflow.models import Model

    try:
        uri = client.get_model_version_download_uri(model_name, version)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                        tracking_uri=client.tracking_uri)
            signature = Model.load(str(Path(local) / "MLmodel")).signature
            module = mlflow.pytorch.load_model(local)
        shape = [2 if d == -1 else d for d in signature.inputs.inputs[0].shape]
        with torch.no_grad():
            out = module(torch.zeros(shape))
        if out.shape[0] != 2 or not bool(torch.isfinite(out).all()):
            return f"outputs of shape {tuple(out.shape)} are not a finite batch of 2"
    except Exception as exc:  # any failure to load or run means the alias must not move
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def champion(client: mlflow.MlflowClient, model_name: str) -> ModelVersion | None:
    """The version the `champion` alias points at, or None."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _stored_result(version: ModelVersion) -> GateResult | None:
    """The decision an earlier gate call recorded on this version."""
    tags = version.tags
    if f"{GATE}became_champion" not in tags:
        return None
    return GateResult(str(version.version), tags[f"{GATE}became_champion"] == "true",
                      tags.get(f"{GATE}previous_champion_version") or None,
                      _float_or_none(tags.get(f"{GATE}previous_value")), tags.get(f"{GATE}reason", ""))


def _decide(client: mlflow.MlflowClient, model_name: str, version: str, metric_name: str, value: float,
            higher_is_better: bool) -> GateResult:
    """Compare against the champion's stored metric; move the alias only for a strictly better, loadable model."""
    current = champion(client, model_name)
    prev_version = str(current.version) if current else None
    prev_value = _float_or_none(current.tags.get(f"{METRIC}{mlflow_name(metric_name)}")) if current else None
    shown = "no value" if prev_value is None else f"{prev_value:.6g}"
    against = f"champion v{prev_version} ({shown}, {'higher' if higher_is_better else 'lower'} is better)"

    def result(moved: bool, reason: str) -> GateResult:
        return GateResult(version, moved, prev_version, prev_value, reason)

    if current is not None and prev_version == version:
        return result(True, "already the champion")
    if not math.isfinite(value):
        return result(False, f"{metric_name} = {value} is not finite")
    if current is not None:
        if prev_value is None:
            return result(False, f"champion v{prev_version} has no stored {metric_name}; alias left to a person")
        better = value > prev_value if higher_is_better else value < prev_value
        if not better:
            return result(False, f"{metric_name} {value:.6g} does not beat {against}")
    problem = verify_loads(client, model_name, version)
    if problem is not None:
        return result(False, f"model does not load: {problem}")
    client.set_registered_model_alias(model_name, CHAMPION, version)
    if current is None:
        return result(True, f"first champion ({metric_name} {value:.6g})")
    return result(True, f"{metric_name} {value:.6g} beats {against}")


def register_and_gate(client: mlflow.MlflowClient, model_name: str, run_id: str, metric_name: str, metric_value: float,
                      higher_is_better: bool = True, artifact_path: str = "model", description: str = "") -> GateResult:
    """Register the run's model as a version of `model_name` (reused if registered) and move `champion` if it wins."""
    _ensure_registered_model(client, model_name)
    existing = _existing_version(client, model_name, run_id, artifact_path)
    if existing is not None and (stored := _stored_result(existing)) is not None:
        return stored
    run = client.get_run(run_id)
    if existing is None:
        source, model_id = _model_source(client, run_id, artifact_path)
        existing = client.create_model_version(model_name, source, run_id=run_id, model_id=model_id,
                                               tags={f"{TAG}artifact_path": artifact_path},
                                               description=description or None)
    version = str(existing.version)
    lineage: dict[str, Any] = {k: v for k, v in run.data.tags.items()
                               if k.startswith(TAG) and not k.startswith((GATE, f"{TAG}nonfinite."))}
    # the run keeps every metric; the version carries the one it was gated on (and its lineage), not 20 copies
    lineage.update({f"{TAG}search_run_id": run.data.tags.get("mlflow.parentRunId", ""),
                    f"{METRIC}{mlflow_name(metric_name)}": repr(float(metric_value)), f"{GATE}metric": metric_name,
                    f"{GATE}higher_is_better": str(higher_is_better).lower()})
    for key, value in lineage.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    outcome = _decide(client, model_name, version, metric_name, float(metric_value), higher_is_better)
    decision = {"became_champion": str(outcome.became_champion).lower(),
                "previous_champion_version": outcome.previous_champion_version or "",
                "previous_value": "" if outcome.previous_value is None else repr(outcome.previous_value),
                "reason": outcome.reason}
    for key, value in decision.items():
        client.set_model_version_tag(model_name, version, f"{GATE}{key}", value)
    for key, value in {**decision, "model": model_name, "version": version}.items():
        client.set_tag(run_id, f"{GATE}{key}", value)
    return outcome


def set_challenger(client: mlflow.MlflowClient, model_name: str, version: str) -> None:
    """Point the `challenger` alias at `version`, after checking its model loads (RegistryError if not)."""
    problem = verify_loads(client, model_name, str(version))
    if problem is not None:
        raise RegistryError(f"{model_name} v{version}: model does not load ({problem}); challenger alias not moved")
    client.set_registered_model_alias(model_name, CHALLENGER, str(version))
