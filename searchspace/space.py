"""Search spaces as data: typed parameters, conditionals, and a declarative map from parameters to a `MarginSpec`.

A space is a TOML file (`searchspace/spaces/*.toml` for the built-ins; any path for your own):

    name = "margin"
    [fixed]                        # spec fields every point has (dotted paths, ``a[3]`` for tuple items)
    "target.kind" = "margin"
    [[fixed_when]]                 # spec fields set only while a condition holds
    when = { target = "arc" }
    values = { "target.guard" = "easy" }
    [[param]]
    name = "m2"                    # the Optuna parameter name
    type = "float"                 # float | log-float | int | categorical (choices = [...])
    low = 0.0
    high = 0.8
    default = 0.5                  # the sampler's starting mean; centre of the range if omitted
    sets = "target.m2_rad"         # the spec field it sets (categoricals may set nothing: pure switches)
    transform = "identity"         # a name of TRANSFORMS (field = f(x, spec fields))
    when = { mode = ["a", "b"] }   # active only while earlier categoricals take these values
    repeat = 10                    # expands into name/sets with {i} = 0..9

A union file (``[union] choice = "component"; members = [...]``) joins spaces under a categorical
choice; member parameters are renamed ``member/param``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import tomllib
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from marginsearch.losses import NAMED, MarginSpec, SpecError, identify, named
from marginsearch.losses.errors import MarginsearchError
from marginsearch.losses.spec import SLOTS

from .transforms import TRANSFORMS

__all__ = ["SpaceError", "Parameter", "Fixed", "SearchSpace", "load", "builtin_spaces", "SPACES_DIR", "with_fields",
           "baseline_spec"]

SPACES_DIR = Path(__file__).parent / "spaces"


class SpaceError(MarginsearchError):
    """A search space that cannot be loaded or used, or a spec / params it cannot express."""


Condition = tuple[tuple[str, tuple[Any, ...]], ...]  # AND over (categorical name, accepted values)


def _holds(when: Condition, values: Mapping[str, Any]) -> bool:
    return all(name in values and values[name] in accepted for name, accepted in when)


@dataclass(frozen=True)
class Parameter:
    """One searched parameter: its type and range (or choices), default, the spec field it sets and when it is
    active."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    default: Any = None
    sets: str | None = None
    transform: str = "identity"
    when: Condition = ()

    @property
    def log(self) -> bool:
        return self.type == "log-float"

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a numeric parameter (loading sets both for every non-categorical one)."""
        return cast(float, self.low), cast(float, self.high)

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution of this parameter."""
        return DISTRIBUTIONS[self.type](self)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether the parameter exists given the values of the categoricals it depends on."""
        return _holds(self.when, values)

    def contains(self, value: Any) -> bool:
        """Whether `value` is a legal value (in range, an integer for int, a choice for categorical)."""
        if self.type == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.bounds[0] <= value <= self.bounds[1]


DISTRIBUTIONS: dict[str, Callable[[Parameter], BaseDistribution]] = {
    "float": lambda p: FloatDistribution(*p.bounds),
    "log-float": lambda p: FloatDistribution(*p.bounds, log=True),
    "int": lambda p: IntDistribution(int(p.bounds[0]), int(p.bounds[1])),
    "categorical": lambda p: CategoricalDistribution(p.choices),
}

SUGGEST: dict[str, Callable[[Any, Parameter], Any]] = {
    "float": lambda trial, p: trial.suggest_float(name=p.name, low=p.low, high=p.high),
    "log-float": lambda trial, p: trial.suggest_float(name=p.name, low=p.low, high=p.high, log=True),
    "int": lambda trial, p: trial.suggest_int(name=p.name, low=int(p.bounds[0]), high=int(p.bounds[1])),
    "categorical": lambda trial, p: trial.suggest_categorical(name=p.name, choices=list(p.choices)),
}

DEFAULTS: dict[str, Callable[[Parameter], Any]] = {  # the value used when a file gives no default
    "float": lambda p: 0.5 * (p.bounds[0] + p.bounds[1]),
    "log-float": lambda p: math.sqrt(p.bounds[0] * p.bounds[1]),
    "int": lambda p: int(round(0.5 * (p.bounds[0] + p.bounds[1]))),
    "categorical": lambda p: p.choices[0],
}


@dataclass(frozen=True)
class Fixed:
    """Spec fields set to constants while `when` holds (always, when empty)."""

    values: Mapping[str, Any]
    when: Condition = ()


_PATH = re.compile(r"(?P<slot>[a-z_]+)(?:\.(?P<field>[A-Za-z_0-9]+)(?:\[(?P<index>\d+)\])?)?")


def _nest(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted paths → the nested dict `MarginSpec.from_dict` reads; indexed items become lists."""
    out: dict[str, Any] = {}
    items: dict[tuple[str, str], dict[int, Any]] = {}
    for path, value in fields.items():
        m = cast("re.Match[str]", _PATH.fullmatch(path))  # paths are checked before they get here
        slot, name, index = m["slot"], m["field"], m["index"]
        if name is None:
            out[slot] = value
        elif index is None:
            out.setdefault(slot, {})[name] = value
        else:
            out.setdefault(slot, {})
            items.setdefault((slot, name), {})[int(index)] = value
    for (slot, name), by_index in items.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise SpecError(f"{slot}.{name}: items {sorted(by_index)} are not contiguous from 0")
        out[slot][name] = [by_index[i] for i in range(len(by_index))]
    return out


