"""A training budget: what a proxy or a full training of one candidate may spend.

`BUDGETS` is the one source of the named budgets: `Budget()` is the full budget, and the proxy
differs from it in epochs, identities and validation pairs only. `marginsearch train --budget`,
campaigns (`[budget.proxy]` / `[budget.full]` override these fields) and the studies all start from it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marginsearch.losses.errors import MarginsearchError

from .images import FITS

__all__ = ["Budget", "BudgetError", "BUDGETS", "budget_from"]


class BudgetError(MarginsearchError):
    """A budget field that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Budget:
    """Epochs, identity subset, image size, backbone, batch, optimizer and schedule of one training."""

    epochs: int = 10
    batch_size: int = 128
    backbone: str = "tiny"
    embedding_size: int = 128
    image_size: int | tuple[int, int] | None = None  # pixels: N (N×N), [height, width], or None: the data's own size
    image_fit: str = "resize"            # "resize" (stretch to image_size) or "crop" (scale to cover, cut the centre)
    identities: int | None = None        # train on the first N identities only (proxy); None or 0: all
    optimizer: str = "sgd"               # "sgd" (momentum) or "adamw"
    lr: float = 0.1
    head_lr: float | None = None         # class centres' learning rate; None: lr
    head_weight_decay: bool = False      # weight decay on the class centres
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    schedule: str = "cosine"             # "cosine" or "step" (×0.1 at each of `milestones`, fractions of training)
    milestones: tuple[float, ...] = (0.5, 0.75)
    grad_clip: float | None = 5.0        # max gradient norm; None: off
    amp: str = "bf16"                    # CUDA only: "bf16", "fp16" or "off"; CPU always runs float32
    compile: bool = False                # torch.compile the backbone's forward (needs a C++ compiler on CPU)
    head_parallel: bool = False          # under torchrun: split the class centres across the ranks (model parallel)
    flip: bool = True                    # random horizontal flip
    seed: int = 0
    eval_pairs: int = 3000               # cap on genuine and impostor pairs each for 10-fold verification
                                         # (balanced: min(eval_pairs, available) of each kind)
    workers: int | None = None           # data-loading processes for streamed (folder, RecordIO) data; None: auto
    reward_metric: str = "tar@far=1e-3"  # the evaluator metric a search maximises

    def __post_init__(self) -> None:
        for name, kinds in FIELD_TYPES.items():  # the type first, so a value check never meets a string
            value = getattr(self, name)
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if ok and isinstance(value, float):
                ok = math.isfinite(value)
            if not ok:
                words = [_TYPE_WORDS[k] for k in kinds if not (k is int and float in kinds)]  # an int is a number
                wanted = " or ".join(words)
                raise BudgetError(f"budget: {name} must be {wanted}, got {value!r}")
        sides = self.image_size if isinstance(self.image_size, tuple) else ()
        if sides and not (len(sides) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in sides)):
            raise BudgetError(f"budget: image_size must be an integer or [height, width], got {list(self.image_size)}")
        if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in self.milestones):
            raise BudgetError(f"budget: milestones must be fractions of training in (0, 1), "
                              f"got {list(self.milestones)}")
        from .judge import METRICS

        checks = [
            (self.reward_metric in METRICS,
             f"reward_metric {self.reward_metric!r} is not a metric of the judge; choose one of {', '.join(METRICS)}"),
            (self.seed >= 0, f"seed must be ≥ 0, got {self.seed}"),
            (self.eval_pairs >= 1, f"eval_pairs must be ≥ 1, got {self.eval_pairs}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.head_lr is None or self.head_lr > 0, f"head_lr must be > 0, got {self.head_lr}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}"),
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be ≥ 2, got {self.batch_size}"),
            (self.embedding_size >= 2, f"embedding_size must be ≥ 2, got {self.embedding_size}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"),
            (self.schedule in ("cosine", "step"), f"schedule must be 'cosine' or 'step', got {self.schedule!r}"),
            (self.amp in ("bf16", "fp16", "off"), f"amp must be 'bf16', 'fp16' or 'off', got {self.amp!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.identities in (None, 0) or self.identities >= 2,
             f"identities must be 0 (all) or ≥ 2, got {self.identities}"),
            (self.image_size is None or all(8 <= v <= 512 for v in _sides(self.image_size)),
             f"image_size must be N or [height, width] within [8, 512], got {self.image_size}"),
            (self.image_fit in FITS, f"image_fit must be one of {', '.join(FITS)}, got {self.image_fit!r}"),
            (self.workers is None or self.workers >= 0, f"workers must be ≥ 0 or none, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BudgetError(f"budget: {message}")


_INT, _FLOAT, _NONE = (int,), (int, float), (type(None),)


def _sides(image_size: int | tuple[int, int]) -> tuple[int, ...]:
    return (image_size,) if isinstance(image_size, int) else tuple(image_size)


_TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", tuple: "a list",
               type(None): "none"}
FIELD_TYPES: dict[str, tuple[type, ...]] = {  # the accepted Python types of each field (ints pass as floats)
    "epochs": _INT, "batch_size": _INT, "backbone": (str,), "embedding_size": _INT,
    "image_size": _INT + (tuple,) + _NONE,
    "image_fit": (str,), "workers": _INT + _NONE,
    "identities": _INT + _NONE, "optimizer": (str,), "lr": _FLOAT, "head_lr": _FLOAT + _NONE,
    "head_weight_decay": (bool,), "momentum": _FLOAT, "weight_decay": _FLOAT, "warmup_epochs": _FLOAT,
    "schedule": (str,), "milestones": (tuple,), "grad_clip": _FLOAT + _NONE, "amp": (str,), "compile": (bool,),
    "head_parallel": (bool,), "flip": (bool,), "seed": _INT, "eval_pairs": _INT, "reward_metric": (str,),
}

BUDGETS: dict[str, Budget] = {
    "proxy": Budget(epochs=3, identities=300, eval_pairs=2000),  # a search trial: a short run on a subset
    "full": Budget(),                                            # a promoted candidate
}


def budget_from(name_or_budget: str | Budget = "proxy", **overrides: Any) -> Budget:
    """A named budget (proxy, full) or a Budget, with fields overridden."""
    if isinstance(name_or_budget, Budget):
        base = name_or_budget
    elif name_or_budget in BUDGETS:
        base = BUDGETS[name_or_budget]
    else:
        raise BudgetError(f"unknown budget {name_or_budget!r}; choose one of {', '.join(BUDGETS)}")
    fields = {f.name for f in dataclasses.fields(Budget)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BudgetError(f"budget: unknown field(s) {unknown}; known: {', '.join(sorted(fields))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}  # TOML and JSON lists
    return dataclasses.replace(base, **overrides)


def budget_dict(budget: Budget) -> Mapping[str, Any]:
    """Plain dict for tracking."""
    return dataclasses.asdict(budget)
