"""Optuna SQLite storages from make_storage run in write-ahead-log mode (the MLflow store: test_tracking.py)."""
from __future__ import annotations

import sqlite3

import pytest

from marginsearch.searchspace.search import make_storage, write_ahead_log


def _mode(path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.parametrize("kind", ["file", "url"])
def test_optuna_sqlite_storage_is_switched_to_wal(tmp_path, kind):
    path = tmp_path / "sub" / "optuna.db"
    make_storage(str(path) if kind == "file" else f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=False)
    assert _mode(path if kind == "file" else tmp_path / "optuna.db") == "wal"


def test_a_locked_file_keeps_its_mode_without_an_error(tmp_path):
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path)
    holder.execute("create table t(x)")
    holder.execute("begin exclusive")
    write_ahead_log(f"sqlite:///{path}")  # cannot switch while another connection holds the lock: no error
    holder.rollback()
    holder.close()
    assert _mode(path) == "delete"
