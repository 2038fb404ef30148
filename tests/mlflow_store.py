"""Read an MLflow SQLite store directly, while a search (another thread or process) writes it."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def trials_with_status(db: Path, status: str) -> int:
    """Trial runs in the MLflow store whose ``status`` tag is ``status`` (0 before it exists or
    while it is locked)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            rows = con.execute(
                "select count(*) from tags s join tags k on s.run_uuid = k.run_uuid "
                "where s.key='status' and s.value=? and k.key='run_kind' and k.value='trial'",
                (status,)).fetchone()
        return int(rows[0])
    except sqlite3.Error:
        return 0
