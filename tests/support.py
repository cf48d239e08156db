"""Test helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa


@contextlib.contextmanager
def scratch_db(url: str | None, workdir: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file in `workdir` (when `url` is None or a
    SQLite URL), or a throwaway schema on the PostgreSQL server at `url`, dropped on exit."""
    if url is None or url.startswith("sqlite"):
        yield url or f"sqlite:///{workdir / 'edgepipe.db'}"
        return
    schema = f"edgepipe_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def refreshing_worker(env: Any, refresh_fn: Any = None, handler: Any = None) -> Any:
    """A worker (the traffic consumer, or `handler`) with the snapshot refresher, whose
    refresh is `refresh_fn` run in its background thread (None: as configured)."""
    from consumers.traffic import TrafficConsumer
    from pipeline.worker import Context, Worker
    from snapshots.refresher import SnapshotRefresher

    ctx = Context()
    side = SnapshotRefresher(env, ctx, refresh_fn=refresh_fn)
    return Worker(env, handler or TrafficConsumer(env.config).handle_batch, ctx=ctx, side=side)
