"""A campaign described by one TOML file: sections, their fields and defaults, validated with one-line errors.

    [campaign]  name, seed, workdir            where the stores and checkpoints live
    [data]      train, test, verification      data sources (see `trainers.sources`)
    [search]    space, backend, sampler, pruner, trials, population, baselines, storage, ray_address, ...
    [budget.proxy] / [budget.full]             fields of `trainers.budget.Budget` overriding the named budget
    [promote]   top_k, metric, model_name, baseline
    [tracking]  uri, experiment

Every field has a default, so an empty file (or none) is the demo campaign on the embedded
defaults. `override(config, {"search.trials": 20})` applies command-line `--set` assignments.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from marginsearch.losses.errors import MarginsearchError
from marginsearch.searchspace.options import DEFAULT_POPULATION

from .budget import BUDGETS, Budget, budget_from
from .sources import Split

__all__ = ["ConfigError", "CampaignConfig", "load_config", "override", "config_to_toml"]


class ConfigError(MarginsearchError):
    """A campaign config that cannot be used: unknown section or key, wrong type, bad value."""


@dataclass(frozen=True)
class CampaignSection:
    """Name (also the MLflow experiment and Optuna study prefix), seed and working directory."""

    name: str = "demo"
    seed: int = 0
    workdir: str = "."          # mlflow.db, optuna.db, mlartifacts/ and checkpoints/ go here (relative to the cwd)


@dataclass(frozen=True)
class DataSection:
    """Training source (validation identities give the reward), test source, extra verification sets."""

    train: str = "synthetic:demo"
    test: str = ""              # "" = the test split of a synthetic train source
    verification: tuple[str, ...] = ()   # e.g. ["bin:/data/lfw.bin", "pairs:/data/pairs.txt@/data/lfw"]
    # folder and RecordIO train sources (`sources.Split`): identity names (folder names or label numbers), as a
    # list or a file with one name per line
    identities: tuple[str, ...] | str = ()   # train and validate on these identities only; () = all
    val_fraction: float = 0.1                # validation: the last fraction of the identities in name order ...
    val_identities: tuple[str, ...] | str = ()  # ... or these identities ...
    val: str = ""                            # ... or a separate imagefolder:/recordio: source

    @property
    def split(self) -> Split | None:
        """The identity split of a folder or RecordIO train source; None: the source's own (synthetic)."""
        split = Split(self.identities, self.val_fraction, self.val_identities, self.val)
        return None if split == Split() else split


@dataclass(frozen=True)
class SearchSection:
    """What is searched, by which backend and sampler, with how many trials."""

    space: str = "margin"                  # a built-in space name or a path to a space TOML file
    backend: str = "optuna"                # "optuna" or "ray"
    sampler: str = "reward-guided"         # reward-guided, tpe, cmaes, random, grid-named
    pruner: str = "median"                 # none, median, hyperband (ASHA under Ray)
    trials: int = 12                       # sampled trials, named baselines not counted
    population: int = DEFAULT_POPULATION   # reward-guided: candidates per policy round
    # named losses, or a named loss with flat spec fields changed ("name:field=value,...") to the flavour the
    # space holds: the margin space has the ArcFace fallback guard, insightface's combined margin has none
    baselines: tuple[str, ...] = ("normface", "cosface", "arcface", "combined:target.guard=fallback")
    storage: str = ""                      # "" = sqlite:///<workdir>/optuna.db; any SQLAlchemy URL or journal:<path>
    ray_address: str = ""                  # "" = a local Ray; "auto", "host:6379" or "ray://host:10001"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class PromoteSection:
    """How many searched candidates get the full budget, judged by which test metric, registered under which name."""

    top_k: int = 2
    metric: str = "tar@far=1e-3"
    model_name: str = ""                   # "" = marginsearch-<campaign name>
    baseline: bool = True                  # also promote the best named baseline, for comparison


@dataclass(frozen=True)
class TrackingSection:
    """MLflow tracking server or store; "" = sqlite:///<workdir>/mlflow.db."""

    uri: str = ""
    experiment: str = ""                   # "" = marginsearch-<campaign name>


