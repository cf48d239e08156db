"""The DB binding's fast path (statements run on the driver's cursor, rows without
SQLAlchemy's result processing) refuses any statement whose rows SQLAlchemy would have
converted, the first time it is run, on every database; whatever it does not refuse comes
back exactly as `conn.execute` would return it. The product's own statements pass."""

from __future__ import annotations

import datetime
import decimal
import enum
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.bindings.db import Database, UnprocessedColumnError
from pipeline.env import Env
from pipeline.schema import metadata, path_stats_hourly, queue_messages, traffic_events


class Colour(enum.Enum):
    red = "red"


class Upper(sa.types.TypeDecorator[str]):
    """A column type of our own that converts what it reads."""

    impl = sa.String(16)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.upper()


# Column type, the value stored, and the dialects on which SQLAlchemy converts what the
# driver returns for it (the fast path must refuse it there, and only there).
CASES: dict[str, tuple[Any, Any, set[str]]] = {
    "datetime": (sa.DateTime(), datetime.datetime(2026, 1, 2, 3, 4, 5), {"sqlite"}),  # text on SQLite
    "date": (sa.Date(), datetime.date(2026, 1, 2), {"sqlite"}),
    "boolean": (sa.Boolean(), True, {"sqlite"}),  # 0/1 on SQLite
    "numeric": (sa.Numeric(10, 2), decimal.Decimal("1.25"), {"sqlite"}),  # float on SQLite
    "numeric_as_float": (sa.Numeric(10, 2, asdecimal=False), 1.25, {"postgresql"}),  # Decimal on psycopg
    "float_as_decimal": (sa.Float(asdecimal=True), 1.25, {"sqlite", "postgresql"}),
    "enum": (sa.Enum(Colour), Colour.red, {"sqlite", "postgresql"}),
    "type_decorator": (Upper(), "abc", {"sqlite", "postgresql"}),
    "float": (sa.Float(), 1.25, set()),
    "big_integer": (sa.BigInteger(), 2**62, set()),
    "text": (sa.Text(), "ünï", set()),
    "binary": (sa.LargeBinary(), b"\x00\xff", set()),
}


@pytest.fixture
def scratch(env: Env) -> Iterator[tuple[Database, sa.Table]]:
    """A table with one column per case, holding one row."""
    meta = sa.MetaData()
    table = sa.Table(
        "fastpath_scratch",
        meta,
        sa.Column("n", sa.Integer, primary_key=True),
        *(sa.Column(name, type_) for name, (type_, _v, _d) in CASES.items()),
    )
    db = env.DB
    meta.create_all(db.engine)
    try:
        with db.transaction() as conn:
            conn.execute(sa.insert(table).values(n=1, **{name: value for name, (_t, value, _d) in CASES.items()}))
        yield db, table
    finally:
        meta.drop_all(db.engine)


def _fetch(db: Database, conn: sa.Connection, how: str, stmt: Any) -> list[Any]:
    if how == "fetchall":
        return db.fetchall(conn, stmt)
    if how == "stream":
        return list(db.stream(conn, stmt))
    return [r for chunk in db.stream_chunks(conn, stmt, size=1) for r in chunk]


