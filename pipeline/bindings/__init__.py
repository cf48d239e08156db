"""Binding interfaces (DB, QUEUE, KV, ARCHIVE) and their backends, chosen by URL."""
