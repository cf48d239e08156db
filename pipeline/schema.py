"""Tables, as SQLAlchemy Core metadata shared by every statement on SQLite and PostgreSQL.

Alembic migrations (pipeline/migrations) create and upgrade them; this module is what the
code queries against and must match the latest migration (a test checks that).

Dedup design: `traffic_events` has a surrogate integer key (`seq`, the SQLite rowid) and a
UNIQUE index on (ts, id). Producers' ids are random, but duplicates of one event carry the
same `ts`, and events arrive roughly in time order, so the unique index is appended near
its right edge instead of being hit at random: inserts stay fast as the table grows. The
price: an id seen again with a different `ts` is a different event. Deduplication holds as
long as the original row is in the hot table; older events are refused by the consumer
(see the archive watermark) rather than risk a double count.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()


class ArchiveState(IntEnum):
    """`traffic_events.archive_state`: where a detail row stands with the archive."""

    HOT = 0  # counted in hot, not archived yet
    ARCHIVED = 1  # held by a verified archive object, awaiting the cleaner
    RESTORED = 2  # put back from the archive: already counted in cold, never counted or archived again


class ObjectStatus(StrEnum):
    """`archive_objects.status`."""

    PENDING = "pending"  # recorded before the upload; a later run deletes the object and starts again
    VERIFIED = "verified"  # uploaded, read back, its rows marked archived
    CLEANED = "cleaned"  # its rows moved to lifetime_totals
    CORRUPT = "corrupt"  # the cleaner found it missing or not matching its checksum
    MISMATCH = "mismatch"  # the cleaner found its row counts not matching
    REPLACED = "replaced"  # flagged, then its rows went back to the archive queue and into a new object
    EXPIRED = "expired"  # cleaned, then deleted from the bucket by the `expire` job ([retention] archive_days)


FLAGGED = (ObjectStatus.CORRUPT, ObjectStatus.MISMATCH)  # the next archive run replaces these
HOLDS_NOTHING = (ObjectStatus.PENDING, ObjectStatus.REPLACED)  # records no row belongs to
NOT_IN_BUCKET = (*HOLDS_NOTHING, ObjectStatus.EXPIRED)  # records whose object is not (or no longer) in the bucket

# SQLite only aliases the rowid for a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")

# Latency histogram: upper bounds (ms) of a 1-2-5 series from 1 ms to 60 s, plus overflow.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 60000,
)  # fmt: skip
BUCKET_COLUMNS: tuple[str, ...] = (
    *(f"lat_le_{b}" for b in LATENCY_BUCKETS_MS),
    f"lat_gt_{LATENCY_BUCKETS_MS[-1]}",
)
STATUS_COLUMNS: tuple[str, ...] = tuple(f"status_{c}xx" for c in range(1, 6))
OTHER_PATH = "__other__"

traffic_events = Table(
    "traffic_events",
    metadata,
    Column("seq", RowId, primary_key=True, autoincrement=True),
    Column("ts", BigInteger, nullable=False),  # epoch milliseconds, UTC
    Column("id", String(128), nullable=False),
    Column("method", String(16), nullable=False),
    Column("path", Text, nullable=False),  # normalised
    Column("overflow", SmallInteger, nullable=False, default=0),  # 1: counted as __other__
    Column("status", SmallInteger, nullable=False),
    Column("response_time_ms", Float, nullable=False),
    Column("host", String(255), nullable=False, default=""),
    Column("colo", String(16)),
    Column("bytes", BigInteger),
    # 0 hot, 1 held by a verified archive object (awaiting the cleaner), 2 restored from the
    # archive (already counted in cold: never counted as hot nor archived again).
    Column("archive_state", SmallInteger, nullable=False, server_default="0"),
    UniqueConstraint("ts", "id", name="uq_traffic_events_ts_id"),
)


def _aggregates(name: str, period: str) -> Table:
    """A table of per-path aggregates, one row per (`period`, host, path, method): request
    and status counts, bytes, response-time sum, min, max and histogram. Clustered by its
    key on SQLite: one B-tree per upsert instead of index + table, and period-range reads
    are sequential."""
    return Table(
        name,
        metadata,
        Column(period, BigInteger, primary_key=True),  # epoch seconds at the start of the UTC hour / day
        Column("host", String(255), primary_key=True),
        Column("path", Text, primary_key=True),
        Column("method", String(16), primary_key=True),
        Column("requests", BigInteger, nullable=False),
        *(Column(c, BigInteger, nullable=False) for c in STATUS_COLUMNS),
        Column("bytes_sum", BigInteger, nullable=False),
        Column("rt_sum_ms", Float, nullable=False),
        Column("rt_min_ms", Float, nullable=False),
        Column("rt_max_ms", Float, nullable=False),
        *(Column(c, BigInteger, nullable=False) for c in BUCKET_COLUMNS),
        sqlite_with_rowid=False,
    )


path_stats_hourly = _aggregates("path_stats_hourly", "hour")

# The hourly rows of each closed UTC day folded into one row per (day, host, path, method)
# by the `rollup` job; same columns, so the same readers and histogram merge apply. Once
# `[retention] hourly_days` prunes a day's hourly rows, its daily rows hold that day.
path_stats_daily = _aggregates("path_stats_daily", "day")

# Data quality per hour, written in the consumer's transaction: one row per (hour, kind)
# with a count. `hour` is the UTC hour the consumer handled the events (an invalid event may
# carry no usable time of its own). Kinds: `received`, `inserted`, `duplicate`, `too_late`,
# `overflow` (inserted, but counted under __other__), and `invalid:<field>` for events
# refused as invalid, by the field their error names.
quality_hourly = Table(
    "quality_hourly",
    metadata,
    Column("hour", BigInteger, primary_key=True),  # epoch seconds at the start of the UTC hour
    Column("kind", String(80), primary_key=True),
    Column("count", BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

# Counts of events that left the hot table (filled by the cleaner), one row per scope.
lifetime_totals = Table(
    "lifetime_totals",
    metadata,
    Column("scope", String(32), primary_key=True),
    Column("events", BigInteger, nullable=False, default=0),
    *(Column(c, BigInteger, nullable=False, default=0) for c in STATUS_COLUMNS),
    Column("bytes_sum", BigInteger, nullable=False, default=0),
    Column("rt_sum_ms", Float, nullable=False, default=0),
    Column("updated_at", Float),
)

# Small durable facts: deployment start, counters, watermarks.
meta = Table(
    "edgepipe_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

queue_messages = Table(
    "queue_messages",
    metadata,
    Column("seq", RowId, primary_key=True, autoincrement=True),
    Column("queue", String(64), nullable=False),
    Column("message_id", String(64), nullable=False),
    Column("content_type", String(8), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("enqueued_at", Float, nullable=False),
    Column("visible_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease", String(32)),
    Column("last_error", Text),
    # No secondary index: consumers scan the primary key in order and skip the few rows
    # that are leased or delayed, so each message costs one B-tree insert and one delete.
)

queue_dlq = Table(
    "queue_dlq",
    metadata,
    Column("seq", RowId, primary_key=True, autoincrement=True),
    Column("queue", String(64), nullable=False),
    Column("message_id", String(64), nullable=False),
    Column("content_type", String(8), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("enqueued_at", Float, nullable=False),
    Column("failed_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", String(64), nullable=False),  # short code: invalid, too_late, retries_exhausted
    Column("error", Text, nullable=False),
    Index("ix_queue_dlq_queue", "queue", "seq"),
)

kv_entries = Table(
    "kv_entries",
    metadata,
    Column("key", LargeBinary(512), primary_key=True),  # UTF-8 bytes: byte order on every dialect
    Column("value", LargeBinary, nullable=False),
    Column("metadata", Text),
    Column("expiration", Float),  # epoch seconds, NULL = never
)

# --- tables of the archive issue go below this line ---

# One row per archive object. Rows of `traffic_events` belong to an object when they are
# in its hour, its seq range and in archive_state 1. status: pending (recorded before the
# upload; a re-run after a crash deletes the object and starts again), verified (uploaded,
# re-read, rows marked), cleaned (rows moved to lifetime_totals), corrupt / mismatch (the
# cleaner refuses them).
archive_objects = Table(
    "archive_objects",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("hour", BigInteger, nullable=False),  # epoch seconds of the event hour
    Column("status", String(16), nullable=False),
    Column("row_count", BigInteger, nullable=False),
    Column("size_bytes", BigInteger, nullable=False, server_default="0"),
    Column("sha256", String(64)),
    Column("min_ts", BigInteger),
    Column("max_ts", BigInteger),
    Column("min_seq", BigInteger, nullable=False),
    Column("max_seq", BigInteger, nullable=False),
    Column("cleaned_rows", BigInteger, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("verified_at", Float),
    Column("cleaned_at", Float),
    Column("error", Text),
    Index("ix_archive_objects_status", "status", "hour"),
)

# --- tables of the scheduler issue go below this line ---

# One row per attempt of a scheduled (or hand-started) job run. (job, scheduled_for,
# attempt) is unique: two workers can never record the same attempt of one slot.
# status: running, succeeded, failed, abandoned (its worker died), dry_run.
job_runs = Table(
    "job_runs",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("job", String(64), nullable=False),
    Column("scheduled_for", Float, nullable=False),  # epoch seconds of the slot
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("holder", String(128), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("result", Text),  # JSON
    Column("error", Text),
    UniqueConstraint("job", "scheduled_for", "attempt", name="uq_job_runs_slot"),
)

# One run at a time across processes: a worker holds a job's row until `expires_at`,
# renewing it while the job runs and deleting it afterwards.
job_leases = Table(
    "job_leases",
    metadata,
    Column("job", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# One row per worker process, updated every few seconds; `edgepipe status` and the health
# check report a worker whose row went stale (stuck or gone) or that stopped consuming.
worker_heartbeats = Table(
    "worker_heartbeats",
    metadata,
    Column("holder", String(128), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # running, stopping, stopped
    Column("started_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("last_batch_at", Float),
    Column("last_job_at", Float),
    Column("batches", BigInteger, nullable=False, server_default="0"),
)

# --- tables of the HTTP issue go below this line ---

# API bearer tokens. Only the SHA-256 of a token is stored (tokens are 256-bit random, so a
# plain hash is enough; there is nothing to brute-force). Revoked tokens are kept for audit.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    Column("last_used_at", Float),
    # What the token may do (`pipeline.http.auth.SCOPES`); tokens made before scopes existed
    # became `admin`, so they keep doing everything they did.
    Column("scope", String(16), nullable=False, server_default="admin"),
    Column("expires_at", Float),  # epoch seconds; NULL: never
)

# Who did what, written in the transaction of the action itself (`pipeline.audit`): token
# and DLQ operations, replay restores, manual job runs, backup restores, the configuration
# loaded at start-up, failed authentication (rate-limited). Kept `[audit] retention_days`.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", RowId, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(200), nullable=False),  # "token:<id>:<name>", "cli:<os user>" or "system"
    Column("token_id", BigInteger),
    Column("action", String(64), nullable=False),  # e.g. "dlq.redrive", "tokens.create", "auth.failed"
    Column("params", Text, nullable=False, server_default="{}"),  # JSON
    Column("outcome", String(16), nullable=False),  # ok, failed, denied
    Column("detail", Text, nullable=False, server_default=""),
    Column("client", String(64)),  # the client's address (HTTP), NULL for the CLI
)
