"""The worker loop: receive a batch, run the handler inside one DB transaction, settle.

`step()` processes at most one batch and is what tests drive, one call at a time; `run()`
repeats it until asked to stop. The loop owns the transaction; the handler (written
against bindings only) joins it, and when the queue lives in the same database the acks
are part of the same commit.

Every `[consumer] snapshot_every_batches` committed batches the worker refreshes the KV
snapshot (skipping a refresh while the previous one runs, or within
`[snapshots] min_interval_s` of it: at tens of thousands of events per second ten batches
take milliseconds, and a snapshot per second is fresh enough). The batch counter lives
in the `counters` table and is advanced inside the batch's own transaction, so it
survives restarts and counts exactly the committed batches; the refresh itself runs in
the background (`ctx.wait_until`) after the commit, and its failure is logged, never
charged to the batch. By default the snapshot document is built by a helper process
(`snapshots.builder`) and the worker publishes it between batches; with
`[snapshots] build_in = "thread"` the whole refresh runs in the background thread.

`WorkerProcess` is `edgepipe worker`: this loop, a heartbeat row and the job scheduler in
one process, with a graceful stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import clock, log, meta
from pipeline.bindings.queue import MessageBatch
from pipeline.env import Env
from pipeline.heartbeat import Heartbeat, process_name

Handler = Callable[[MessageBatch, Env, "Context"], Any]
IDLE_SLEEP_S = 0.2
DRAIN_TIMEOUT_S = 30.0  # how long `drain()` waits for a snapshot being built
BATCH_COUNTER = "consumed_batches"


class Context:
    """Per-process execution context, like a Worker's `ctx`: `wait_until(fn)` runs `fn` in
    the background, off the critical path; its failure is logged, never raised."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []

    def wait_until(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="edgepipe-bg", initializer=_background_priority
            )
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(_log_failure)
        self._pending = [f for f in self._pending if not f.done()] + [fut]
        return fut

    def drain(self) -> None:
        """Wait for background tasks (at shutdown, and in tests)."""
        for fut in list(self._pending):
            fut.exception()
        self._pending.clear()

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _background_priority() -> None:
    """Run background work at the lowest CPU priority (Linux schedules threads as tasks):
    on a busy machine it waits for spare cycles instead of taking them from batches."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _log_failure(fut: Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.event("background_task_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")


@dataclass
class StepResult:
    messages: int
    ok: bool
    report: Any = None
    error: str | None = None
    ms: float = 0.0


@dataclass
class Worker:
    env: Env
    handler: Handler
    ctx: Context = field(default_factory=Context)
    stop_requested: bool = False
    batches: int = 0
    on_batch: list[Callable[[StepResult], None]] = field(default_factory=list)
    heartbeat: Heartbeat | None = None
    snapshot_every: int | None = None  # None: `[consumer] snapshot_every_batches`; 0: never
    refresh: Callable[[Env], Any] | None = None  # None: `snapshots.refresh`
    refreshes: int = 0
    builder: Any = None  # a SnapshotBuilder, when refreshes build in a helper process
    _refreshing: Future[Any] | None = None
    _last_refresh: float = float("-inf")

    def __post_init__(self) -> None:
        if self.snapshot_every is None:
            self.snapshot_every = self.env.config.consumer.snapshot_every_batches
        if self.snapshot_every and self.env.KV is None:
            self.snapshot_every = 0  # no KV binding: nothing to publish to
        if self.snapshot_every and self.refresh is None:
            if self.env.config.snapshots.build_in == "process":
                from snapshots.builder import SnapshotBuilder

                self.builder = SnapshotBuilder(self.env.DB.url)
            else:
                from snapshots import refresh

                self.refresh = refresh

    def request_stop(self) -> None:
        """Take no new batch; the one in hand finishes."""
        self.stop_requested = True

    def drain(self) -> None:
        """Finish background work: a snapshot being built is published, background tasks
        end (at shutdown, and in tests)."""
        self._publish_built(wait=True)
        self.ctx.drain()

    def close(self) -> None:
        """`drain()`, then end the background thread and the snapshot builder's process."""
        self.drain()
        self.ctx.close()
        if self.builder is not None:
            self.builder.close()

    def _maybe_refresh(self, count: int | None) -> None:
        if not count or not self.snapshot_every or count % self.snapshot_every:
            return
        running = self.builder.pending if self.builder is not None else (
            self._refreshing is not None and not self._refreshing.done())  # fmt: skip
        if running:
            log.event("snapshot_refresh_skipped", logging.DEBUG, reason="previous refresh still running", batch=count)
            return
        now = clock.monotonic()
        if now - self._last_refresh < self.env.config.snapshots.min_interval_s:
            log.event("snapshot_refresh_skipped", logging.DEBUG, reason="min_interval_s", batch=count)
            return
        self._last_refresh = now
        if self.builder is None:
            self._refreshing = self.ctx.wait_until(self._refresh_quietly, count)
            return
        cfg = self.env.config.snapshots
        try:
            self.builder.submit(cfg.window_hours, cfg.top_n, clock.now_s())
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, batch=count, error=f"{type(exc).__name__}: {exc}")

    def _publish_built(self, wait: bool = False) -> None:
        """Publish the document the builder has ready (with `wait`, the pending one, given
        up after `DRAIN_TIMEOUT_S`). It runs between batches: a write of two keys, where a
        background thread publishing would contend with the batches for the interpreter
        and the write lock."""
        builder = self.builder
        if builder is None or not builder.ready(DRAIN_TIMEOUT_S if wait else 0.0):
            if wait and builder is not None and builder.pending:
                log.event("snapshot_refresh_failed", logging.WARNING, error="the build did not finish in time")
                builder.close(wait=False)
            return
        from snapshots import publish

        try:
            publish(self.env, builder.take(), self._last_refresh)
            self.refreshes += 1
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def _refresh_quietly(self, count: int) -> None:
        assert self.refresh is not None
        try:
            self.refresh(self.env)
            self.refreshes += 1
        except Exception as exc:
            log.event("snapshot_refresh_failed", logging.WARNING, batch=count, error=f"{type(exc).__name__}: {exc}")

    def step(self, wait: float | None = None) -> StepResult | None:
        """Process at most one batch. Returns None when no message was available.

        A queue that shares the DB binding's transaction is waited on outside it and
        received inside it, so taking the messages, the handler's writes and the acks are
        one commit; any other queue is received first and settled after the commit."""
        self._publish_built()
        cfg = self.env.config.consumer
        queue = self.env.QUEUE
        wait_s = cfg.max_batch_timeout if wait is None else wait
        shared = queue.shares_transaction
        batch: MessageBatch | None = None
        if shared:
            queue.wait(cfg.max_batch_size, wait_s)
        else:
            batch = queue.receive(cfg.max_batch_size, wait_s)
            if not batch.messages:
                return None
        started = clock.monotonic()
        count = None
        try:
            with self.env.DB.transaction() as conn:
                if shared:
                    batch = queue.receive(cfg.max_batch_size, 0.0)
                    if not batch.messages:
                        return None
                report = self.handler(batch, self.env, self.ctx)
                if shared:
                    queue.settle(batch)
                if self.snapshot_every:  # last: the counter's row lock is held only to the commit
                    count = meta.increment(self.env.DB, conn, BATCH_COUNTER)
            if not shared:
                queue.settle(batch)
            result = StepResult(len(batch), True, report)
        except Exception as exc:
            if batch is None or not batch.messages:
                raise
            error = f"{type(exc).__name__}: {exc}"
            queue.settle(batch, failure=error)
            result = StepResult(len(batch), False, error=error)
        result.ms = (clock.monotonic() - started) * 1000
        self.batches += 1
        fields = result.report.as_dict() if hasattr(result.report, "as_dict") else {}
        log.event(
            "batch",
            logging.INFO if result.ok else logging.WARNING,
            messages=result.messages,
            ok=result.ok,
            ms=round(result.ms, 1),
            **fields,
            **({"error": result.error} if result.error else {}),
        )
        if result.ok:
            if self.heartbeat is not None:
                self.heartbeat.batch_done()
            self._maybe_refresh(count)
        for callback in self.on_batch:
            callback(result)
        return result

    def run(self, until_empty: bool = False, max_batches: int | None = None) -> int:
        """Loop over `step()` until stopped, drained (`until_empty`) or `max_batches` done.
        Returns the number of batches processed."""
        done = 0
        while not self.stop_requested and (max_batches is None or done < max_batches):
            if self.heartbeat is not None:
                self.heartbeat.beat()
            result = self.step(wait=0.0 if until_empty else None)
            if result is None:
                if until_empty:
                    break
                clock.sleep(IDLE_SLEEP_S if self.env.config.consumer.max_batch_timeout == 0 else 0)
                continue
            done += 1
        self.drain()
        return done


