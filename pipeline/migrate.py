"""Run the Alembic migrations programmatically (`edgepipe db upgrade`, `edgepipe init`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from pipeline.bindings.db import Database
from pipeline.errors import BindingError


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "pipeline:migrations")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with db.read() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> str:
    """Upgrade the schema to `revision` (idempotent). Returns the revision now in place."""
    cfg = _alembic_config()
    with db.transaction() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(db) or ""


def require_current(db: Database) -> None:
    """Fail with a clear message when the database has not been initialised or upgraded."""
    current = current_revision(db)
    if current is None:
        raise BindingError(f"database {db.url} is not initialised: run `edgepipe init`")
    if current != head_revision():
        raise BindingError(
            f"database {db.url} is at schema {current}, expected {head_revision()}: run `edgepipe db upgrade`"
        )
