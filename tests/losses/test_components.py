"""The component table: one behaviour object per spec component, and the documented way to add one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from marginsearch.losses import NAMED, MarginSoftmax, MarginSpec, NamedLoss, named
from marginsearch.losses import components as K
from marginsearch.losses import spec as spec_module
from marginsearch.losses.spec import AngularMargin, SpecError


def test_every_spec_component_type_has_one_behaviour():
    kinds = {cls for slot in spec_module.SLOTS.values() for cls in slot.values()}
    assert kinds <= set(K.COMPONENTS)
    for name in NAMED:
        parts = K.components_of(named(name))
        assert set(parts) <= set(K.ORDER) and "target" in parts
        assert all(isinstance(p, K.Component) for p in parts.values())


def test_head_reports_its_summed_buffers_and_sharded_support():
    assert MarginSoftmax(named("kappaface"), 4, 5).summed_buffers() == ("kappa_feature_sum", "kappa_count")
    assert MarginSoftmax(named("curricularface"), 4, 5).summed_buffers() == ()
    assert K.unsupported_by_sharded(K.components_of(named("magface"))) == ["MagFace sample margins"]
    assert K.unsupported_by_sharded(K.components_of(named("adaface"))) == []


def test_a_new_component_is_one_class_and_one_named_row(monkeypatch):
    """The worked example of docs/architecture.md ("Adding a component"), verbatim in spirit."""
    monkeypatch.setitem(spec_module.SLOTS, "sample_margin", dict(spec_module.SLOTS["sample_margin"]))
    monkeypatch.setattr(K, "COMPONENTS", dict(K.COMPONENTS))

    @K.register_component("sample_margin")
    @dataclass(frozen=True)
    class NormCosMargin(K.Component):
        """Toy: m3 += k·min(|x|, cap) cosine units (larger margin for confident, large-norm features)."""

        kind: ClassVar[str] = "norm-cos"
        name: ClassVar[str] = "toy norm margin"
        k: float = 0.01
        cap: float = 10.0

        def validate(self, where: str) -> None:
            if not 0 <= self.k < 1:
                raise SpecError(f"{where}.k: must be in [0, 1), got {self.k}")

        def margins(self, head, step, m2, m3):
            return m2, m3 + self.p.k * step.norms.detach().clamp(max=self.p.cap)

    monkeypatch.setitem(NAMED, "norm-cosface", NamedLoss(
        "toy", "s·(cos θ_y − m − k·min(|x|, cap))", {"s": 64.0, "m": 0.35, "k": 0.01},
        lambda p: MarginSpec(s=p["s"], target=AngularMargin(m3_cos=p["m"]), sample_margin=NormCosMargin(k=p["k"])),
        units={"m": "cosine units", "k": "cosine units per unit norm"}))

    spec = named("norm-cosface", k=0.02)
    assert MarginSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="sample_margin.k"):
        named("norm-cosface", k=2.0)
    torch.manual_seed(0)
    x, y = torch.randn(8, 4) * 3.0, torch.randint(0, 5, (8,))
    head = MarginSoftmax(spec, 4, 5)
    cos = MarginSoftmax(named("cosface"), 4, 5)
    with torch.no_grad():
        cos.weight.copy_(head.weight)
    z, zc = head.logits(x, y), cos.logits(x, y)
    shift = (zc - z).gather(1, y[:, None]).squeeze(1) / 64.0
    torch.testing.assert_close(shift, 0.02 * x.norm(dim=1).clamp(max=10.0))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head(x, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and head(x, y) < loss

    @K.register_component("sample_margin")
    @dataclass(frozen=True)
    class Bare(K.Component):   # no validate: the base's accepts every value
        kind: ClassVar[str] = "bare"
        k: float = 0.0

    assert MarginSpec(target=AngularMargin(), sample_margin=Bare(k=0.1)).sample_margin.k == 0.1
