"""The Alembic migration builds exactly the schema the code queries (pipeline.schema), on
SQLite and PostgreSQL, and upgrading is idempotent."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline import migrate
from pipeline.bindings.db import Database
from pipeline.schema import metadata


def diffs(db: Database) -> list[Any]:
    with db.read() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        return compare_metadata(ctx, metadata)


def test_upgrade_twice_and_schema_matches_metadata(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert migrate.current_revision(db) is None
        head = migrate.head_revision()
        assert migrate.upgrade(db) == head
        assert migrate.upgrade(db) == head  # idempotent
        assert migrate.current_revision(db) == head
        migrate.require_current(db)
        assert diffs(db) == []
        with db.read() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        assert set(metadata.tables) <= tables
    finally:
        db.dispose()


def test_comparison_detects_a_drift(db_url: str) -> None:
    """The comparison above is not vacuous: a column the migration lacks shows up."""
    db = Database(db_url)
    try:
        migrate.upgrade(db)
        with db.transaction() as conn:
            conn.exec_driver_sql("ALTER TABLE counters ADD COLUMN stray INTEGER")
        found = diffs(db)
        assert any(d[0] == "remove_column" and d[3].name == "stray" for d in found if isinstance(d, tuple)), found
    finally:
        db.dispose()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    try:
        migrate.upgrade(db)
        with db.read() as conn:
            pragmas = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
                       ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "secure_delete")}  # fmt: skip
        assert pragmas == {
            "journal_mode": "wal", "synchronous": 1, "busy_timeout": 30_000, "foreign_keys": 1, "secure_delete": 2,
        }  # fmt: skip
    finally:
        db.dispose()


def test_the_head_revision_constant_is_alembics_head() -> None:
    """Commands check the schema against `HEAD_REVISION` without importing Alembic."""
    from pipeline.migrate import HEAD_REVISION, head_revision

    assert head_revision() == HEAD_REVISION


def test_concurrent_upgrades_take_turns(db_url: str) -> None:
    """Several processes' `edgepipe init` at one start: every upgrade succeeds, once."""
    import threading

    dbs = [Database(db_url) for _ in range(3)]
    start, results, errors = threading.Barrier(len(dbs)), [], []

    def run(db: Database) -> None:
        start.wait()
        try:
            results.append(migrate.upgrade(db))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for db in dbs:
        db.dispose()
    assert not errors, errors
    assert results == [migrate.HEAD_REVISION] * len(dbs)