@pytest.mark.parametrize("how", ["fetchall", "stream", "stream_chunks"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_column_sqlalchemy_would_convert_is_refused(scratch: tuple[Database, sa.Table], case: str, how: str) -> None:
    """Refused on the dialects where SQLAlchemy converts the column (again on every call:
    a refusal is never cached as a success); elsewhere the rows are exactly SQLAlchemy's."""
    db, table = scratch
    stmt = sa.select(table.c.n, table.c[case])
    with db.read() as conn:
        expected = [tuple(r) for r in conn.execute(stmt)]
    if db.dialect in CASES[case][2]:
        for _ in range(2):
            refused = pytest.raises(UnprocessedColumnError, match=rf"result column '{case}'.*result processing")
            with refused, db.read() as conn:
                _fetch(db, conn, how, stmt)
    else:
        with db.read() as conn:
            got = _fetch(db, conn, how, stmt)
        assert got == expected
        assert [type(v) for v in got[0]] == [type(v) for v in expected[0]]


def test_an_expression_of_such_a_type_is_refused_too(scratch: tuple[Database, sa.Table]) -> None:
    """The check is on the result's types, not the table's: a cast to a type that needs
    processing is refused, a cast of such a column to one that needs none passes."""
    db, table = scratch
    with db.read() as conn:
        with pytest.raises(UnprocessedColumnError, match=r"'#1'"):
            db.fetchall(conn, sa.select(sa.cast(table.c.text, Upper())))
        assert db.fetchall(conn, sa.select(sa.cast(table.c.enum, sa.String))) == [("red",)]


def test_returning_a_column_that_needs_processing_is_refused(scratch: tuple[Database, sa.Table]) -> None:
    """RETURNING columns are checked like selected ones; a refused statement run for its
    row count alone is not (no rows come back)."""
    db, table = scratch
    returning = sa.update(table).values(text=sa.bindparam("t")).returning(table.c.enum)
    with pytest.raises(UnprocessedColumnError, match="'enum'"), db.transaction() as conn:
        db.fetchall(conn, returning, ("t",), ("changed",))
    with db.transaction() as conn:
        db.execute(conn, returning, ("t",), ("changed",))
        assert db.fetchall(conn, sa.update(table).values(n=2).returning(table.c.n, table.c.text)) == [(2, "changed")]


def test_refusals_hold_whatever_statement_was_compiled_before(scratch: tuple[Database, sa.Table]) -> None:
    """Compiled statements are cached by identity: a statement built on the fly may land where
    a freed one was, and must still be compiled, and checked, as itself."""
    db, table = scratch
    with db.read() as conn:
        for _ in range(50):
            assert db.fetchall(conn, sa.select(table.c.text)) == [("ünï",)]
            with pytest.raises(UnprocessedColumnError):
                db.fetchall(conn, sa.select(table.c.enum))


def _rows(env: Env) -> None:
    """A row in each of the tables the hot paths read."""
    from pipeline.events import EVENT_COLUMNS

    db = env.DB
    event = (1_795_000_000_000, "id-1", "GET", "/p", 0, 200, 1.5, "h", "AMS", 10)
    zero = {c.name: 0 for c in path_stats_hourly.columns if c.name not in ("hour", "host", "path", "method")}
    with db.transaction() as conn:
        db.insert_new(conn, traffic_events, EVENT_COLUMNS, [event], ("ts", "id"))
        conn.execute(sa.insert(path_stats_hourly), [zero | {"hour": 3600, "host": "h", "path": "/p", "method": "GET"}])
    env.QUEUE.send({"n": 1})
    env.KV.put("k", "v", expiration_ttl=3600)


@pytest.mark.parametrize("table", sorted(metadata.tables))
def test_every_column_of_the_product_passes(env: Env, table: str) -> None:
    """Every table of the schema, selected whole on the fast path: nothing is refused, and
    the rows are exactly SQLAlchemy's."""
    _rows(env)
    db, stmt = env.DB, sa.select(metadata.tables[table])
    with db.read() as conn:
        expected = [tuple(r) for r in conn.execute(stmt)]
        assert db.fetchall(conn, stmt) == expected
        assert list(db.stream(conn, stmt)) == expected


def test_the_products_hot_statements_pass(env: Env) -> None:
    """The statements the product runs on the fast path, on a database with rows in them."""
    from pipeline import meta, queries

    _rows(env)
    db = env.DB
    with db.transaction() as conn:
        assert meta.increment(db, conn, "n") == 1
        assert meta.archive_watermark_ms(db, conn) == 0
        batch = env.QUEUE.receive(10)  # in a transaction: claimed on the fast path
        assert [(m.body, type(m.enqueued_at), m.attempts) for m in batch] == [({"n": 1}, float, 1)]
    assert env.KV.get("k") == "v"
    assert [r["path"] for r in queries.top_paths(db, hours=10**6, now_s=7200)] == ["/p"]
    returned = sa.select(queue_messages.c.seq, queue_messages.c.enqueued_at, queue_messages.c.body)
    with db.read() as conn:
        assert db.fetchall(conn, returned) == [tuple(r) for r in conn.execute(returned)]
