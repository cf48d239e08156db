"""The worker loop: receive a batch, run the handler inside one DB transaction, settle.

`step()` processes at most one batch and is what tests drive, one call at a time; `run()`
repeats it until asked to stop. The loop owns the transaction; the handler (written
against bindings only) joins it, and when the queue lives in the same database the acks
are part of the same commit.

A `pipelined` worker (`edgepipe worker`; the consumer benchmark) whose queue lives in a
database that commits in the background (PostgreSQL: see `Database.transaction`) leaves
each batch's commit in flight while it takes and handles the next: the database writes
one batch while this process decodes the next. A batch is reported (logged, counted,
given to `on_batch`) once its commit is confirmed, during the next step or at `flush()`.
A commit that failed rolled the batch back with its messages: after a transient fault the
loop backs off; after any other failure (a poison, or a check left to the commit:
`RedoBatch`) the batch is handled again at once, and a poison isolated as usual. Nothing
is lost or counted twice. A handler may have the queue take the next batch ahead, in a
transaction of its own (`Queue.take_ahead`, `Database.open_ahead`); `drain()` rolls it
back.

Work beside the batches (the KV snapshot refresher) plugs in as `SideWork`: the worker
advances a durable batch counter inside each batch's transaction, tells the side work each
committed count, and gives it the time between batches. The runtime knows only that
interface; the CLI (the composition root) builds the refresher (`snapshots.refresher`).

`WorkerProcess` is `edgepipe worker`: this loop, a heartbeat row, the job scheduler and
(with `[worker] metrics_port`) a Prometheus metrics port in one process, with a graceful
stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from pipeline import audit, clock, log, meta
from pipeline.bindings.queue import DeadReason, MessageBatch
from pipeline.env import Env
from pipeline.errors import DataError, RedoBatch, TransientError, ValidationError
from pipeline.heartbeat import Heartbeat, process_name

Handler = Callable[[MessageBatch, Env, "Context"], Any]
IDLE_SLEEP_S = 0.2
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
    ok: bool  # the batch committed whole at its first attempt
    report: Any = None
    error: str | None = None  # the first failure, when not ok
    ms: float = 0.0
    transient: bool = False  # a transient fault: nothing settled, the worker backs off `retry_in` seconds
    retry_in: float = 0.0
    isolated: int = 0  # messages that failed alone after the batch was split (dead-lettered or retried)


@dataclass
class _InFlight:
    """A batch handled by a pipelined worker whose commit is in flight."""

    batch: MessageBatch
    result: StepResult
    started: float
    counted: list[int]  # the batch counter's value, once committed
    commit: Future[float]  # its result: the monotonic time of the commit


class SideWork(Protocol):
    """Work a worker does beside its batches (the snapshot refresher): told the number of
    every `every`-th committed batch (the count is advanced inside the batch's own
    transaction, so it survives restarts), given the time between two batches, drained and
    closed with the worker. It must never fail or hold up a batch."""

    every: int

    def committed(self, count: int) -> None: ...

    def between_batches(self) -> None: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Worker:
    env: Env
    handler: Handler
    ctx: Context = field(default_factory=Context)
    stop_requested: bool = False
    batches: int = 0
    on_batch: list[Callable[[StepResult], None]] = field(default_factory=list)
    heartbeat: Heartbeat | None = None
    side: SideWork | None = None  # the snapshot refresher, composed by the CLI
    pipelined: bool = False  # leave a batch's commit in flight while taking the next (see the module's docstring)
    _failures: int = 0  # transient failures in a row
    _wake: threading.Event = field(default_factory=threading.Event)  # cuts a back-off short at a stop
    _in_flight: _InFlight | None = None
    _backlog: bool = False  # the last batch taken was full: the next one is taken without waiting

    def request_stop(self) -> None:
        """Take no new batch; the one in hand finishes."""
        self.stop_requested = True
        self._wake.set()

    def drain(self) -> None:
        """Finish background work (at shutdown, and in tests)."""
        self.flush()
        self.env.DB.cancel_ahead()  # a batch taken ahead goes back to the queue
        if self.side is not None:
            self.side.drain()
        self.ctx.drain()

    def close(self) -> None:
        """`drain()`, then end the background thread and the side work's helpers."""
        self.drain()
        self.ctx.close()
        if self.side is not None:
            self.side.close()

    def _committed(self, counted: list[int]) -> None:
        if counted and self.side is not None:
            self.side.committed(counted[0])

    def step(self, wait: float | None = None) -> StepResult | None:
        """Process at most one batch. Returns None when no message was available.

        A queue that shares the DB binding's transaction is waited on outside it (for a
        full batch, up to `max_batch_timeout`; not at all after a full batch, when a
        backlog is likely: the wait's count would be a query a batch) and received inside
        it, so taking the messages, the handler's writes and the acks are one commit; any
        other queue is received first and settled after the commit.

        A batch that fails inside its transaction is split to find its poison
        (`_isolate`); a transient fault (`TransientError`: a lock, a full disk, a dropped
        connection) settles nothing and counts no delivery: the step reports it and the
        loop backs off (`_back_off`) until the fault clears. A pipelined worker returns
        the batch's result before its commit is confirmed (see the module's docstring)."""
        if self.side is not None:
            self.side.between_batches()
        cfg = self.env.config.consumer
        queue = self.env.QUEUE
        wait_s = cfg.max_batch_timeout if wait is None else wait
        received: MessageBatch | None = None
        try:
            if queue.shares_transaction and not self._backlog:  # after a full batch, take the next at once
                if wait_s > 0 and (failed := self.flush()) is not None:  # no outcome held while waiting
                    return failed
                queue.wait(cfg.max_batch_size, wait_s)
            if queue.shares_transaction:
                take = partial(queue.receive, cfg.max_batch_size, 0.0)
            else:
                received = queue.receive(cfg.max_batch_size, wait_s)
                if not received.messages:
                    return None
                take = partial(_same, received)
        except TransientError as exc:
            return self._back_off(received, exc)
        background = self.pipelined and queue.shares_transaction and self.env.DB.background_commits
        return self._handle(take, received, background)

    def _handle(
        self, take: Callable[[], MessageBatch], received: MessageBatch | None, background: bool
    ) -> StepResult | None:
        """Take a batch (`take`), handle it and settle, in one transaction (committing in
        the background when `background`); isolate its poison when it fails."""
        taken: list[MessageBatch] = []
        started = clock.monotonic()
        try:
            try:
                report, counted = self._transact(take, taken, background)
                self._backlog = len(taken[-1]) >= self.env.config.consumer.max_batch_size
                if not taken[-1].messages:
                    return self.flush()
                result = StepResult(len(taken[-1]), True, report)
            except TransientError:
                raise
            except Exception as exc:
                if not taken or not taken[-1].messages:
                    raise
                self.flush()
                result, counted = self._isolate(taken[-1], exc), []
        except TransientError as exc:
            self.flush()
            return self._back_off(received or (taken[-1] if taken else None), exc)
        if not background:
            return self._done(result, started, counted)
        commit = self.env.DB.committing
        assert commit is not None
        previous, self._in_flight = self._in_flight, _InFlight(taken[-1], result, started, counted, commit)
        if previous is not None and (failed := self._confirm(previous)) is not None:
            return failed
        return result

    def flush(self) -> StepResult | None:
        """Confirm and report the batch whose commit is in flight, if any (see `_confirm`).
        Returns the result of a transient fault met there (the loop backs off), else None."""
        previous, self._in_flight = self._in_flight, None
        return None if previous is None else self._confirm(previous)

    def _confirm(self, batch: _InFlight) -> StepResult | None:
        """Wait for a batch's commit, then report the batch. A commit that failed rolled
        the batch back, and its messages with it: after a transient fault the loop backs
        off (returned); after any other failure (a poison; `RedoBatch`, a check at the
        commit) the batch is handled again at once, in a transaction committed before it
        returns, as much of it as no later batch took meanwhile (a poison then fails again,
        and is isolated as usual). The next batch's commit, if in flight, is confirmed
        first."""
        try:
            committed_at = batch.commit.result()
        except TransientError as exc:
            self.flush()
            return self._back_off(None, exc)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            level = logging.INFO if isinstance(exc, RedoBatch) else logging.WARNING
            log.event("batch_commit_failed", level, messages=len(batch.batch), error=error)
            self.flush()
            again = self._handle(partial(self.env.QUEUE.retake, batch.batch), None, background=False)
            return again if again is not None and again.transient else None
        self._done(batch.result, batch.started, batch.counted, committed_at)
        return None

    def _transact(
        self, take: Callable[[], MessageBatch], taken: list[MessageBatch], background: bool = False
    ) -> tuple[Any, list[int]]:
        """Take a batch (`take` runs inside the transaction), run the handler and settle,
        as one commit when the queue shares the DB's transaction. The batch taken is
        appended to `taken`, so a caller can see it after a failure. Returns the handler's
        report and a list that holds the batch counter's value once committed (empty when
        no snapshots are due)."""
        queue, counted = self.env.QUEUE, list[int]()
        with self.env.DB.transaction(background):
            batch = take()
            taken.append(batch)
            if not batch.messages:
                return None, counted
            report = self.handler(batch, self.env, self.ctx)
            if queue.shares_transaction:
                queue.settle(batch)
            if self.side is not None and self.side.every:  # at the commit: the counter's row is locked only then
                self.env.DB.at_commit(lambda c: counted.append(meta.increment(self.env.DB, c, BATCH_COUNTER)))
        if not queue.shares_transaction:
            queue.settle(batch)
        return report, counted

    def _isolate(self, batch: MessageBatch, exc: Exception) -> StepResult:
        """Find the poison of a batch that failed inside its transaction, as Kafka Connect
        does with errant records: split it in halves, each taken again (`Queue.retake`),
        handled and committed in its own transaction, down to single messages. Every
        message that can commit commits exactly once; one that fails alone is settled on
        its own (`_fail_alone`). A batch of n messages with one poison costs about
        2·log2(n) more transactions; nothing changes on the happy path."""
        result = StepResult(len(batch), False, error=f"{type(exc).__name__}: {exc}")
        reports: list[Any] = []
        pending = [(batch, exc)]
        while pending:
            failed, error = pending.pop()
            if len(failed) == 1:
                self._fail_alone(failed, error)
                result.isolated += 1
                continue
            mid = len(failed) // 2
            for half in (failed.messages[:mid], failed.messages[mid:]):
                sub = MessageBatch(failed.queue, half, failed.lease, None)
                taken: list[MessageBatch] = []
                try:
                    report, counted = self._transact(partial(self.env.QUEUE.retake, sub), taken)
                except TransientError:
                    raise
                except Exception as inner:
                    if taken and taken[-1].messages:
                        pending.append((taken[-1], inner))
                    continue
                reports.append(report)
                self._committed(counted)
        result.report = _merged(reports)
        return result

    def _fail_alone(self, batch: MessageBatch, exc: Exception) -> None:
        """A message that failed in a transaction of its own: poison (a value the database
        refuses, an invalid event) goes to the DLQ at once with the real error; any other
        error retries it, counted toward `max_retries`."""
        msg = batch.messages[0]
        error = f"{type(exc).__name__}: {exc}"
        msg.decision = msg.dead = msg.dead_parts = None
        if isinstance(exc, DataError | ValidationError):
            msg.dead_letter(DeadReason.POISON, error)
        log.event("message_failed", logging.WARNING, message_id=msg.id, poison=msg.decision is not None, error=error)
        self.env.QUEUE.settle(batch, failure=error)

    def _back_off(self, batch: MessageBatch | None, exc: TransientError) -> StepResult:
        """A transient fault: release a leased batch uncounted (a batch taken inside the
        transaction went back with the rollback), report the worker degraded and wait
        exponentially longer (capped, jittered) before the next try."""
        if batch is not None and not self.env.QUEUE.shares_transaction:
            with contextlib.suppress(Exception):  # the fault may stop this too: the lease then expires
                self.env.QUEUE.release(batch)
        cfg = self.env.config.consumer
        self._failures += 1
        ceiling = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** min(self._failures - 1, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        error = f"{type(exc).__name__}: {exc}"
        log.event("worker_degraded", logging.WARNING, failures=self._failures, backoff_s=round(delay, 2), error=error)
        if self.heartbeat is not None:
            self.heartbeat.state = "degraded"
            self.heartbeat.beat(force=True)
        result = StepResult(len(batch) if batch else 0, False, error=error, transient=True, retry_in=delay)
        for callback in self.on_batch:
            callback(result)
        return result

    @property
    def degraded(self) -> bool:
        """Whether the last step met a transient fault (cleared by the next good step)."""
        return self._failures > 0

    def _done(self, result: StepResult, started: float, counted: list[int], ended: float | None = None) -> StepResult:
        result.ms = ((clock.monotonic() if ended is None else ended) - started) * 1000
        if self._failures:
            log.event("worker_recovered", logging.WARNING, after_failures=self._failures)
            self._failures = 0
            if self.heartbeat is not None:
                self.heartbeat.state = "running"
        self.batches += 1
        fields = result.report.as_dict() if hasattr(result.report, "as_dict") else {}
        if isinstance(result.report, dict):
            fields = result.report
        log.event(
            "batch",
            logging.INFO if result.ok else logging.WARNING,
            messages=result.messages,
            ok=result.ok,
            ms=round(result.ms, 1),
            **fields,
            **({"isolated": result.isolated, "error": result.error} if result.error else {}),
        )
        if self.heartbeat is not None and result.messages > result.isolated:  # something was committed
            self.heartbeat.batch_done()
        self._committed(counted)
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
            if result is not None and result.transient:
                self._wake.wait(result.retry_in)
                continue
            if result is None:
                if until_empty:
                    break
                clock.sleep(IDLE_SLEEP_S if self.env.config.consumer.max_batch_timeout == 0 else 0)
                continue
            done += 1
        self.drain()
        return done


def _same(batch: MessageBatch) -> MessageBatch:
    return batch


def _merged(reports: list[Any]) -> dict[str, int]:
    """The counts of the handler reports of a split batch, added up."""
    total: Counter[str] = Counter()
    for report in reports:
        if hasattr(report, "as_dict"):
            total.update(report.as_dict())
    return dict(total)


class ProcessMetrics(Protocol):
    """What a worker process reports to its metrics (`pipeline.worker_metrics.WorkerMetrics`):
    every step's result, every job run's outcome; `start()` opens the metrics port (raising
    an `EdgepipeError` when it cannot), `close()` releases it."""

    def observe_batch(self, result: StepResult) -> None: ...

    def observe_job(self, outcome: Any) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class WorkerProcess:
    """`edgepipe worker`: the consumer loop in the main thread, the job scheduler (built by
    `scheduler_factory(holder, on_run)`, composed by the CLI) in its own thread, a heartbeat
    row and, with `metrics`, a metrics port opened first and closed last. `request_stop()`
    (the first SIGTERM or SIGINT) stops taking batches and job runs; the batch and the job
    run in hand finish, their leases are released, background refreshes drain, and `run()`
    returns."""

    def __init__(
        self,
        env: Env,
        handler: Handler,
        side: Callable[[Context], SideWork | None] | None = None,
        scheduler_factory: Callable[[str, Callable[[Any], None]], Any] | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.env = env
        self.holder = process_name()
        self.heartbeat = Heartbeat(env.DB, self.holder)
        self.metrics = metrics
        ctx = Context()
        self.worker = Worker(
            env, handler, ctx=ctx, heartbeat=self.heartbeat, side=side(ctx) if side else None, pipelined=True
        )
        if metrics is not None:
            self.worker.on_batch.append(metrics.observe_batch)
        self.scheduler: Any = None
        if scheduler_factory is not None:
            self.scheduler = scheduler_factory(self.holder, self._job_done)

    def _job_done(self, outcome: Any) -> None:
        self.heartbeat.job_done()
        if self.metrics is not None:
            self.metrics.observe_job(outcome)

    @property
    def stop_requested(self) -> bool:
        return self.worker.stop_requested

    def request_stop(self) -> None:
        self.worker.request_stop()
        if self.scheduler is not None:
            self.scheduler.stopping.set()

    def run(self) -> int:
        """Serve until stopped; returns the number of batches processed. Starting, it
        records the configuration it runs with in the audit log (`config.loaded`). A metrics
        port that cannot be opened stops it before anything else (`ConfigError`); the port
        is closed last, once the worker has stopped."""
        if self.metrics is None:
            return self._serve()
        try:
            self.metrics.start()
        except BaseException:
            self.worker.close()
            raise
        try:
            return self._serve()
        finally:
            self.metrics.close()

    def _serve(self) -> int:
        self.heartbeat.beat(force=True)
        audit.config_loaded(self.env.DB, self.env.config, "worker", holder=self.holder)
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
