"""The worker loop: receive a batch, run the handler inside one DB transaction, settle.

`step()` processes at most one batch and is what tests drive, one call at a time; `run()`
repeats it until asked to stop. The loop owns the transaction; the handler (written
against bindings only) joins it, and when the queue lives in the same database the acks
are part of the same commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import clock, log
from pipeline.bindings.queue import MessageBatch
from pipeline.env import Env

Handler = Callable[[MessageBatch, Env, "Context"], Any]
IDLE_SLEEP_S = 0.2
ERROR_BACKOFF_S = 1.0


class Context:
    """Per-process execution context, like a Worker's `ctx`: `wait_until(fn)` runs `fn` in
    the background, off the critical path; its failure is logged, never raised."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []

    def wait_until(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepipe-bg")
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

    def step(self, wait: float | None = None) -> StepResult | None:
        """Process at most one batch. Returns None when no message was available.

        A queue that shares the DB binding's transaction is waited on outside it and
        received inside it, so taking the messages, the handler's writes and the acks are
        one commit; any other queue is received first and settled after the commit."""
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
        try:
            with self.env.DB.transaction():
                if shared:
                    batch = queue.receive(cfg.max_batch_size, 0.0)
                    if not batch.messages:
                        return None
                report = self.handler(batch, self.env, self.ctx)
                if shared:
                    queue.settle(batch)
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
        for callback in self.on_batch:
            callback(result)
        return result

    def run(self, until_empty: bool = False, max_batches: int | None = None) -> int:
        """Loop over `step()` until stopped, drained (`until_empty`) or `max_batches` done.
        Returns the number of batches processed."""
        done = 0
        while not self.stop_requested and (max_batches is None or done < max_batches):
            result = self.step(wait=0.0 if until_empty else None)
            if result is None:
                if until_empty:
                    break
                clock.sleep(IDLE_SLEEP_S if self.env.config.consumer.max_batch_timeout == 0 else 0)
                continue
            done += 1
        self.ctx.drain()
        return done
