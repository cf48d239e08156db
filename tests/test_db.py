"""The DB binding's hot-path helpers on every database: `insert_new` reports exactly the
rows it inserted (counting stored keys first, trying a plain insert first, or neither),
additive upserts add up the same whether the rows travel as JSON or through PostgreSQL's
staging table, refused values are data errors either way, and statements run on the
driver's cursor fail like any other statement. On SQLite, WAL checkpoints run in the
background."""

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


@pytest.fixture
def all_new_tries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`likely_new` tries its all-new insert (PostgreSQL) whatever the number of rows; the
    list counts the tries."""
    from pipeline.bindings.db import bulk

    tries: list[int] = []
    real = bulk.Bulk._insert_all_new

    def spy(self: Any, *args: Any) -> bool:
        tries.append(1)
        return real(self, *args)

    monkeypatch.setattr(bulk, "ALL_NEW_MIN_ROWS", 1)
    monkeypatch.setattr(bulk.Bulk, "_insert_all_new", spy)
    return tries


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ([], [0, 1, 2], [0, 1, 2]),  # all new
        ([0, 1, 2], [0, 1, 2], []),  # all duplicates
        ([1, 3], [0, 1, 2, 3, 4], [0, 2, 4]),  # a mix: only the new positions
        ([4], [4, 0], [1]),
    ],
)
@pytest.mark.parametrize("hint", ["none", "likely_present", "likely_new"])
def test_insert_new_returns_the_positions_it_inserted(
    env: Env, first: list[int], second: list[int], expected: list[int], hint: str, all_new_tries: list[int]
) -> None:
    """The hints (count the stored keys first; try a plain insert in a savepoint first)
    change nothing in the result."""
    db = env.DB
    hints = {hint: True} if hint != "none" else {}
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in first], ("ts", "id")) == list(range(len(first)))
    with db.transaction() as conn:
        got = db.insert_new(conn, te, EVENT_COLUMNS, [row(i) for i in second], ("ts", "id"), **hints)
        assert got == expected
    assert len(all_new_tries) == (hint == "likely_new" and db.dialect == "postgresql")
    assert stored(env) == sorted(f"id-{i}" for i in set(first) | set(second))


def test_a_failed_plain_insert_keeps_the_rest_of_the_transaction(env: Env, all_new_tries: list[int]) -> None:
    """`likely_new` meeting a stored key rolls back its own attempt only: what the transaction
    wrote before stays, and the rows are then inserted as usual."""
    db = env.DB
    with db.transaction() as conn:
        db.insert_new(conn, te, EVENT_COLUMNS, [row(1)], ("ts", "id"))
    with db.transaction() as conn:
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(2)], ("ts", "id"), likely_new=True) == [0]
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(3), row(1), row(4)], ("ts", "id"), likely_new=True) == [0, 2]
        assert db.insert_new(conn, te, EVENT_COLUMNS, [row(5)], ("ts", "id"), likely_new=True) == [0]
    assert stored(env) == [f"id-{i}" for i in range(1, 6)]


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize(
    ("bad", "why"),
    [((5, 40_000), "smallint"), ((1, "i" * 129), "too long"), ((0, 2**63), "out of range|too big")],
    ids=["smallint overflow (COPY declines it)", "id too long", "ts past 64 bits"],
)
def test_a_value_refused_by_the_all_new_insert_is_a_data_error(
    env: Env, bad: tuple[int, Any], why: str, all_new_tries: list[int]
) -> None:
    """Whether COPY takes the rows or declines them (a SMALLINT out of range, which psycopg
    would write wrapped around), a value PostgreSQL refuses is poison, and nothing is
    stored."""
    db = env.DB
    position, value = bad
    poison = list(row(2))
    poison[position] = value
    with pytest.raises(DataError, match=why), db.transaction() as conn:
        db.insert_new(conn, te, EVENT_COLUMNS, [row(1), tuple(poison)], ("ts", "id"), likely_new=True)
    assert stored(env) == [] and all_new_tries == [1]


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
        # the count itself (a wrong one would only cost the insert)
        keys = [r[:2] for r in again] + [(rows[0][0] - 9, ids[0]), (rows[0][0], ids[0] + " ")]
        assert db._count_present(conn, te, ("ts", "id"), keys) == len(again)
    assert stored(env) == sorted([*ids, "new"])


def test_stored_keys_are_counted_exactly_whether_their_span_is_narrow_or_wide(env: Env) -> None:
    """PostgreSQL reads the stored keys of a narrow span of timestamps in one walk, and
    probes key by key when the span holds many more rows than the batch: same count."""
    db = env.DB
    rows = [(1000 + i, f"id-{i}", *row(i)[2:]) for i in range(60)]
    with db.transaction() as conn:
        db.insert_new(conn, te, EVENT_COLUMNS, rows, ("ts", "id"))
        narrow = [(1010, "id-10"), (1011, "id-11"), (1011, "other"), (1012, "id-12")]
        wide = [(1000, "id-0"), (1059, "id-59"), (1030, "nope")]  # 60 rows in the span of 3 keys
        assert db._count_present(conn, te, ("ts", "id"), narrow) == 3
        assert db._count_present(conn, te, ("ts", "id"), wide) == 2
        assert db._count_present(conn, te, ("ts", "id"), [(999, "id-0"), (2000, "id-1")]) == 0


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
    cp = db.checkpointer
    assert cp is not None and (cp.runs, cp.locked_runs) == (40, 40)
    assert cp.seconds > 0  # their time, for the worker's metrics
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


# -- additive upserts, deletes by key ------------------------------------------------------


@pytest.fixture
def tally(env: Env) -> Iterator[tuple[Database, sa.Table]]:
    """A scratch table of additive counts: a text key, a SMALLINT, a BIGINT, a minimum."""
    meta = sa.MetaData()
    table = sa.Table(
        "tally",
        meta,
        sa.Column("k", sa.String(8), primary_key=True),
        sa.Column("n", sa.SmallInteger, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("low", sa.Float, nullable=False),
    )
    meta.create_all(env.DB.engine)
    yield env.DB, table
    meta.drop_all(env.DB.engine)


def _tallied(db: Database, table: sa.Table) -> dict[str, tuple[Any, ...]]:
    with db.read() as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(sa.select(table))}


STAGED = pytest.mark.parametrize("staged", [False, True], ids=["json", "staging table"])


@STAGED
def test_upserts_add_up_the_same_either_way(
    tally: tuple[Database, sa.Table], staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows sent as JSON or through PostgreSQL's staging table (SQLite: the same executemany)
    add up the same, also when one transaction upserts twice (the staging table is emptied
    before each use)."""
    from pipeline.bindings.db import bulk

    monkeypatch.setattr(bulk, "STAGE_MIN_ROWS", 1 if staged else 10**9)
    db, table = tally
    cols = ("k", "n", "total", "low")

    def upsert(conn: Any, rows: list[tuple[Any, ...]]) -> None:
        db.upsert_add_rows(conn, table, cols, rows, ("k",), minimum=["low"])

    with db.transaction() as conn:
        upsert(conn, [("b", 1, 10, 5.5), ("a", 2, 2**40, 1.0), ("é'\"\\,{}", 3, -7, 0.25)])
    with db.transaction() as conn:
        upsert(conn, [("b", 4, 1, 9.0), ("c", 1, 1, 2.0)])
        upsert(conn, [("c", 1, 1, 1.5), ("a", 1, 1, 3.0)])
    assert _tallied(db, table) == {
        "a": (3, 2**40 + 1, 1.0),
        "b": (5, 11, 5.5),
        "c": (2, 2, 1.5),
        "é'\"\\,{}": (3, -7, 0.25),
    }


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
@STAGED
@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (("x", 40_000, 1, 1.0), "smallint"),
        (("x" * 9, 1, 1, 1.0), "too long"),
        (("x", 1, 2**63, 1.0), "out of range|too big"),
    ],
    ids=["smallint overflow", "key too long", "past 64 bits"],
)
def test_a_value_postgresql_refuses_is_a_data_error_either_way(
    tally: tuple[Database, sa.Table], staged: bool, bad: tuple[Any, ...], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poison, not a fault, however the rows travel: the staging table's loose types leave
    the refusal to the statement that writes the row."""
    from pipeline.bindings.db import bulk

    monkeypatch.setattr(bulk, "STAGE_MIN_ROWS", 1 if staged else 10**9)
    db, table = tally
    with pytest.raises(DataError, match=why), db.transaction() as conn:
        db.upsert_add_rows(conn, table, ("k", "n", "total", "low"), [("ok", 1, 1, 1.0), bad], ("k",))
    assert _tallied(db, table) == {}


def test_delete_keys_deletes_exactly_those_keys(env: Env) -> None:
    """Integer keys (the queue's) and text keys that need quoting in an array literal."""
    meta = sa.MetaData()
    table = sa.Table("keyed", meta, sa.Column("n", sa.Integer, primary_key=True), sa.Column("k", sa.Text, unique=True))
    texts = ['q"uote', "back\\slash", "a,b", "{x}", " spaced ", "NULL", "é✓", "plain"]
    db = env.DB
    meta.create_all(db.engine)
    try:
        with db.transaction() as conn:
            conn.execute(sa.insert(table), [{"n": i, "k": t} for i, t in enumerate(texts)])
        with db.transaction() as conn:
            db.delete_keys(conn, table, "k", texts[:6])
            db.delete_keys(conn, table, "n", [7, 99])
        with db.read() as conn:
            assert list(conn.execute(sa.select(table.c.k)).scalars()) == ["é✓"]
    finally:
        meta.drop_all(db.engine)


def test_delete_keys_deletes_runs_of_integers_exactly(env: Env) -> None:
    """A whole run of integers (PostgreSQL deletes it as a range), in any order, and what
    is not one (a gap, a repeated value)."""
    meta = sa.MetaData()
    table = sa.Table("numbered", meta, sa.Column("n", sa.Integer, primary_key=True))
    db = env.DB
    meta.create_all(db.engine)
    try:
        with db.transaction() as conn:
            conn.execute(sa.insert(table), [{"n": i} for i in range(20)])
        with db.transaction() as conn:
            for values in ([5, 3, 4], [10, 12], [15, 16, 16], [19], [0, 1, 2, 3]):
                db.delete_keys(conn, table, "n", values)
        with db.read() as conn:
            assert list(conn.execute(sa.select(table.c.n).order_by(table.c.n)).scalars()) == [
                6, 7, 8, 9, 11, 13, 14, 17, 18,
            ]  # fmt: skip
    finally:
        meta.drop_all(db.engine)


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_generic_plan_is_asked_for_one_statement_only(env: Env) -> None:
    db, stmt = env.DB, sa.select(sa.literal_column("current_setting('plan_cache_mode')", sa.Text))
    with db.transaction() as conn:
        assert db.fetchall(conn, stmt, generic=True) == [("force_generic_plan",)]
        assert db.fetchall(conn, stmt) == [("auto",)]
