"""Hot-path snapshots stored in the KV binding: the top paths of the last hours, versioned,
with `snapshot:latest` always a complete copy of the newest version (its readers' side is
`pipeline.snapshot_doc`)."""

from pipeline.snapshot_doc import LATEST_KEY, read_latest
from snapshots.store import build, list_versions, prune, publish, refresh, version_key

__all__ = ["LATEST_KEY", "build", "list_versions", "prune", "publish", "read_latest", "refresh", "version_key"]
