"""The DB binding's hot-path helpers on every database: `insert_new` reports exactly the
rows it inserted, and statements run on the driver's cursor fail like any other statement."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from pipeline.env import Env
from pipeline.errors import BindingError
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
def test_insert_new_returns_the_positions_it_inserted(
    env: Env, first: list[int], second: list[int], expected: list[int]
) -> None:
    db = env.DB
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in first], ("ts", "id")) == list(range(len(first)))
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in second], ("ts", "id")) == expected
    assert stored(env) == sorted(f"id-{i}" for i in set(first) | set(second))


def test_fast_path_errors_are_mapped_and_roll_back(env: Env) -> None:
    db = env.DB
    plain = sa.insert(te)  # no ON CONFLICT: a duplicate key is an integrity error
    with pytest.raises(sa.exc.IntegrityError), db.transaction() as conn:
        db.executemany(conn, plain, EVENT_COLUMNS, [row(1), row(2)])
        db.executemany(conn, plain, EVENT_COLUMNS, [row(3), row(2)])
    assert stored(env) == []
    missing = sa.table("no_such_table", sa.column("x")).select()
    with pytest.raises(BindingError, match="no_such_table"), db.transaction() as conn:
        db.fetchall(conn, missing)


def test_writers_of_one_process_queue_for_the_write_lock(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second writer in the same process waits for the first to commit, however long that
    takes, instead of failing on SQLite's busy timeout (here 20 ms) or polling it."""
    import threading
    import time

    from pipeline import meta, migrate
    from pipeline.bindings import db as dbm

    monkeypatch.setattr(dbm, "SQLITE_BUSY_TIMEOUT_MS", 20)
    db = dbm.Database(f"sqlite:///{tmp_path / 'w.db'}")
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
