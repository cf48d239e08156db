"""The DB binding's hot-path helpers on every database: `insert_new` reports exactly the
rows it inserted (counting stored keys first or not), and statements run on the driver's
cursor fail like any other statement. On SQLite, WAL checkpoints run in the background."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.bindings.db import Database
from pipeline.env import Env
from pipeline.errors import BindingError, DataError
from pipeline.events import EVENT_COLUMNS
from pipeline.schema import traffic_events as te


def row(i: int) -> tuple[object, ...]:
    return (1_795_000_000_000 + i, f"id-{i}", "GET", f"/p/{i % 3}", 0, 200, 1.5, "h", None, None)


def stored(env: Env) -> list[str]:
    with env.DB.read() as conn:
        return sorted(conn.execute(sa.select(te.c.id)).scalars())


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ([], [0, 1, 2], [0, 1, 2]),  # all new
        ([0, 1, 2], [0, 1, 2], []),  # all duplicates
        ([1, 3], [0, 1, 2, 3, 4], [0, 2, 4]),  # a mix: only the new positions
        ([4], [4, 0], [1]),
    ],
)
@pytest.mark.parametrize("likely_present", [False, True])
def test_insert_new_returns_the_positions_it_inserted(
    env: Env, first: list[int], second: list[int], expected: list[int], likely_present: bool
) -> None:
    """`likely_present` (SQLite counts the stored keys first) changes nothing in the result."""
    db = env.DB
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in first], ("ts", "id")) == list(range(len(first)))
    with db.transaction() as conn:
        got = db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in second], ("ts", "id"), likely_present)
        assert got == expected
    assert stored(env) == sorted(f"id-{i}" for i in set(first) | set(second))


def test_stored_keys_are_counted_exactly_whatever_the_id(env: Env) -> None:
    """The count behind `likely_present` carries keys as JSON: ids with quotes, escapes and
    non-ASCII text, and the largest timestamps, match exactly as stored."""
    ids = ['q"uote', "back\\slash", "tab\tnew\nline", "ünïcødé-✓", "\u2028", "{}[],:"]
    rows = [(2**63 - 1 - i, ident, *row(i)[2:]) for i, ident in enumerate(ids)]
    db = env.DB
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, rows, ("ts", "id")) == list(range(len(rows)))
    again = [*rows, (rows[0][0], "new", *rows[0][2:])]
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, rows, ("ts", "id"), likely_present=True) == []
        assert db.insert_new(conn, te, EVENT_COLUMNS, again, ("ts", "id"), likely_present=True) == [len(rows)]
        if db.dialect == "sqlite":  # the count itself (a wrong one would only cost the insert)
            keys = [r[:2] for r in again] + [(rows[0][0] - 9, ids[0]), (rows[0][0], ids[0] + " ")]
            assert db._count_present(conn, te, ("ts", "id"), keys) == len(again)
    assert stored(env) == sorted([*ids, "new"])


def test_stored_keys_of_a_one_column_key_are_counted(env: Env) -> None:
    meta = sa.MetaData()
    keyed = sa.Table(
        "one_key", meta, sa.Column("seq", sa.Integer, primary_key=True), sa.Column("k", sa.String(8), unique=True)
    )
    db = env.DB
    meta.create_all(db.engine)
    try:
        with db.transaction() as conn:
            assert db.insert_new(conn, keyed, ("k",), [("a",), ("b",)], ("k",)) == [0, 1]
        with db.transaction() as conn:
            assert db.insert_new(conn, keyed, ("k",), [("a",), ("c",)], ("k",), likely_present=True) == [1]
            assert db.insert_new(conn, keyed, ("k",), [("b",), ("c",)], ("k",), likely_present=True) == []
        with db.read() as conn:
            assert sorted(conn.execute(sa.select(keyed.c.k)).scalars()) == ["a", "b", "c"]
            if db.dialect == "sqlite":
                assert db._count_present(conn, keyed, ("k",), ["a", "c", "z", "A"]) == 2
    finally:
        meta.drop_all(db.engine)


def test_fast_path_errors_are_mapped_and_roll_back(env: Env) -> None:
    db = env.DB
    plain = sa.insert(te)  # no ON CONFLICT: a duplicate key is an integrity error
    with pytest.raises(DataError, match=r"uq_traffic_events_ts_id|UNIQUE constraint"), db.transaction() as conn:
        db.executemany(conn, plain, EVENT_COLUMNS, [row(1), row(2)])
        db.executemany(conn, plain, EVENT_COLUMNS, [row(3), row(2)])
    assert stored(env) == []
    missing = sa.table("no_such_table", sa.column("x")).select()
    with pytest.raises(BindingError, match="no_such_table") as caught, db.transaction() as conn:
        db.fetchall(conn, missing)
    assert type(caught.value) is BindingError  # neither transient nor poison


def test_writers_of_one_process_queue_for_the_write_lock(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second writer in the same process waits for the first to commit, however long that
    takes, instead of failing on SQLite's busy timeout (here 20 ms) or polling it."""
    import threading
    import time

    from pipeline import meta, migrate
    from pipeline.bindings.db import engine

    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_MS", 20)
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    migrate.upgrade(db)
    held, order, errors = threading.Event(), [], []

    def second() -> None:
        held.wait()
        try:
            with db.transaction() as conn:
                order.append(("second", meta.increment(db, conn, "n")))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    try:
        with db.transaction() as conn:
            order.append(("first", meta.increment(db, conn, "n")))
            held.set()
            time.sleep(0.3)  # hold the write lock 15 times the busy timeout
        thread.join()
    finally:
        db.dispose()
    assert errors == [] and order == [("first", 1), ("second", 2)]


