"""The head's contract beyond the formulas: shapes, dtypes, errors, state, the curve and the listing."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from marginsearch.losses import (
    NAMED,
    AngularMargin,
    MarginSoftmax,
    MarginSpec,
    NegativeTransform,
    ProbabilityModulation,
    SpecError,
    named,
    target_logit_curve,
)
from marginsearch.losses.__main__ import main as losses_main


def _batch(seed: int = 0, b: int = 10, d: int = 6, c: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("name", list(NAMED))
def test_logits_shape_and_cross_entropy_identity(name):
    torch.manual_seed(1)
    x, y = _batch()
    head = MarginSoftmax(named(name), 6, 7).eval()
    z = head.logits(x, y)
    assert z.shape == (10, 7) and z.dtype == torch.float32
    expected = F.cross_entropy(z, y)
    loss = head(x, y)
    if name == "magface":  # the only point with an additive regulariser
        assert loss > expected
    else:
        torch.testing.assert_close(loss, expected)


def test_bf16_autocast_computes_cosines_in_float32():
    x, y = _batch()
    head = MarginSoftmax(named("arcface"), 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head.logits(x.bfloat16(), y)
        loss = head(x.bfloat16(), y)
    assert z.dtype == torch.float32 and loss.dtype == torch.float32
    ref = head.logits(x.bfloat16().float(), y)
    torch.testing.assert_close(z, ref)


def test_float64_inputs_stay_float64():
    x, y = _batch()
    head = MarginSoftmax(named("cosface"), 6, 7).double()
    assert head.logits(x.double(), y).dtype == torch.float64


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x[:, :5], y), "embeddings must be"),
    (lambda x, y: (x, y[:5]), "labels must be an integer tensor"),
    (lambda x, y: (x, y.float()), "labels must be an integer tensor"),
    (lambda x, y: (x, torch.full_like(y, 7)), "labels must lie in [0, 7)"),
    (lambda x, y: (x, torch.full_like(y, -1)), "labels must lie in [0, 7)"),
])
def test_bad_inputs_raise_clear_errors(bad, message):
    x, y = _batch()
    head = MarginSoftmax(named("arcface"), 6, 7)
    with pytest.raises(ValueError) as err:
        head(*bad(x, y))
    assert message in str(err.value)


def test_constructor_rejects_non_spec_and_bad_sizes():
    with pytest.raises(TypeError, match="MarginSpec"):
        MarginSoftmax({"s": 64}, 6, 7)
    with pytest.raises(ValueError, match="num_classes"):
        MarginSoftmax(named("arcface"), 6, 1)


def test_learnable_scale_is_a_parameter_that_learns():
    spec = MarginSpec(s=10.0, learnable_scale=True)
    head = MarginSoftmax(spec, 6, 7)
    assert any(n == "scale" for n, _ in head.named_parameters())
    x, y = _batch()
    head(x, y).backward()
    assert head.scale.grad is not None and head.scale.grad.abs() > 0
    fixed = MarginSoftmax(MarginSpec(s=10.0), 6, 7)
    assert "scale" not in dict(fixed.named_parameters()) and "scale" not in fixed.state_dict()


@pytest.mark.parametrize("name, buffers", [
    ("curricularface", {"curricular_t"}),
    ("kappaface", {"kappa_psi", "kappa_feature_sum", "kappa_count"}),
    ("adaface", {"norm_mean", "norm_std"}),
    ("sphereface", {"step"}),
    ("arcface", set()),
])
def test_running_statistics_live_in_state_dict(name, buffers):
    head = MarginSoftmax(named(name), 6, 7)
    assert set(head.state_dict()) == {"weight"} | buffers


def test_statistics_update_in_train_mode_only():
    x, y = _batch()
    head = MarginSoftmax(named("curricularface"), 6, 7)
    head.eval()
    head(x, y)
    assert head.curricular_t.item() == 0.0
    head.train()
    head(x, y)
    cos_y = head.cosines(x).gather(1, y[:, None]).mean()
    torch.testing.assert_close(head.curricular_t, 0.01 * cos_y)


def test_kappa_end_epoch_resets_sums_and_keeps_unseen_classes():
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])  # classes 4..6 unseen
    head = MarginSoftmax(named("kappaface"), 6, 7)
    head(x, y)
    head.end_epoch()
    assert head.kappa_count.sum() == 0 and head.kappa_feature_sum.abs().sum() == 0
    assert torch.all(head.kappa_psi[4:] == 1.0)
    assert not torch.allclose(head.kappa_psi[:4], torch.ones(4))
    assert torch.all((head.kappa_psi >= 0) & (head.kappa_psi <= 1))


def test_curve_of_normface_is_cosine_and_cosface_is_shifted():
    theta = torch.linspace(0, math.pi, 50, dtype=torch.float64)
    torch.testing.assert_close(target_logit_curve(named("normface"), theta), torch.cos(theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(target_logit_curve(named("cosface", m=0.3), theta), torch.cos(theta) - 0.3,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["arcface", "cosface", "curricularface", "kappaface", "magface", "combined"])
def test_fallback_curves_decrease_monotonically(name):
    theta = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    # points whose official flavour has no guard (or an easy margin) take the fallback explicitly
    params = {"guard": "fallback"} if NAMED[name].defaults.get("guard", "fallback") != "fallback" else {}
    curve = target_logit_curve(named(name, **params), theta)
    assert torch.all(curve[1:] <= curve[:-1] + 1e-9)


def test_unguarded_combined_margin_is_not_monotone():
    theta = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    curve = target_logit_curve(named("combined", guard="none"), theta)
    assert torch.any(curve[1:] > curve[:-1] + 1e-6)


def test_spec_flat_view_and_json():
    spec = MarginSpec(s=30.0, target=AngularMargin(m3_cos=0.3),
                      negative=NegativeTransform(rule="mv-fixed", t=0.1),
                      modulation=ProbabilityModulation(a=[-1.0, -2.0]))
    assert spec.modulation.a == (-1.0, -2.0)
    flat = spec.flat()
    assert flat["target.m3_cos"] == 0.3 and flat["negative.rule"] == "mv-fixed" and "class_margin" not in flat
    assert MarginSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("data, fragment", [
    ({"s": 64, "colour": 1}, "unknown key(s) ['colour']"),
    ({"target": {"kind": "wedge"}}, "target.kind: unknown kind 'wedge'"),
    ({"target": {"kind": "margin", "m9": 1}}, "unknown key(s) ['m9']"),
    ({"target": {"kind": "margin", "guard": "soft"}}, "target.guard: unknown guard 'soft'"),
    ({"negative": {"kind": "negative", "rule": "mv-huge"}}, "negative.rule: unknown negative rule"),
    ({"s": "64"}, "s: must be a finite number"),
    ({"s": float("nan")}, "s: must be a finite number"),
    ({"target": {"kind": "sphereface", "m": 4}, "class_margin": {"kind": "kappa"}}, "need target kind 'margin'"),
    ([1, 2], "expected a mapping"),
])
def test_from_dict_errors_name_the_problem(data, fragment):
    with pytest.raises(SpecError) as err:
        MarginSpec.from_dict(data)
    assert fragment in str(err.value)


def test_listing_and_plot(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert losses_main(["--plot", str(out), "arcface", "cosface"]) == 0
    printed = capsys.readouterr().out
    assert "arXiv:1801.07698" in printed and "m=0.5 (radians)" in printed
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert losses_main(["--markdown"]) == 0
    assert capsys.readouterr().out.count("\n| `") == len(NAMED)
    assert losses_main(["no-such-loss"]) == 2
    assert "unknown loss 'no-such-loss'" in capsys.readouterr().err


def test_readme_table_is_the_generated_one(capsys):
    from pathlib import Path
    losses_main(["--markdown"])
    generated = capsys.readouterr().out.strip().splitlines()[2:]
    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text(encoding="utf-8")
    missing = [row for row in generated if row not in readme]
    assert not missing, ("README's named-point table is stale; "
                         f"regenerate with `python -m marginsearch.losses --markdown`: {missing[:1]}")
