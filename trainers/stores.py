"""Checks of the places a campaign writes to, before anything is opened: the working directory and SQLite stores.

A broken, unreadable or unwritable store ends in one `StoreError` line naming the file and what is
wrong (exit 2 from the CLI), and nothing in it is changed: a SQLite file is only ever opened
read-only here (`PRAGMA quick_check`), and a missing one is left for its owner (MLflow, Optuna) to
create.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from marginsearch.losses.errors import MarginsearchError

__all__ = ["StoreError", "check_workdir", "check_output_file", "check_sqlite_file", "sqlite_path"]


class StoreError(MarginsearchError):
    """A working directory or store that cannot be used: not a folder, not writable, not a database, corrupt."""


def check_workdir(path: Path, what: str = "campaign.workdir") -> None:
    """The folder exists (or can be made) and is writable; a file in its place or a read-only folder is refused."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{what} {path} is a file, not a folder")
    existing = path
    while not existing.exists():  # the nearest existing parent decides whether the folder can be made
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"{what} {path}: {existing} is not writable")


def check_output_file(path: Path, what: str = "--out") -> None:
    """Refuse an output file path that is a folder or lies under a file, before anything is trained or written."""
    if path.is_dir():
        raise StoreError(f"{what} {path} is a folder, not a file")
    check_workdir(path.parent, what)


def sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:/// URI (or a plain path for Optuna), None for other stores and in-memory ones."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        return Path(path) if path not in ("", ":memory:") else None
    if "://" in uri or uri.startswith("journal:"):
        return None
    return Path(uri)


def check_sqlite_file(path: Path, what: str) -> None:
    """An existing SQLite file is a readable, intact database; a missing one needs a writable folder."""
    if not path.exists():
        check_workdir(path.parent, f"{what} folder")
        return
    if path.is_dir():
        raise StoreError(f"{what} {path} is a folder, not a SQLite file")
    if not os.access(path, os.R_OK):
        raise StoreError(f"{what} {path} is not readable")
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{what} {path} is not writable (SQLite needs the file and its folder writable)")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            result = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{what} {path} is not a usable SQLite database ({exc})") from None
    if not result or result[0] != "ok":
        raise StoreError(f"{what} {path} is damaged (SQLite quick_check: {result[0] if result else 'no answer'})")
