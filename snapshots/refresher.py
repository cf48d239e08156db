"""The worker's snapshot refresher: every `[consumer] snapshot_every_batches` committed
batches a new KV snapshot, built off the consumer's critical path.

The worker counts committed batches (a durable counter advanced inside each batch's own
transaction, so it survives restarts) and hands each count to `committed`. A refresh due
while the previous one still runs, or within `[snapshots] min_interval_s` of it, is skipped:
at tens of thousands of events per second ten batches take milliseconds, and a snapshot per
second is fresh enough. By default the document is built by a helper process
(`snapshots.builder`, SCHED_IDLE) and published by the worker between two batches
(`between_batches`): a write of two keys, where a background thread publishing would
contend with the batches for the interpreter and the write lock. With
`[snapshots] build_in = "thread"` the whole refresh runs in the worker's background thread
(`ctx.wait_until`). A failure is logged (`snapshot_refresh_failed`), never charged to a
batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pipeline import clock, log
from pipeline.env import Env
from pipeline.worker import Context
from snapshots.builder import SnapshotBuilder
from snapshots.store import publish, refresh

DRAIN_TIMEOUT_S = 30.0  # how long `drain()` waits for a snapshot being built


class SnapshotRefresher:
    """Implements the worker's `SideWork`. `refresh`: the in-process refresh to run in the
    background thread instead of a helper process (tests and `build_in = "thread"`)."""

    def __init__(
        self, env: Env, ctx: Context, every: int | None = None, refresh_fn: Callable[[Env], Any] | None = None
    ) -> None:
        self.env, self.ctx = env, ctx
        self.every = env.config.consumer.snapshot_every_batches if every is None else every
        self.refresh = refresh_fn
        self.builder: SnapshotBuilder | None = None
        if self.refresh is None:
            if env.config.snapshots.build_in == "process":
                self.builder = SnapshotBuilder(env.DB.url)
            else:
                self.refresh = refresh
        self.refreshes = 0
        self._refreshing: Future[Any] | None = None
        self._last = float("-inf")

    def committed(self, count: int) -> None:
        """Batch number `count` committed: start a refresh when one is due."""
        if not self.every or count % self.every:
            return
        running = self.builder.pending if self.builder is not None else (
            self._refreshing is not None and not self._refreshing.done())  # fmt: skip
        if running:
            log.event("snapshot_refresh_skipped", logging.DEBUG, reason="previous refresh still running", batch=count)
            return
        now = clock.monotonic()
        if now - self._last < self.env.config.snapshots.min_interval_s:
            log.event("snapshot_refresh_skipped", logging.DEBUG, reason="min_interval_s", batch=count)
            return
        self._last = now
        if self.builder is None:
            self._refreshing = self.ctx.wait_until(self._refresh_quietly, count)
            return
        cfg = self.env.config.snapshots
        try:
            self.builder.submit(cfg.window_hours, cfg.top_n, clock.now_s())
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, batch=count, error=f"{type(exc).__name__}: {exc}")

    def between_batches(self, wait: bool = False) -> None:
        """Publish the document the builder has ready (with `wait`, the pending one, given
        up after `DRAIN_TIMEOUT_S`)."""
        builder = self.builder
        if builder is None or not builder.ready(DRAIN_TIMEOUT_S if wait else 0.0):
            if wait and builder is not None and builder.pending:
                log.event("snapshot_refresh_failed", logging.WARNING, error="the build did not finish in time")
                builder.close(wait=False)
            return
        try:
            publish(self.env, builder.take(), self._last)
            self.refreshes += 1
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def drain(self) -> None:
        """Publish a snapshot being built (at shutdown, and in tests)."""
        self.between_batches(wait=True)

    def close(self) -> None:
        if self.builder is not None:
            self.builder.close()

    def _refresh_quietly(self, count: int) -> None:
        assert self.refresh is not None
        try:
            self.refresh(self.env)
            self.refreshes += 1
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, batch=count, error=f"{type(exc).__name__}: {exc}")


def refresher_for(env: Env, ctx: Context) -> SnapshotRefresher | None:
    """The refresher a worker on `env` runs, or None when snapshots are off (no KV binding,
    or `snapshot_every_batches = 0`)."""
    if env.KV is None or not env.config.consumer.snapshot_every_batches:
        return None
    return SnapshotRefresher(env, ctx)
