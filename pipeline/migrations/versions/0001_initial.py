"""Initial schema: events, hourly aggregates, lifetime totals, queue, KV, meta.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the schema constants as of this revision.
BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 60000]
BUCKET_COLUMNS = [f"lat_le_{b}" for b in BUCKETS] + ["lat_gt_60000"]
STATUS_COLUMNS = [f"status_{c}xx" for c in range(1, 6)]
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "traffic_events",
        sa.Column("seq", RowId, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("overflow", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("response_time_ms", sa.Float, nullable=False),
        sa.Column("host", sa.String(255), nullable=False, server_default=""),
        sa.Column("colo", sa.String(16)),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("archive_state", sa.SmallInteger, nullable=False, server_default="0"),
        sa.UniqueConstraint("ts", "id", name="uq_traffic_events_ts_id"),
    )
    op.create_table(
        "path_stats_hourly",
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("method", sa.String(16), primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        *(sa.Column(c, sa.BigInteger, nullable=False) for c in STATUS_COLUMNS),
        sa.Column("bytes_sum", sa.BigInteger, nullable=False),
        sa.Column("rt_sum_ms", sa.Float, nullable=False),
        sa.Column("rt_min_ms", sa.Float, nullable=False),
        sa.Column("rt_max_ms", sa.Float, nullable=False),
        *(sa.Column(c, sa.BigInteger, nullable=False) for c in BUCKET_COLUMNS),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "lifetime_totals",
        sa.Column("scope", sa.String(32), primary_key=True),
        sa.Column("events", sa.BigInteger, nullable=False, server_default="0"),
        *(sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in STATUS_COLUMNS),
        sa.Column("bytes_sum", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rt_sum_ms", sa.Float, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float),
    )
    op.create_table(
        "edgepipe_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "queue_messages",
        sa.Column("seq", RowId, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(8), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("enqueued_at", sa.Float, nullable=False),
        sa.Column("visible_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease", sa.String(32)),
        sa.Column("last_error", sa.Text),
    )
    op.create_table(
        "queue_dlq",
        sa.Column("seq", RowId, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(8), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("enqueued_at", sa.Float, nullable=False),
        sa.Column("failed_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
    )
    op.create_index("ix_queue_dlq_queue", "queue_dlq", ["queue", "seq"])
    op.create_table(
        "kv_entries",
        sa.Column("key", sa.LargeBinary(512), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("metadata", sa.Text),
        sa.Column("expiration", sa.Float),
    )
    # --- tables of the archive issue go below this line ---
    op.create_table(
        "archive_objects",
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("hour", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("sha256", sa.String(64)),
        sa.Column("min_ts", sa.BigInteger),
        sa.Column("max_ts", sa.BigInteger),
        sa.Column("min_seq", sa.BigInteger, nullable=False),
        sa.Column("max_seq", sa.BigInteger, nullable=False),
        sa.Column("cleaned_rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("verified_at", sa.Float),
        sa.Column("cleaned_at", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_archive_objects_status", "archive_objects", ["status", "hour"])

    # --- tables of the scheduler issue go below this line ---
    op.create_table(
        "job_runs",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("scheduled_for", sa.Float, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("job", "scheduled_for", "attempt", name="uq_job_runs_slot"),
    )
    op.create_table(
        "job_leases",
        sa.Column("job", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "worker_heartbeats",
        sa.Column("holder", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("last_batch_at", sa.Float),
        sa.Column("last_job_at", sa.Float),
        sa.Column("batches", sa.BigInteger, nullable=False, server_default="0"),
    )

    # --- tables of the HTTP issue go below this line ---
    op.create_table(
        "api_tokens",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("last_used_at", sa.Float),
    )


def downgrade() -> None:
    for name in (
        "api_tokens",
        "worker_heartbeats",
        "job_leases",
        "job_runs",
        "archive_objects",
        "kv_entries",
        "queue_dlq",
        "queue_messages",
        "counters",
        "edgepipe_meta",
        "lifetime_totals",
        "path_stats_hourly",
        "traffic_events",
    ):
        op.drop_table(name)
