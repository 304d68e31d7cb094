"""marginsearch.losses: the unified margin-softmax head, its named points and auxiliary losses.

torch and numpy only. Start with `named("arcface")` or a `MarginSpec`, then `MarginSoftmax`.
"""
from .auxiliary import AUXILIARY, CenterLoss, DistributionDistillationLoss, IntraLoss, RangeLoss, build_auxiliary
from .components import COMPONENTS, Component, register_component
from .head import MarginSoftmax, target_logit_curve
from .named import NAMED, NamedLoss, identify, named
from .objective import WithAuxiliary
from .sharded import ShardedMarginSoftmax
from .spec import (
                        GUARDS,
                        NEGATIVE_RULES,
                        AdaFaceMargin,
                        AngularMargin,
                        ElasticMargin,
                        KappaMargin,
                        MagFaceMargin,
                        MarginSpec,
                        NegativeTransform,
                        PiecewiseLinear,
                        ProbabilityModulation,
                        RandomModulation,
                        SpecError,
                        SphereFacePsi,
)

__all__ = [
    "AUXILIARY", "CenterLoss", "DistributionDistillationLoss", "IntraLoss", "RangeLoss", "build_auxiliary",
    "WithAuxiliary", "COMPONENTS", "Component", "register_component",
    "MarginSoftmax", "ShardedMarginSoftmax", "target_logit_curve", "NAMED", "NamedLoss", "identify", "named", "GUARDS",
    "NEGATIVE_RULES", "AdaFaceMargin", "AngularMargin", "ElasticMargin", "KappaMargin", "MagFaceMargin",
    "MarginSpec", "NegativeTransform", "PiecewiseLinear", "ProbabilityModulation", "RandomModulation",
    "SpecError", "SphereFacePsi",
]
