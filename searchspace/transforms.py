"""Named reparameterisations from a search parameter to the spec field it sets (a table, not code paths).

Each transform maps the parameter value x to the field value given the spec fields already set
(its context, flat dotted paths such as ``s``), and back. Search-Softmax (Loss Function Search,
arXiv 2007.06542, official code) searches x ≥ 0 and uses a = −x·e^{s/3} (global) or a_j = −x_j·e^{s/2}
(local, per p-bin); x is the sample itself, never −|x| of it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Transform", "TRANSFORMS"]

Context = Mapping[str, Any]


@dataclass(frozen=True)
class Transform:
    """field = forward(x, context); x = inverse(field, context); `needs` names the context fields used."""

    forward: Callable[[float, Context], float]
    inverse: Callable[[float, Context], float]
    needs: tuple[str, ...]
    doc: str


def _neg_exp_s(divisor: float) -> Transform:
    return Transform(
        forward=lambda x, ctx: -x * math.exp(ctx["s"] / divisor),
        inverse=lambda a, ctx: -a / math.exp(ctx["s"] / divisor),
        needs=("s",),
        doc=f"a = −x·e^(s/{divisor:g}) (Search-Softmax, arXiv 2007.06542)")


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda x, ctx: x, lambda v, ctx: v, (), "field = x"),
    "neg_exp_s_third": _neg_exp_s(3.0),
    "neg_exp_s_half": _neg_exp_s(2.0),
    "negate": Transform(lambda x, ctx: -x, lambda v, ctx: -v, (), "field = −x"),
}
