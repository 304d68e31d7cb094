"""`DataError`: a data file that cannot be read (its own module, so the readers and the package share it without a
cycle)."""
from __future__ import annotations

from marginsearch.losses.errors import MarginsearchError

__all__ = ["DataError", "one_line"]


class DataError(MarginsearchError):
    """A data file that cannot be read: truncated, malformed, or not what its format promises."""


def one_line(exc: DataError) -> DataError:
    """A DataError as its one-line message: one re-raised by a DataLoader from a worker carries the worker's traceback
    in its message, and the last line is the original error."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    return DataError(last.partition("DataError: ")[2] or last)