@dataclass(frozen=True)
class CampaignConfig:
    """The whole campaign: its sections and the proxy and full budgets."""

    campaign: CampaignSection = field(default_factory=CampaignSection)
    data: DataSection = field(default_factory=DataSection)
    search: SearchSection = field(default_factory=SearchSection)
    promote: PromoteSection = field(default_factory=PromoteSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    budget: Mapping[str, Budget] = field(default_factory=lambda: dict(BUDGETS))

    @property
    def model_name(self) -> str:
        return self.promote.model_name or f"marginsearch-{self.campaign.name}"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"marginsearch-{self.campaign.name}"

    @property
    def workdir(self) -> Path:
        return Path(self.campaign.workdir).expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the TOML structure), for tracking and `config_to_toml`."""
        out: dict[str, Any] = {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}
        out["budget"] = {k: _plain(dataclasses.asdict(b)) for k, b in self.budget.items()}
        return out


SECTIONS: dict[str, type] = {"campaign": CampaignSection, "data": DataSection, "search": SearchSection,
                             "promote": PromoteSection, "tracking": TrackingSection}


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v is not None}


_LIST_OR_FILE = ("data.identities", "data.val_identities")  # a list of strings, or a file of them


def _coerce(where: str, value: Any, default: Any) -> Any:
    """`value` checked against the type of the field's default (ints are accepted for floats, lists become tuples)."""
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, tuple) and where in _LIST_OR_FILE and isinstance(value, str):
        return value  # the name of a file holding the list
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _section(name: str, cls: type, values: Any, base: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    changes = {k: _coerce(f"{name}.{k}", v, getattr(base, k)) for k, v in values.items()}
    return dataclasses.replace(base, **changes)


def _budgets(values: Any, base: Mapping[str, Budget]) -> dict[str, Budget]:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[budget] must hold tables [budget.proxy] and [budget.full], got {values!r}")
    unknown = sorted(set(values) - set(base))
    if unknown:
        raise ConfigError(f"[budget]: unknown budget(s) {', '.join(unknown)}; known: {', '.join(base)}")
    out = dict(base)
    for name, fields in values.items():
        if not isinstance(fields, Mapping):
            raise ConfigError(f"[budget.{name}] must be a table, got {fields!r}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        try:
            out[name] = budget_from(base[name], **fields)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[budget.{name}]: {str(exc).splitlines()[0]}") from None
    return out


def _validate(config: CampaignConfig) -> CampaignConfig:
    s, p = config.search, config.promote
    checks = [
        (s.backend in ("optuna", "ray"), f"search.backend must be 'optuna' or 'ray', got {s.backend!r}"),
        (s.trials >= 0, f"search.trials must be ≥ 0, got {s.trials}"),
        (s.population >= 2, f"search.population must be ≥ 2, got {s.population}"),
        (s.cpus_per_trial > 0, f"search.cpus_per_trial must be > 0, got {s.cpus_per_trial}"),
        (s.gpus_per_trial >= 0, f"search.gpus_per_trial must be ≥ 0, got {s.gpus_per_trial}"),
        (p.top_k >= 0, f"promote.top_k must be ≥ 0, got {p.top_k}"),
        (0 < config.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {config.data.val_fraction}"),
        (bool(config.campaign.name.strip()), "campaign.name must not be empty"),
        (set(config.campaign.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."),
         f"campaign.name may hold letters, digits, '-', '_' and '.', got {config.campaign.name!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from marginsearch.losses import NAMED
    unknown = [b for b in s.baselines if b.partition(":")[0] not in NAMED]
    if unknown:
        raise ConfigError(f"search.baselines: unknown named loss(es) {', '.join(unknown)}; named: {', '.join(NAMED)}")
    from .judge import METRICS
    if p.metric not in METRICS:
        raise ConfigError(f"promote.metric: {p.metric!r} is not a metric of the judge; "
                          f"choose one of {', '.join(METRICS)}")
    from marginsearch.searchspace.space import baseline_spec
    for baseline in s.baselines:
        try:
            baseline_spec(baseline)
        except MarginsearchError as exc:
            raise ConfigError(f"search.baselines: {exc}") from None
    return config


def _from_mapping(data: Mapping[str, Any], base: CampaignConfig) -> CampaignConfig:
    unknown = sorted(set(data) - set(SECTIONS) - {"budget"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join([*SECTIONS, 'budget'])}")
    changes: dict[str, Any] = {name: _section(name, cls, data[name], getattr(base, name))
                               for name, cls in SECTIONS.items() if name in data}
    if "budget" in data:
        changes["budget"] = _budgets(data["budget"], base.budget)
    return _validate(dataclasses.replace(base, **changes))


def load_config(path: str | Path | None = None) -> CampaignConfig:
    """The campaign in a TOML file (None: the demo campaign on the embedded defaults)."""
    if path is None:
        return _validate(CampaignConfig())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({str(exc).splitlines()[0]})") from None
    try:
        return _from_mapping(data, CampaignConfig())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def override(config: CampaignConfig, assignments: Mapping[str, Any]) -> CampaignConfig:
    """Apply dotted assignments such as {"search.trials": 20, "budget.full.epochs": 4}."""
    nested: dict[str, Any] = {}
    for key, value in assignments.items():
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {key!r}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: conflicts with another assignment")
        node[parts[-1]] = value
    return _from_mapping(nested, config)


def config_to_toml(config: CampaignConfig) -> str:
    """The config as TOML text (logged with each campaign; loads back to an equal config)."""
    lines: list[str] = []

    def emit(table: str, values: Mapping[str, Any]) -> None:
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")

    d = config.to_dict()
    for name in SECTIONS:
        emit(name, d[name])
    for name, fields in d["budget"].items():
        emit(f"budget.{name}", fields)
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} as TOML")
