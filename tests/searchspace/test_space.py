"""Search spaces: built-in files load, round-trip every named member exactly, honour conditionals, reject bad files."""
from __future__ import annotations

import math

import optuna
import pytest

from marginsearch.losses import NAMED, AngularMargin, MarginSpec, named
from marginsearch.searchspace import SpaceError, builtin_spaces, load

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Which named losses (at their defaults) each built-in space must hold: written out, not derived.
MEMBERS = {
    # combined has no guard at its defaults (insightface); the space has one
    "margin": {"normface", "cosface", "arcface"},
    "search-softmax": {"search-softmax"},
    "am-lfs": {"am-lfs"},
    "mv": {"mv-am", "mv-arc", "sv-am", "sv-arc"},
    "kappa": set(),  # kappaface at its defaults does not clamp r̄ (official); the space searches the clamped flavour
}
MEMBERS["unified"] = set().union(*MEMBERS.values())


def test_builtin_spaces_are_the_six_files():
    assert builtin_spaces() == sorted(MEMBERS)


@pytest.mark.parametrize("space_name", sorted(MEMBERS))
def test_every_member_round_trips_exactly(space_name):
    space = load(space_name)
    baselines = space.baselines()
    assert set(baselines) == MEMBERS[space_name]
    for loss in baselines:
        params = space.params_of(named(loss))
        assert space.to_spec(params) == named(loss), loss
        assert space.contains(named(loss))
        for name, value in params.items():
            assert space.parameters[name].contains(value), (loss, name, value)


@pytest.mark.parametrize("space_name", sorted(MEMBERS))
def test_non_members_are_refused_with_the_loss_name(space_name):
    space = load(space_name)
    for loss in sorted(set(NAMED) - MEMBERS[space_name]):
        assert not space.contains(named(loss)), loss
    outsider = sorted(set(NAMED) - MEMBERS[space_name])[0]
    with pytest.raises(SpaceError, match=f"'{outsider}'"):
        space.params_of(named(outsider))


def test_margin_params_map_to_the_fields_they_name():
    spec = load("margin").to_spec({"s": 32.0, "m1": 1.2, "m2": 0.1, "m3": 0.25})
    assert spec == MarginSpec(s=32.0, target=AngularMargin(m1=1.2, m2_rad=0.1, m3_cos=0.25))


def test_margin_out_of_range_spec_names_the_parameter():
    with pytest.raises(SpaceError, match="m2=0.9 outside"):
        load("margin").params_of(named("arcface", m=0.9))


def test_search_softmax_transform_and_local_bins():
    space = load("search-softmax")
    spec = space.to_spec({"mode": "global", "x": 0.5})
    assert spec.modulation.a == (-0.5 * math.exp(32 / 3),)
    local = {"mode": "local", **{f"x{i}": i / 10 for i in range(10)}}
    spec = space.to_spec(local)
    assert spec.modulation.a == tuple(-(i / 10) * math.exp(16.0) for i in range(10))
    assert space.params_of(spec) == local
    x = 0.123456789  # inverse transform is exact up to rounding, nudged back to the same spec
    assert (space.to_spec(space.params_of(space.to_spec({"mode": "global", "x": x})))
            == space.to_spec({"mode": "global", "x": x}))


def _suggested(space_name, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return load(space_name).suggest(trial), trial


def test_suggest_honours_conditionals():
    seen = set()
    for seed in range(12):
        params, trial = _suggested("search-softmax", seed)
        seen.add(params["mode"])
        names = {"mode", "x"} if params["mode"] == "global" else {"mode", *(f"x{i}" for i in range(10))}
        assert set(params) == names == set(trial.params)
        load("search-softmax").to_spec(params)
    assert seen == {"global", "local"}


def test_unified_component_switches_members():
    space = load("unified")
    for seed in range(10):
        params, _ = _suggested("unified", seed)
        component = params["component"]
        assert all(n == "component" or n.startswith(component + "/") for n in params)
        assert space.to_spec(params) is not None
    assert space.params_of(named("arcface"))["component"] == "margin"
    assert space.params_of(named("mv-arc"))["mv/target"] == "arc"


def test_mv_arc_branch_sets_easy_guard():
    spec = load("mv").to_spec({"target": "arc", "m_arc": 0.4, "rule": "mv-fixed", "t": 0.1})
    assert spec.target.guard == "easy" and spec.target.m2_rad == 0.4
    assert spec.negative.rule == "mv-fixed" and spec.negative.t == 0.1


USER_SPACE = """
name = "sphere"
[fixed]
s = 30.0
"target.kind" = "sphereface"
[[param]]
name = "m"
type = "int"
low = 1
high = 6
default = 4
sets = "target.m"
[[param]]
name = "lambda_min"
type = "log-float"
low = 0.5
high = 50.0
sets = "target.lambda_min"
"""


def test_user_space_file_with_int_and_log_parameters(tmp_path):
    path = tmp_path / "sphere.toml"
    path.write_text(USER_SPACE)
    space = load(path)
    assert space.name == "sphere" and space.parameters["m"].type == "int"
    assert space.parameters["lambda_min"].default == pytest.approx(5.0)  # geometric centre of [0.5, 50]
    assert space.baselines() == {}  # sphereface's default s is 64, not 30
    spec = space.to_spec({"m": 3, "lambda_min": 5.0})
    assert spec.target.m == 3 and spec.s == 30.0
    assert space.params_of(spec) == {"m": 3, "lambda_min": 5.0}
    params, _ = (load(path).suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()), None)
    assert isinstance(params["m"], int) and 1 <= params["m"] <= 6


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('type = "int"', 'type = "integer"'), r"param\[0\] \(m\)\: type: unknown type 'integer'"),
    (lambda t: t.replace('sets = "target.m"', 'sets = "target.mm"'), r"param\[0\] \(m\)\: sets: 'target.mm'"),
    (lambda t: t.replace("default = 4", "default = 9"), r"param\[0\] \(m\)\: default: 9"),
    (lambda t: t.replace("high = 6", "high = 6\ncolour = 1"), r"unknown key\(s\) \['colour'\]"),
    (lambda t: t.replace('"target.kind" = "sphereface"', '"target.kind" = "sphere"'),
     r"branch .* unknown kind 'sphere'"),
    (lambda t: t + '\n[[param]]\nname = "z"\ntype = "float"\nlow = 0\nhigh = 1\nsets = "s"\nwhen = { m = 3 }\n',
     r"'m' is not an earlier categorical"),
    (lambda t: t.replace("[[param]]", "[[param", 1), "not valid TOML"),
])
def test_malformed_files_give_one_line_errors_naming_file_and_key(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(USER_SPACE))
    with pytest.raises(SpaceError, match=message) as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_space_name_lists_the_builtins():
    with pytest.raises(SpaceError, match="unknown search space 'nope'.*margin"):
        load("nope")


def test_to_spec_rejects_unknown_missing_and_out_of_range_values():
    space = load("margin")
    with pytest.raises(SpaceError, match="unknown parameter"):
        space.to_spec({"s": 64.0, "m1": 1.0, "m2": 0.1, "m3": 0.0, "m4": 1.0})
    with pytest.raises(SpaceError, match=r"missing value\(s\) for \['m3'\]"):
        space.to_spec({"s": 64.0, "m1": 1.0, "m2": 0.1})
    with pytest.raises(SpaceError, match="out of range: m2=2.0"):
        space.to_spec({"s": 64.0, "m1": 1.0, "m2": 2.0, "m3": 0.0})