class WorkerProcess:
    """`edgepipe worker`: the consumer loop in the main thread, the job scheduler in
    APScheduler's thread, and a heartbeat row. `request_stop()` (the first SIGTERM or
    SIGINT) stops taking batches and job runs; the batch and the job run in hand finish,
    their leases are released, background refreshes drain, and `run()` returns."""

    def __init__(self, env: Env, handler: Handler, with_scheduler: bool = True) -> None:
        self.env = env
        self.holder = process_name()
        self.heartbeat = Heartbeat(env.DB, self.holder)
        self.worker = Worker(env, handler, heartbeat=self.heartbeat)
        self.scheduler: Any = None
        if with_scheduler:
            from scheduler.service import JobScheduler

            self.scheduler = JobScheduler(env, self.holder, on_run=lambda _outcome: self.heartbeat.job_done())

    @property
    def stop_requested(self) -> bool:
        return self.worker.stop_requested

    def request_stop(self) -> None:
        self.worker.request_stop()
        if self.scheduler is not None:
            self.scheduler.stopping.set()

    def run(self) -> int:
        """Serve until stopped; returns the number of batches processed."""
        self.heartbeat.beat(force=True)
        log.event("worker_started", holder=self.holder, db=self.env.DB)
        try:
            if self.scheduler is not None:
                self.scheduler.start()
            return self.worker.run()
        finally:
            self.heartbeat.beat("stopping", force=True)
            if self.scheduler is not None:
                self.scheduler.stop(wait=True)
            self.worker.close()
            self.heartbeat.beat("stopped", force=True)
            log.event("worker_stopped", holder=self.holder, batches=self.worker.batches)