def with_fields(spec: MarginSpec, fields: Mapping[str, Any]) -> MarginSpec:
    """`spec` with some of its flat fields (the names `spec.flat()` prints: ``s``, ``target.m2_rad`` …) set;
    SpecError naming a bad one.

    The same names a space file's `sets` and `marginsearch train --set` use. A slot the spec does
    not have needs its ``<slot>.kind`` too (e.g. ``negative.kind = "negative"``).
    """
    flat = spec.flat()
    for path in fields:
        m = _PATH.fullmatch(path)
        if m is None or m["index"] is not None or (m["field"] is None and path not in ("s", "learnable_scale")):
            raise SpecError(f"unknown spec field {path!r}; the spec's fields: {', '.join(flat)}")
    try:
        return MarginSpec.from_dict(_nest({**flat, **fields}))
    except SpecError as exc:
        raise SpecError(f"{exc} (the spec's fields: {', '.join(flat)})") from None


def baseline_spec(text: str) -> MarginSpec:
    """A named loss, optionally with flat fields changed: ``"arcface"``, ``"combined:target.guard=fallback,s=32"``.

    The campaign's `search.baselines` entries: a named point at its defaults, or the flavour of it
    that a space holds (values are JSON where they parse, else strings). SpecError naming a bad part.
    """
    name, _, rest = text.partition(":")
    fields: dict[str, Any] = {}
    for item in (part for part in rest.split(",") if part):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"baseline {text!r}: expected name:field=value[,field=value], got {item!r}")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value.strip()
    return with_fields(named(name.strip()), fields) if fields else named(name.strip())


_MISSING = object()


