"""Run the Alembic migrations programmatically (`edgepipe db upgrade`, `edgepipe init`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pipeline.bindings.db import Database
from pipeline.errors import BindingError

# The newest migration's revision: every command checks the database against it, and
# importing Alembic for that would cost each command ~70 ms (a test keeps it equal to
# Alembic's head).
HEAD_REVISION = "0004"


def _alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "pipeline:migrations")
    return cfg


def head_revision() -> str:
    """The head of the migration scripts, as Alembic finds it."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    """The revision recorded in the database (Alembic's `alembic_version`), None when new."""
    with db.read() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        value = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


MIGRATION_LOCK = 0x6564676570697065  # "edgepipe": the advisory lock key of schema upgrades


def upgrade(db: Database, revision: str = "head") -> str:
    """Upgrade the schema to `revision` (idempotent). Returns the revision now in place.

    Concurrent upgrades (several workers' `edgepipe init` at one start) take turns: SQLite's
    write lock is taken up front, and on PostgreSQL a transaction-scoped advisory lock is, so
    the second finds the schema already upgraded."""
    from alembic import command

    cfg = _alembic_config()
    with db.transaction() as conn:
        if db.dialect == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(db) or ""


def require_current(db: Database) -> None:
    """Fail with a clear message when the database has not been initialised or upgraded."""
    current = current_revision(db)
    if current is None:
        raise BindingError(f"database {db.url} is not initialised: run `edgepipe init`")
    if current != HEAD_REVISION:
        raise BindingError(
            f"database {db.url} is at schema {current}, expected {HEAD_REVISION}: run `edgepipe db upgrade`"
        )
