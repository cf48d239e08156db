"""Archiver: move detail rows older than the retention window to object storage."""
