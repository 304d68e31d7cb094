"""`MarginsearchError`: the one base class of every error that means bad input (a spec, a space, a config, data,
a store).

The command line catches this class alone and prints its one line with exit code 2; any other
exception is a bug and keeps its traceback. It subclasses ValueError, so code written against the
older per-module errors (each a ValueError) keeps working.
"""
from __future__ import annotations

__all__ = ["MarginsearchError"]


class MarginsearchError(ValueError):
    """Bad input to marginsearch: the message names the value, file or field and what is wrong, on one line."""
