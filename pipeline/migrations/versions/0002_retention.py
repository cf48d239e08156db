"""Retention: daily rollups of the hourly aggregates, lasting dead-letter counts.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen copies of the schema constants as of this revision.
BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 60000]
BUCKET_COLUMNS = [f"lat_le_{b}" for b in BUCKETS] + ["lat_gt_60000"]
STATUS_COLUMNS = [f"status_{c}xx" for c in range(1, 6)]


def upgrade() -> None:
    op.create_table(
        "path_stats_daily",
        sa.Column("day", sa.BigInteger, primary_key=True),
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
    # Dead letters are counted for good per queue and reason (`counters`, named
    # `dlq_total.<queue>.<reason>`); the letters already in the DLQ start the counts.
    op.execute(
        "INSERT INTO counters (name, value) "
        "SELECT 'dlq_total.' || queue || '.' || reason, COUNT(*) FROM queue_dlq GROUP BY queue, reason"
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name LIKE 'dlq_total.%'")
    op.drop_table("path_stats_daily")
