"""Fault injection for the kill-and-resume tests, behind one seam: production code has no fault hooks.

With ``MARGINSEARCH_FAULT=<point>:<n>`` in the environment, `install_from_environment()` (called
once by the CLI's `main`) wraps the function that `FAULT_POINTS[point]` names, so that this process
SIGKILLs itself the n-th time the campaign passes that point: just before the call ("before"), or
just after it returns ("after"). Without the variable nothing is wrapped. Points in Ray workers
are not covered (the CLI of the coordinator installs them).
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["FAULT_ENV", "FAULT_POINTS", "install", "install_from_environment"]

FAULT_ENV = "MARGINSEARCH_FAULT"

# point: (module, attribute (Class.method or function), "before" | "after")
FAULT_POINTS: dict[str, tuple[str, str, str]] = {
    "trial": ("marginsearch.trainers.tracking", "TrialRun.log_epoch", "before"),          # a trial's epoch ended
    "log": ("marginsearch.trainers.tracking", "TrialRun.log_epoch", "after"),             # ... and was logged
    "finish": ("marginsearch.trainers.campaign", "TrackedObjective.__call__", "after"),   # a trial ran to its end
    "promote": ("marginsearch.trainers.train", "_save_checkpoint", "after"),              # a promoted epoch saved
    "promoted-log": ("marginsearch.trainers.tracking", "log_embedding_model", "before"),  # before the model upload
    "register": ("marginsearch.trainers.registry", "register_and_gate", "before"),        # before registering
    "gate": ("marginsearch.trainers.registry", "_decide", "before"),                      # registered, not yet gated
    "end": ("marginsearch.trainers.tracking", "CampaignTracker.end_search", "before"),    # done, parent run not ended
}


def _killer(count: int) -> Callable[[], None]:
    hits = [0]

    def hit() -> None:
        hits[0] += 1
        if hits[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def install(point: str, count: int = 1) -> None:
    """Wrap the function of `point` so that the `count`-th pass SIGKILLs this process."""
    if point not in FAULT_POINTS:
        raise KeyError(f"unknown fault point {point!r}; known: {', '.join(FAULT_POINTS)}")
    module_name, attribute, when = FAULT_POINTS[point]
    owner: Any = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    hit = _killer(count)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            hit()
        result = original(*args, **kwargs)
        if when == "after":
            hit()
        return result

    setattr(owner, name, wrapped)


def install_from_environment() -> None:
    """Install the fault that MARGINSEARCH_FAULT=<point>:<n> names, if any."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted:
        point, _, count = wanted.partition(":")
        install(point, int(count or 1))
