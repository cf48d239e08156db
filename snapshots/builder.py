"""Snapshot documents built by a helper process, off the consumer's CPU.

A refresh is one query that ranks the window's hourly rows by (path, method): tens of
milliseconds over a day of 2,000 paths, nearly all of it inside SQLite. Run in a thread of
the worker, it cost the consumer 13-19% of its throughput at batch 100 with a refresh every
10 batches, though SQLite runs it outside the interpreter lock. So the worker submits a
build to a `SnapshotBuilder` and carries on; the helper holds its own DB binding on the
same URL, only reads, and runs under SCHED_IDLE (CPU time nothing else wants). When the
document is ready the worker publishes it between two batches (the version counter and
the KV writes, with whatever KV binding it has). `[snapshots] build_in = "thread"` runs
the whole refresh in the worker's background thread instead (an in-memory SQLite database
has nothing a second process could open).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from typing import Any

from pipeline import procs
from pipeline.errors import BindingError


class SnapshotBuilder:
    """Snapshot documents built by a helper process on `db_url`, started on first use and
    started again after it dies. One request at a time: `submit()` it, see whether it is
    `ready()`, `take()` the document (waiting for it if need be); `build()` does all three.
    `close()` ends the process (so does dropping the builder). `cpu_s` is the CPU time the
    helper spent building."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.cpu_s = 0.0
        self.pending = False
        self._proc: Any = None
        self._conn: Any = None
        self._finalizer: Any = None

    def build(self, window_hours: int, top_n: int, now_s: float) -> dict[str, Any]:
        self.submit(window_hours, top_n, now_s)
        return self.take()

    def submit(self, window_hours: int, top_n: int, now_s: float) -> None:
        if self.pending:
            raise RuntimeError("a snapshot build is already pending; take() it first")
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            self._start()
        try:
            self._conn.send((window_hours, top_n, now_s))
        except OSError as exc:
            self._stop()
            raise BindingError(f"snapshot builder process stopped: {type(exc).__name__} {exc}") from None
        self.pending = True

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether `take()` would return at once (the document, or the error), waiting up
        to `timeout` seconds for it."""
        return self.pending and self._conn.poll(timeout)

    def take(self) -> dict[str, Any]:
        """The pending request's document; raises BindingError if the build failed."""
        if not self.pending:
            raise RuntimeError("no snapshot build is pending")
        self.pending = False
        try:
            ok, value, cpu_s = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._stop()
            raise BindingError(f"snapshot builder process stopped: {type(exc).__name__} {exc}") from None
        self.cpu_s += cpu_s
        if not ok:
            raise BindingError(f"snapshot builder: {value}")
        return value

    def close(self, wait: bool = True) -> None:
        """End the helper (without `wait`, kill it at once)."""
        self.pending = False
        self._stop(wait)

    def _start(self) -> None:
        self._proc, self._conn = procs.start(_serve, self.db_url, name="edgepipe-snapshot-builder")
        self._finalizer = weakref.finalize(self, procs.end, self._proc, self._conn)

    def _stop(self, wait: bool = True) -> None:
        if self._finalizer is not None and self._finalizer.detach() is not None:
            procs.end(self._proc, self._conn, wait)
        self._proc = self._conn = self._finalizer = None


# What the pipe raises once the worker's end is gone (closed, or its process killed):
# EOFError on a read, BrokenPipeError / ConnectionResetError (OSErrors) on a write.
PIPE_GONE = (EOFError, OSError)


def _serve(db_url: str, conn: Any) -> None:
    """The helper's loop: answer each (window_hours, top_n, now_s) with (ok, document or
    error, CPU seconds spent); exit quietly (status 0, nothing on stderr) when the worker
    closes the pipe or dies, whether it was waiting for a request or answering one."""
    # Only CPU time nothing else wants: the scheduler then places a waking consumer on this
    # CPU as on an idle one. At nice 19 instead, a busy loop beside the consumer cost it
    # 3-11% of its throughput; under SCHED_IDLE, nothing measurable.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        with contextlib.suppress(OSError):
            os.nice(19)
    from pipeline.bindings.db import Database
    from snapshots.store import build

    db = Database(db_url)
    try:
        while True:
            try:
                window_hours, top_n, now_s = conn.recv()
            except PIPE_GONE:  # the worker closed its end, or died
                return
            cpu = time.process_time()
            try:
                reply: tuple[bool, Any] = (True, build(db, window_hours, top_n, now_s))
            except Exception as exc:
                reply = (False, f"{type(exc).__name__}: {exc}")
            try:
                conn.send((*reply, time.process_time() - cpu))
            except PIPE_GONE:  # the worker went away while this build ran: nobody to answer
                return
    finally:
        db.dispose()
