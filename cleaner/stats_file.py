"""`lifetime_stats.json`: the lifetime totals for humans and other tools.

The database stays the source of truth; this file is rewritten after every cleaner run,
atomically (temp file in the same directory, flush, fsync, `os.replace`, fsync of the
directory), so a reader never sees a torn file and a crash keeps the previous version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline import clock, meta
from pipeline.bindings.db import Database
from pipeline.files import write_atomic
from pipeline.schema import lifetime_totals
from pipeline.totals import FIELDS, SCOPE

VERSION = 1
HISTORY_KEY = "cleanup_history"
HISTORY_LEN = 10


def history(conn: sa.Connection) -> list[dict[str, Any]]:
    raw = meta.get(conn, HISTORY_KEY)
    return json.loads(raw) if raw else []


def record_run(db: Database, entry: dict[str, Any]) -> None:
    """Append a run to the last-10 history kept in `edgepipe_meta`."""
    with db.transaction() as conn:
        runs = ([*history(conn), entry])[-HISTORY_LEN:]
        meta.put(db, conn, HISTORY_KEY, json.dumps(runs))


def document(db: Database) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(sa.select(lifetime_totals).where(lifetime_totals.c.scope == SCOPE)).mappings().first()
        started = meta.get(conn, meta.DEPLOYMENT_START)
        runs = history(conn)
    totals = {f: (row[f] if row else 0) for f in FIELDS}
    return {
        "meta": {"version": VERSION, "last_updated": clock.iso(clock.now_s()), "deployment_start_date": started},
        "lifetime_totals": totals,
        "cleanup_history": runs,
    }


def write(db: Database, path: str | os.PathLike[str]) -> dict[str, Any]:
    doc = document(db)
    write_atomic(Path(path), json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n")
    return doc
