"""SQLite's WAL checkpoints, moved off the writer into a background thread.

A checkpoint copies the WAL back into the database file and ends with two fsyncs (the
WAL's, then the database file's) whose cost grows with what was written since the last
one. Left to SQLite's auto-checkpoint, a commit now and then pays for it; here the pinned
writer connection (see `Database`) has auto-checkpoints off and wakes a `Checkpointer`
instead. Writers in other processes keep their own auto-checkpoints.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.engine import Engine

# The background checkpointer is woken after this many commits or rows changed by this
# process's writer, whichever comes first: about 1000 WAL pages of consumer batches,
# SQLite's own auto-checkpoint interval.
CHECKPOINT_COMMITS = 100
CHECKPOINT_CHANGES = 10_000
WAL_LIMIT_PAGES = 16_384  # 64 MiB of 4 KiB pages: past this, the WAL is emptied (see Checkpointer)
CATCH_UP_RUNS, CATCH_UP_PAGES = 4, 200


class Checkpointer:
    """SQLite: copies the WAL back into the database file in a background thread, so the
    writer's commits never do it.

    The pinned writer connection has auto-checkpoints off (`wal_autocheckpoint=0`) and,
    every `CHECKPOINT_COMMITS` commits or `CHECKPOINT_CHANGES` changed rows, wakes this
    thread, which runs a PASSIVE checkpoint on its own connection (it waits for no reader or
    writer; the driver releases the GIL meanwhile).

    A PASSIVE checkpoint cannot catch up with a writer that keeps committing, and SQLite
    only starts the WAL file over once everything in it was copied: when the WAL holds
    `WAL_LIMIT_PAGES` or more, the checkpoint is repeated, first without the lock while
    each run still finds more than `CATCH_UP_PAGES` new pages (at most `CATCH_UP_RUNS`
    times), then once holding this process's writer lock, when it copies the few pages
    committed since; the next commit starts the WAL over. The writer waits only for that
    last, short run.

    A failed checkpoint is logged and tried again at the next wake-up, on a fresh
    connection."""

    def __init__(self, engine: Engine, writers: AbstractContextManager[Any]) -> None:
        self._engine, self._writers = engine, writers
        self._cond = threading.Condition()
        self._pending = self._running = self._stopping = False
        self._commits = self._changes_at = 0
        self.runs = self.locked_runs = 0
        self.seconds = 0.0  # time spent in checkpoints, all runs together
        self._thread = threading.Thread(target=self._run, name="edgepipe-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, total_changes: int) -> None:
        """Called by the writer after each commit, with its connection's total_changes."""
        self._commits += 1
        if self._commits >= CHECKPOINT_COMMITS or total_changes - self._changes_at >= CHECKPOINT_CHANGES:
            self._commits, self._changes_at = 0, total_changes
            with self._cond:
                self._pending = True
                self._cond.notify_all()

    def wait_idle(self) -> None:
        """Return once no checkpoint is asked for or running (benchmarks and tests)."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._pending or self._running))

    def _run(self) -> None:
        from pipeline import log

        conn: Any = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    break
                self._pending, self._running = False, True
            started = time.monotonic()
            try:
                conn = conn or self._engine.raw_connection()
                checkpoint = conn.cursor().execute
                _busy, pages, copied = checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.runs += 1
                if pages >= WAL_LIMIT_PAGES:
                    # Catch up without the lock first: the writer waits only for what it
                    # commits during the last of these runs, and the runs get shorter.
                    for _ in range(CATCH_UP_RUNS):
                        before = copied
                        _busy, pages, copied = checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if copied - before < CATCH_UP_PAGES:
                            break
                    with self._writers:
                        checkpoint("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.locked_runs += 1
            except Exception as exc:
                log.event("wal_checkpoint_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.invalidate()  # a fresh connection next time
                conn = None
            finally:
                self.seconds += time.monotonic() - started
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
