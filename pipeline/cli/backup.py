"""`edgepipe backup …`: backups of the database through the ARCHIVE binding."""

from __future__ import annotations
