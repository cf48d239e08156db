"""Test helpers shared by several test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.bench.scratch import scratch_db as bench_scratch_db


@contextlib.contextmanager
def scratch_db(url: str | None, workdir: Path) -> Iterator[str]:
    """A fresh, empty database URL (see `pipeline.bench.scratch.scratch_db`), its
    PostgreSQL schemas named `edgepipe_test_…`."""
    with bench_scratch_db(url, workdir, prefix="edgepipe_test") as fresh:
        yield fresh


def refreshing_worker(env: Any, refresh_fn: Any = None, handler: Any = None) -> Any:
    """A worker (the traffic consumer, or `handler`) with the snapshot refresher, whose
    refresh is `refresh_fn` run in its background thread (None: as configured)."""
    from consumers.traffic import TrafficConsumer
    from pipeline.worker import Context, Worker
    from snapshots.refresher import SnapshotRefresher

    ctx = Context()
    side = SnapshotRefresher(env, ctx, refresh_fn=refresh_fn)
    return Worker(env, handler or TrafficConsumer(env.config).handle_batch, ctx=ctx, side=side)
