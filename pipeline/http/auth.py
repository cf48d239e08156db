"""Bearer API tokens: created once, shown once, stored only as a SHA-256 hash.

A token is 32 random bytes (URL-safe base64 behind an `ep_` prefix), so a plain hash is
safe to store: there is no low-entropy secret to brute-force. Revoked tokens stay in the
table (with `revoked_at`) so `tokens list` keeps the audit trail.

Requests are checked against an in-memory set of active hashes that is reloaded at most
every `CACHE_SECONDS`, so a revocation takes effect within that delay without putting a
database read on every request. `last_used_at` is written on the same schedule.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.errors import NotFound, ValidationError
from pipeline.schema import api_tokens

TOKEN_PREFIX = "ep_"
CACHE_SECONDS = 5.0
MAX_NAME = 128


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(db: Database, name: str = "default") -> tuple[int, str]:
    """Store a new token's hash; returns (id, token). The token is not recoverable later."""
    if not name or len(name) > MAX_NAME:
        raise ValidationError("name", f"must be 1–{MAX_NAME} characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.transaction() as conn:
        row = conn.execute(
            api_tokens.insert()
            .values(name=name, token_hash=hash_token(token), created_at=clock.now_s())
            .returning(api_tokens.c.id)
        ).one()
    return int(row.id), token


def list_tokens(db: Database) -> list[dict[str, Any]]:
    t = api_tokens
    with db.read() as conn:
        rows = conn.execute(
            sa.select(t.c.id, t.c.name, t.c.created_at, t.c.revoked_at, t.c.last_used_at).order_by(t.c.id)
        )
        return [
            {
                "id": r.id,
                "name": r.name,
                "created_at": clock.iso(r.created_at),
                "revoked_at": clock.iso(r.revoked_at) if r.revoked_at else None,
                "last_used_at": clock.iso(r.last_used_at) if r.last_used_at else None,
                "active": r.revoked_at is None,
            }
            for r in rows
        ]


def revoke_token(db: Database, token_id: int) -> None:
    """Revoke by id; idempotent for an already revoked token, NotFound for an unknown id."""
    t = api_tokens
    with db.transaction() as conn:
        found = conn.execute(sa.select(t.c.revoked_at).where(t.c.id == token_id)).first()
        if found is None:
            raise NotFound(f"no API token with id {token_id}")
        if found.revoked_at is None:
            conn.execute(t.update().where(t.c.id == token_id).values(revoked_at=clock.now_s()))


def active_count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(api_tokens.c.revoked_at.is_(None))).scalar_one())


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenChecker:
    """Answers "is this bearer token valid?" from a periodically reloaded set of hashes.

    `required` is true when any active token exists or the server was told to insist on
    one (bound to a non-loopback address): with no tokens, a loopback server is open."""

    def __init__(self, db: Database, always_required: bool = False, cache_seconds: float = CACHE_SECONDS) -> None:
        self.db = db
        self.always_required = always_required
        self.cache_seconds = cache_seconds
        self._hashes: dict[str, int] = {}
        self._loaded_at: float | None = None
        self._used: dict[int, float] = {}
        self._lock = threading.Lock()

    def stale(self) -> bool:
        return self._loaded_at is None or clock.monotonic() - self._loaded_at >= self.cache_seconds

    def refresh(self) -> None:
        """Reload the active hashes (blocking: run it in a thread) and record last uses."""
        now = clock.monotonic()
        with self._lock:
            if self._loaded_at is not None and now - self._loaded_at < self.cache_seconds:
                return
            self._flush_used()
            t = api_tokens
            with self.db.read() as conn:
                rows = conn.execute(sa.select(t.c.id, t.c.token_hash).where(t.c.revoked_at.is_(None))).all()
            self._hashes = {r.token_hash: int(r.id) for r in rows}
            self._loaded_at = now

    def _flush_used(self) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        t = api_tokens
        with self.db.transaction() as conn:
            for token_id, at in used.items():
                conn.execute(t.update().where(t.c.id == token_id).values(last_used_at=at))

    def required(self) -> bool:
        """Whether requests must carry a token (in memory; `refresh` first when stale)."""
        return self.always_required or bool(self._hashes)

    def check(self, authorization: str | None) -> bool:
        """Whether `authorization` carries an active token (in memory, like `required`)."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        # A dict lookup on the SHA-256 leaks nothing useful: an attacker cannot steer the hash.
        token_id = self._hashes.get(hash_token(token.strip()))
        if token_id is None:
            return False
        self._used[token_id] = clock.now_s()
        return True

    def close(self) -> None:
        with self._lock:
            self._flush_used()
