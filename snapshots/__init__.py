"""Hot-path snapshots stored in the KV binding: the top paths of the last hours, versioned,
with `snapshot:latest` always a complete copy of the newest version."""

from snapshots.store import LATEST_KEY, build, list_versions, prune, publish, read_latest, refresh, version_key

__all__ = ["LATEST_KEY", "build", "list_versions", "prune", "publish", "read_latest", "refresh", "version_key"]
