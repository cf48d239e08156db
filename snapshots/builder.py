"""Snapshot documents built by a helper process, so a refresh costs the consumer nothing.

A refresh is one query that ranks the window's hourly rows by (path, method): tens of
milliseconds over a day of 2,000 paths, nearly all of it inside SQLite. Run in a thread of
the worker, it still cost the consumer 10-20% of its throughput at batch 100 with a refresh
every 10 batches; the same query in a process of its own cost it 0-5% (measured side by
side at a million events). So the worker's refresh asks a `SnapshotBuilder` for the
document; the helper holds its own DB binding on the same URL and only reads. The version
counter and the KV writes stay in the worker, under its write lock, with whatever KV
binding it has. `[snapshots] build_in = "thread"` builds in the worker instead (an
in-memory SQLite database has nothing a second process could open).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any

from pipeline import procs
from pipeline.errors import BindingError


class SnapshotBuilder:
    """`build(window_hours, top_n, now_s)` answered by a helper process on `db_url`, started
    on first use and started again after it dies. One request at a time; `close()` ends the
    process (so does dropping the builder). `cpu_s` is the CPU time the helper spent
    building."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.cpu_s = 0.0
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._finalizer: Any = None

    def build(self, window_hours: int, top_n: int, now_s: float) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send((window_hours, top_n, now_s))
                ok, value, cpu_s = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._stop()
                raise BindingError(f"snapshot builder process stopped: {type(exc).__name__} {exc}") from None
        self.cpu_s += cpu_s
        if not ok:
            raise BindingError(f"snapshot builder: {value}")
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        self._proc, self._conn = procs.start(_serve, self.db_url, name="edgepipe-snapshot-builder")
        self._finalizer = weakref.finalize(self, procs.end, self._proc, self._conn)

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._conn = self._finalizer = None


def _serve(db_url: str, conn: Any) -> None:
    """The helper's loop: answer each (window_hours, top_n, now_s) with (ok, document or
    error, CPU seconds spent); exit when the worker closes the pipe or dies."""
    with contextlib.suppress(OSError):
        os.nice(19)  # like the worker's background thread: spare cycles first
    from pipeline.bindings.db import Database
    from snapshots.store import build

    db = Database(db_url)
    try:
        while True:
            try:
                window_hours, top_n, now_s = conn.recv()
            except EOFError:
                return
            cpu = time.process_time()
            try:
                reply: tuple[bool, Any] = (True, build(db, window_hours, top_n, now_s))
            except Exception as exc:
                reply = (False, f"{type(exc).__name__}: {exc}")
            conn.send((*reply, time.process_time() - cpu))
    finally:
        db.dispose()
