"""Hot-path snapshots stored in the KV binding."""
