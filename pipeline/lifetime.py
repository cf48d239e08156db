"""Deployment facts kept in `edgepipe_meta` (deployment start) and lifetime totals."""

from __future__ import annotations

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.schema import meta

DEPLOYMENT_START = "deployment_started_at"


def ensure_deployment_start(db: Database) -> str:
    """Record the deployment start once (at first init); return it."""
    with db.transaction() as conn:
        conn.execute(
            db.insert(meta)
            .values(key=DEPLOYMENT_START, value=clock.iso(clock.now_s()))
            .on_conflict_do_nothing(index_elements=["key"])
        )
        return conn.execute(meta.select().where(meta.c.key == DEPLOYMENT_START)).one().value
