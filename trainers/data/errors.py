"""`DataError`: a data file that cannot be read (its own module, so the readers and the package share it without a
cycle)."""
from __future__ import annotations

from marginsearch.losses.errors import MarginsearchError

__all__ = ["DataError"]


class DataError(MarginsearchError):
    """A data file that cannot be read: truncated, malformed, or not what its format promises."""