def _lookup(spec_dict: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of `spec.to_dict()`, or _MISSING."""
    m = cast("re.Match[str]", _PATH.fullmatch(path))  # a checked `sets` path
    value: Any = spec_dict.get(m["slot"], _MISSING)
    if m["field"] is not None:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(m["field"], _MISSING)
    if m["index"] is not None:
        i = int(m["index"])
        if not isinstance(value, (list, tuple)) or i >= len(value):
            return _MISSING
        value = value[i]
    return value


@dataclass(frozen=True)
class SearchSpace:
    """A named set of parameters and the declarative map from their values to a `MarginSpec`."""

    name: str
    parameters: Mapping[str, Parameter]
    fixed: tuple[Fixed, ...] = ()
    description: str = ""
    source: str = ""

    # ------------------------------------------------------------------ sampling
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run: suggest every active parameter on an Optuna trial; the active params."""
        values: dict[str, Any] = {}
        for p in self.parameters.values():
            if p.active(values):
                values[p.name] = SUGGEST[p.type](trial, p)
        return values

    def active(self, params: Mapping[str, Any]) -> list[Parameter]:
        """The parameters that exist given the categorical values in `params`."""
        seen: dict[str, Any] = {}
        out = []
        for p in self.parameters.values():
            if p.active(seen):
                out.append(p)
                if p.name in params:
                    seen[p.name] = params[p.name]
        return out

    def distributions(self, params: Mapping[str, Any] | None = None) -> dict[str, BaseDistribution]:
        """Optuna distributions of the active parameters (all parameters when `params` is None)."""
        chosen = self.parameters.values() if params is None else self.active(params)
        return {p.name: p.distribution() for p in chosen}

    def defaults(self) -> dict[str, Any]:
        """The active parameters at their defaults (categoricals at their default choice)."""
        values: dict[str, Any] = {}
        for p in self.parameters.values():
            if p.active(values):
                values[p.name] = p.default
        return values

    # ------------------------------------------------------------------ params → spec
    def to_spec(self, params: Mapping[str, Any]) -> MarginSpec:
        """The `MarginSpec` of a parameter assignment (inactive names are ignored)."""
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise SpaceError(f"space {self.name!r}: unknown parameter(s) {unknown}")
        active = self.active(params)
        missing = [p.name for p in active if p.name not in params]
        if missing:
            raise SpaceError(f"space {self.name!r}: missing value(s) for {missing}")
        bad = [f"{p.name}={params[p.name]!r}" for p in active if not p.contains(params[p.name])]
        if bad:
            raise SpaceError(f"space {self.name!r}: value(s) out of range: {', '.join(bad)}")
        fields: dict[str, Any] = {}
        for block in self.fixed:
            if _holds(block.when, params):
                fields.update(block.values)
        setting = [p for p in active if p.sets is not None]
        for p in sorted(setting, key=lambda p: bool(TRANSFORMS[p.transform].needs)):  # plain fields first
            value = float(params[p.name]) if p.type in ("float", "log-float") else params[p.name]
            transform = TRANSFORMS[p.transform]
            lacking = [n for n in transform.needs if n not in fields]
            if lacking:
                raise SpaceError(f"space {self.name!r}: transform {p.transform!r} of {p.name} needs {lacking} set")
            fields[cast(str, p.sets)] = transform.forward(value, fields)  # setting: sets is not None
        try:
            return MarginSpec.from_dict(_nest(fields))
        except SpecError as exc:
            raise SpaceError(f"space {self.name!r}: params give an invalid spec: {exc}") from None

    # ------------------------------------------------------------------ spec → params
    def _branches(self) -> Iterator[dict[str, Any]]:
        """Every assignment of the active categoricals (depth first, in declaration order)."""
        params = list(self.parameters.values())

        def walk(i: int, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(params):
                yield values
                return
            p = params[i]
            if p.type == "categorical" and p.active(values):
                for choice in p.choices:
                    yield from walk(i + 1, {**values, p.name: choice})
            else:
                yield from walk(i + 1, values)

        yield from walk(0, {})

    def _invert(self, p: Parameter, value: Any, spec_dict: Mapping[str, Any]) -> Any:
        """The parameter value whose transform gives exactly `value` (nudged by a few ulps if rounding is off)."""
        transform = TRANSFORMS[p.transform]
        ctx = {n: _lookup(spec_dict, n) for n in transform.needs}
        x = transform.inverse(value, ctx)
        if p.type == "int":
            return int(round(x)) if x == round(x) else x
        if p.type == "categorical" or not isinstance(x, float):
            return x
        candidate = x
        for _ in range(8):
            if transform.forward(candidate, ctx) == value:
                return candidate
            candidate = math.nextafter(candidate, math.inf if transform.forward(candidate, ctx) < value else -math.inf)
        return x

    def params_of(self, spec: MarginSpec) -> dict[str, Any]:
        """The params whose `to_spec` equals `spec` exactly; SpaceError naming the loss if the space cannot
        express it."""
        spec_dict = spec.to_dict()
        best: tuple[int, str] = (10**9, "no branch of the space matches")
        for branch in self._branches():
            candidate, problems = dict(branch), []
            for p in self.active(branch):
                if p.type == "categorical":
                    continue
                value = _lookup(spec_dict, cast(str, p.sets))  # a numeric parameter always sets a field
                if value is _MISSING or value is None:
                    problems.append(f"{p.sets} is not part of the spec")
                    continue
                x = self._invert(p, value, spec_dict)
                if not p.contains(x):
                    problems.append(f"{p.name}={x!r} outside [{p.low:g}, {p.high:g}]")
                candidate[p.name] = x
            if not problems:
                try:
                    got = self.to_spec(candidate)
                except SpaceError as exc:
                    problems.append(str(exc))
                else:
                    if got == spec:
                        return {name: candidate[name] for name in self.parameters if name in candidate}
                    mine, theirs = got.flat(), spec.flat()
                    problems = [f"{k}: space gives {mine.get(k)!r}, spec has {theirs.get(k)!r}"
                                for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            if len(problems) < best[0]:
                best = (len(problems), "; ".join(problems))
        label = identify(spec)
        label = repr(label) if label else "this spec"
        raise SpaceError(f"space {self.name!r} cannot express {label}: {best[1]}")

    def searched_fields(self, spec: MarginSpec, params: Mapping[str, Any]) -> dict[str, Any]:
        """The spec fields that the active parameters of `params` set, by their flat names (``target.m2_rad``,
        ``modulation.a[0]``)."""
        spec_dict = spec.to_dict()
        values = {p.sets: _lookup(spec_dict, p.sets) for p in self.active(params) if p.sets is not None}
        return {path: value for path, value in values.items() if value is not _MISSING}

    def contains(self, spec: MarginSpec) -> bool:
        """Whether some params of this space give exactly `spec`."""
        try:
            self.params_of(spec)
        except SpaceError:
            return False
        return True

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Every named loss (losses.NAMED, at its defaults) this space can express → its params."""
        out = {}
        for name in NAMED:
            try:
                out[name] = self.params_of(named(name))
            except SpaceError:
                continue
        return out


# ---------------------------------------------------------------------- loading
def builtin_spaces() -> list[str]:
    """Names of the built-in spaces (files in searchspace/spaces)."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.toml"))


def load(name_or_path: str | os.PathLike | SearchSpace) -> SearchSpace:
    """A built-in space by name, or a space file by path (a SearchSpace passes through)."""
    if isinstance(name_or_path, SearchSpace):
        return name_or_path
    text = str(name_or_path)
    path = SPACES_DIR / f"{text}.toml" if text in builtin_spaces() else Path(text)
    if not path.is_file():
        raise SpaceError(f"unknown search space {text!r}; built-in: {', '.join(builtin_spaces())} "
                         "(or give the path of a .toml space file)")
    return _load_file(path, ())


def _load_file(path: Path, loading: tuple[Path, ...]) -> SearchSpace:
    if path.resolve() in loading:
        raise SpaceError(f"{path}: union includes itself")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpaceError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpaceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SpaceError(f"{path}: cannot be read ({exc.strerror})") from None
    where = str(path)
    _no_unknown(data, {"name", "description", "fixed", "fixed_when", "param", "union"}, where)
    name = data.get("name", path.stem)
    _expect(isinstance(name, str) and name, where, "name", f"must be a non-empty string, got {name!r}")
    description = data.get("description", "")
    if "union" in data:
        _no_unknown(data, {"name", "description", "union"}, where)
        space = _union(data["union"], name, description, path, loading + (path.resolve(),))
    else:
        params: list[Parameter] = []
        for i, entry in enumerate(_list(data.get("param", []), where, "param")):
            params.extend(_parse_param(entry, f"{where}: param[{i}]"))
        fixed = [Fixed(_fields(data.get("fixed", {}), where, "fixed"))] if data.get("fixed") else []
        for i, entry in enumerate(_list(data.get("fixed_when", []), where, "fixed_when")):
            key = f"fixed_when[{i}]"
            _expect(isinstance(entry, dict), where, key, "must be a table")
            _no_unknown(entry, {"when", "values"}, f"{where}: {key}")
            fixed.append(Fixed(_fields(entry.get("values", {}), where, f"{key}.values"),
                               _condition(entry.get("when", {}), where, f"{key}.when")))
        by_name: dict[str, Parameter] = {}
        for p in params:
            _expect(p.name not in by_name, where, f"param {p.name}", "appears twice")
            by_name[p.name] = p
        space = SearchSpace(name, by_name, tuple(fixed), description, str(path))
    _validate(space, where)
    return space


def _expect(ok: object, where: str, key: str, message: str) -> None:
    if not ok:
        raise SpaceError(f"{where}: {key}: {message}")


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _list(value: Any, where: str, key: str) -> list[Any]:
    _expect(isinstance(value, list), where, key, f"must be an array of tables, got {type(value).__name__}")
    return value


def _check_path(path: Any, where: str, key: str) -> None:
    _expect(isinstance(path, str) and _PATH.fullmatch(path) is not None, where, key,
            f"{path!r} is not a spec field path like 'target.m2_rad' or 'modulation.a[0]'")
    m = cast("re.Match[str]", _PATH.fullmatch(path))  # the _expect above
    slot, name = m["slot"], m["field"]
    if name is None:
        _expect(slot in ("s", "learnable_scale"), where, key, f"{path!r}: unknown spec field")
        return
    _expect(slot in SLOTS, where, key, f"{path!r}: unknown slot {slot!r}; slots: {sorted(SLOTS)}")
    names = {"kind"} | {f.name for c in SLOTS[slot].values() for f in dataclasses.fields(c)}
    _expect(name in names, where, key, f"{path!r}: {slot} has no field {name!r}; fields: {sorted(names)}")


def _fields(table: Any, where: str, key: str) -> dict[str, Any]:
    _expect(isinstance(table, dict), where, key, "must be a table of spec field paths")
    for path in table:
        _check_path(path, where, f"{key}.{path}")
    return dict(table)


def _condition(table: Any, where: str, key: str) -> Condition:
    _expect(isinstance(table, dict), where, key, "must be a table {categorical = value or [values]}")
    return tuple((name, tuple(v) if isinstance(v, list) else (v,)) for name, v in table.items())


_PARAM_KEYS = {"name", "type", "low", "high", "default", "choices", "sets", "transform", "when", "repeat"}


def _parse_param(entry: Any, where: str) -> list[Parameter]:
    _expect(isinstance(entry, dict), where, "param", "must be a table")
    _no_unknown(entry, _PARAM_KEYS, where)
    name = entry.get("name")
    _expect(isinstance(name, str) and name != "", where, "name", f"must be a non-empty string, got {name!r}")
    repeat = entry.get("repeat")
    if repeat is not None:
        _expect(isinstance(repeat, int) and not isinstance(repeat, bool) and repeat >= 1, where, "repeat",
                f"must be a positive integer, got {repeat!r}")
        _expect("{i}" in name, where, "name", f"a repeated parameter needs {{i}} in its name, got {name!r}")
        body = {k: v for k, v in entry.items() if k != "repeat"}
        return [p for i in range(repeat) for p in _parse_param(
            {**body, "name": name.replace("{i}", str(i)),
             **({"sets": body["sets"].replace("{i}", str(i))} if isinstance(body.get("sets"), str) else {})},
            where)]
    where = f"{where} ({name})"
    kind = entry.get("type")
    _expect(kind in DISTRIBUTIONS, where, "type", f"unknown type {kind!r}; choose one of {sorted(DISTRIBUTIONS)}")
    sets = entry.get("sets")
    if sets is not None:
        _check_path(sets, where, "sets")
    transform = entry.get("transform", "identity")
    _expect(transform in TRANSFORMS, where, "transform",
            f"unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    when = _condition(entry.get("when", {}), where, "when")
    if kind == "categorical":
        choices = entry.get("choices")
        _expect(isinstance(choices, list) and len(choices) >= 1, where, "choices", "must be a non-empty array")
        _expect(all(isinstance(c, (str, bool, int, float)) for c in choices), where, "choices",
                "must be strings, booleans or numbers")
        _expect(len(set(map(repr, choices))) == len(choices), where, "choices", "must be distinct")
        p = Parameter(name, kind, choices=tuple(choices), sets=sets, transform=transform, when=when)
    else:
        _expect(sets is not None, where, "sets", "a numeric parameter must set a spec field")
        low, high = entry.get("low"), entry.get("high")
        number = int if kind == "int" else (int, float)
        for key, v in (("low", low), ("high", high)):
            _expect(isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v), where, key,
                    f"must be a finite {'integer' if kind == 'int' else 'number'}, got {v!r}")
        _expect(low < high, where, "high", f"must exceed low ({low}), got {high}")
        _expect(kind != "log-float" or low > 0, where, "low", f"a log-float range needs low > 0, got {low}")
        p = Parameter(name, kind, low=low if kind == "int" else float(low), high=high if kind == "int" else float(high),
                      sets=sets, transform=transform, when=when)
    default = entry.get("default", DEFAULTS[kind](p))
    if kind in ("float", "log-float") and isinstance(default, int) and not isinstance(default, bool):
        default = float(default)
    _expect(p.contains(default), where, "default", f"{default!r} is not a legal value of this parameter")
    return [dataclasses.replace(p, default=default)]


def _union(table: Any, name: str, description: str, path: Path, loading: tuple[Path, ...]) -> SearchSpace:
    where = f"{path}: union"
    _expect(isinstance(table, dict), str(path), "union", "must be a table")
    _no_unknown(table, {"choice", "members"}, where)
    choice, members = table.get("choice", "component"), table.get("members")
    _expect(isinstance(members, list) and len(members) >= 1 and all(isinstance(m, str) for m in members),
            where, "members", "must be a non-empty array of space names or paths")
    spaces = []
    for m in members:
        member_path = SPACES_DIR / f"{m}.toml" if m in builtin_spaces() else (path.parent / m)
        _expect(member_path.is_file(), where, "members", f"unknown space {m!r}")
        spaces.append(_load_file(member_path, loading))
    names = [s.name for s in spaces]
    _expect(len(set(names)) == len(names), where, "members", f"member names repeat: {names}")
    params: dict[str, Parameter] = {choice: Parameter(choice, "categorical", choices=tuple(names), default=names[0])}
    fixed: list[Fixed] = []
    for s in spaces:
        def rename(when: Condition, prefix: str = s.name) -> Condition:
            return ((choice, (prefix,)),) + tuple((f"{prefix}/{k}", v) for k, v in when)
        for p in s.parameters.values():
            params[f"{s.name}/{p.name}"] = dataclasses.replace(p, name=f"{s.name}/{p.name}", when=rename(p.when))
        fixed.extend(Fixed(block.values, rename(block.when)) for block in s.fixed)
    return SearchSpace(name, params, tuple(fixed), description, str(path))


def _validate(space: SearchSpace, where: str) -> None:
    """Conditions name earlier categoricals and their choices; every branch builds a valid spec at the defaults."""
    earlier: dict[str, Parameter] = {}
    for p in list(space.parameters.values()) + [None]:
        blocks = [(f"param {p.name}", p.when)] if p is not None else [("fixed_when", b.when) for b in space.fixed]
        for key, when in blocks:
            for name, accepted in when:
                _expect(name in earlier and earlier[name].type == "categorical", where, f"{key}.when",
                        f"{name!r} is not an earlier categorical parameter")
                wrong = [v for v in accepted if not earlier[name].contains(v)]
                _expect(not wrong, where, f"{key}.when", f"{wrong} are not choices of {name!r}")
        if p is not None:
            earlier[p.name] = p
    for branch in space._branches():
        values = {**{p.name: p.default for p in space.active(branch)}, **branch}
        try:
            space.to_spec(values)
        except SpaceError as exc:
            raise SpaceError(f"{where}: branch {branch or '(all)'} at its defaults: {exc}") from None
