"""A throwaway database for a benchmark run (`--db URL`): a SQLite file in the run's temp
directory, or a schema of its own on a PostgreSQL server, dropped afterwards."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa


@contextlib.contextmanager
def scratch_db(url: str | None, workdir: Path, prefix: str = "edgepipe_bench") -> Iterator[str]:
    """A fresh, empty database: a SQLite file in `workdir`, or a throwaway schema named
    `<prefix>_<random>` on the PostgreSQL server at `url` (dropped afterwards)."""
    if url is None or url.startswith("sqlite"):
        yield url or f"sqlite:///{workdir / 'edgepipe.db'}"
        return
    schema = f"{prefix}_{secrets.token_hex(4)}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
