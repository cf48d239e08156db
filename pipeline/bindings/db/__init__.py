"""The DB binding: one SQLAlchemy engine for SQLite or PostgreSQL (`Database`).

Every statement in edgepipe is SQLAlchemy Core and runs on both dialects; the few places
where they differ (upserts, LEAST/GREATEST, SKIP LOCKED) branch in this package, once.

Modules, one job each:

- `engine`: database URL → engine, SQLite's pragmas and BEGIN, the dialect differences;
- `checkpointer`: SQLite's WAL checkpoints, in a background thread;
- `errors`: driver exceptions → edgepipe's errors (`classify`, `translate_errors`);
- `fastpath`: the statement cache and statements run on the driver's cursor;
- `pgcopy`: PostgreSQL's binary COPY, into a table or a per-connection staging table;
- `bulk`: insert-if-new, deletes by key, additive upserts (in key order: the lock order
  that keeps concurrent PostgreSQL writers from deadlocking);
- `backup`: a consistent copy of the tables as a byte stream, and a database built from one;
- `database`: `Database`, composing the above, and its transactions.

The names below are re-exported for `from pipeline.bindings.db import …`. Tunables
(`SQLITE_BUSY_TIMEOUT_MS`, `CHECKPOINT_*`, …) are read where they are defined: to change
one (tests do), set it on its module, not on this package.
"""

from pipeline.bindings.db.checkpointer import (
    CATCH_UP_PAGES,
    CATCH_UP_RUNS,
    CHECKPOINT_CHANGES,
    CHECKPOINT_COMMITS,
    WAL_LIMIT_PAGES,
    Checkpointer,
)
from pipeline.bindings.db.database import Database
from pipeline.bindings.db.engine import SQLITE_BUSY_TIMEOUT_MS, open_engine
from pipeline.bindings.db.errors import (
    PG_DATA,
    PG_TRANSIENT,
    SQLITE_DATA,
    SQLITE_TRANSIENT,
    classify,
    translate_errors,
)
from pipeline.bindings.db.fastpath import UnprocessedColumnError

__all__ = [
    "CATCH_UP_PAGES",
    "CATCH_UP_RUNS",
    "CHECKPOINT_CHANGES",
    "CHECKPOINT_COMMITS",
    "PG_DATA",
    "PG_TRANSIENT",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_DATA",
    "SQLITE_TRANSIENT",
    "WAL_LIMIT_PAGES",
    "Checkpointer",
    "Database",
    "UnprocessedColumnError",
    "classify",
    "open_engine",
    "translate_errors",
]