def _blob_commits(db: Database, start: int, n: int, wait: bool = False) -> None:
    for i in range(start, start + n):
        with db.transaction() as conn:  # about four WAL pages a commit
            conn.exec_driver_sql("INSERT INTO blobs VALUES (?, ?)", (i, bytes(8000)))
        if wait:
            db.wait_checkpoints()


def _wal_pages(path: Path) -> float:
    return path.stat().st_size / (4096 + 24)


BlobDb = tuple[Database, Path, Any]  # the database, its WAL file, the checkpointer's module


@pytest.fixture
def blob_db(tmp_path: Path) -> Iterator[BlobDb]:
    from pipeline.bindings.db import checkpointer

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    with db.transaction() as conn:  # the first commit
        conn.exec_driver_sql("CREATE TABLE blobs (n INTEGER PRIMARY KEY, b BLOB)")
    yield db, tmp_path / "c.db-wal", checkpointer
    db.dispose()


def test_the_writer_leaves_checkpoints_to_the_background(blob_db: BlobDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a wake-up the WAL only grows: SQLite's auto-checkpoint would have started it
    over at 1000 pages."""
    db, wal, cpm = blob_db
    monkeypatch.setattr(cpm, "CHECKPOINT_COMMITS", 10**9)
    monkeypatch.setattr(cpm, "CHECKPOINT_CHANGES", 10**9)
    _blob_commits(db, 0, 500)
    db.wait_checkpoints()
    assert db._checkpointer.runs == 0
    assert _wal_pages(wal) > 1400


def test_background_checkpoints_keep_the_wal_small(blob_db: BlobDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken every 5 commits, the checkpointer copies the WAL back (past the page limit, once
    more holding the writer lock), and the next commit starts the WAL over: 800 pages
    written through a file that never holds 30."""
    db, wal, cpm = blob_db
    monkeypatch.setattr(cpm, "CHECKPOINT_COMMITS", 5)
    monkeypatch.setattr(cpm, "WAL_LIMIT_PAGES", 10)
    _blob_commits(db, 0, 199, wait=True)  # with the table's, 200 commits: 40 wake-ups
    cp = db._checkpointer
    assert (cp.runs, cp.locked_runs) == (40, 40)
    assert _wal_pages(wal) < 30
    con = sqlite3.connect(db.engine.url.database)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*) FROM blobs").fetchone() == (199,)
    con.close()


def test_a_failed_checkpoint_is_tried_again(blob_db: BlobDb, monkeypatch: pytest.MonkeyPatch) -> None:
    db, _wal, cpm = blob_db
    monkeypatch.setattr(cpm, "CHECKPOINT_COMMITS", 3)
    real, calls = db.engine.raw_connection, []

    def flaky() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    monkeypatch.setattr(db.engine, "raw_connection", flaky)
    _blob_commits(db, 0, 3)
    db.wait_checkpoints()
    assert (len(calls), db._checkpointer.runs) == (1, 0)
    _blob_commits(db, 3, 3)
    db.wait_checkpoints()
    assert (len(calls), db._checkpointer.runs) == (2, 1)
