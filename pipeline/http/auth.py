"""Bearer API tokens: created once, shown once, stored only as a SHA-256 hash, each with a
scope and an optional expiry.

A token is 32 random bytes (URL-safe base64 behind an `ep_` prefix), so a plain hash is
safe to store: there is no low-entropy secret to brute-force. Revoked tokens stay in the
table (with `revoked_at`) so `tokens list` keeps the trail.

Scopes (`Scope`): `ingest` may only post events, `read` may only read (the /v1 read API
and /metrics), `admin` may do everything, the audit log included. Tokens made before
scopes existed are `admin` tokens, so they keep doing what they did.

Requests are checked against an in-memory copy of the table (hashes, scopes, expiries,
revocations) reloaded at most every `CACHE_SECONDS`, so a revocation takes effect within
that delay without a database read on every request; expiry is checked on every request
against the wall clock. `last_used_at` is written on the reload schedule.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from pipeline import clock
from pipeline.bindings.db import Database
from pipeline.errors import NotFound, ValidationError
from pipeline.schema import api_tokens

TOKEN_PREFIX = "ep_"
CACHE_SECONDS = 5.0
MAX_NAME = 128
MAX_LIFETIME_S = 100 * 365 * 86_400


class Scope(StrEnum):
    INGEST = "ingest"  # POST /v1/events
    READ = "read"  # GET /v1/* (but the audit log) and /metrics
    ADMIN = "admin"  # everything: ingest, read, the audit log


SCOPES = tuple(s.value for s in Scope)
# What a token of each scope may do.
GRANTS: dict[str, frozenset[Scope]] = {
    Scope.INGEST: frozenset({Scope.INGEST}),
    Scope.READ: frozenset({Scope.READ}),
    Scope.ADMIN: frozenset(Scope),
}


def allows(held: str, needed: Scope) -> bool:
    """Whether a token of scope `held` may make a request that needs `needed` (a scope this
    version does not know grants nothing)."""
    return needed in GRANTS.get(held, frozenset())


class TokenState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Denial(StrEnum):
    """Why a request failed authentication (the audit's `reason`)."""

    MISSING = "missing"  # no Authorization header
    MALFORMED = "malformed"  # not `Bearer <token>`
    UNKNOWN = "unknown"  # no such token
    REVOKED = "revoked"
    EXPIRED = "expired"


_DURATION = re.compile(r"(\d+)([dhms])")
_UNIT_S = {"d": 86_400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str, name: str = "expires-in") -> int:
    """Seconds in `90d`, `12h`, `30m` or `3600s`; a ValidationError naming `name` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValidationError(name, f"{text!r} is not a duration: use a number and a unit, e.g. 90d, 12h, 30m, 3600s")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= MAX_LIFETIME_S:
        raise ValidationError(name, f"{text!r}: must be more than 0 and at most 100 years")
    return seconds


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    db: Database, name: str = "default", scope: str = Scope.ADMIN, expires_at: float | None = None
) -> tuple[int, str]:
    """Store a new token's hash; returns (id, token). The token is not recoverable later.
    Joins the caller's transaction when there is one."""
    if not name or len(name) > MAX_NAME:
        raise ValidationError("name", f"must be 1–{MAX_NAME} characters")
    if scope not in SCOPES:
        raise ValidationError("scope", f"{scope!r}: one of {', '.join(SCOPES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.transaction() as conn:
        row = conn.execute(
            api_tokens.insert()
            .values(
                name=name, token_hash=hash_token(token), created_at=clock.now_s(), scope=scope, expires_at=expires_at
            )
            .returning(api_tokens.c.id)
        ).one()
    return int(row.id), token


def token_state(revoked_at: float | None, expires_at: float | None, now: float) -> TokenState:
    if revoked_at is not None:
        return TokenState.REVOKED
    if expires_at is not None and now >= expires_at:
        return TokenState.EXPIRED
    return TokenState.ACTIVE


def _iso(value: float | None) -> str | None:
    return clock.iso(value) if value is not None else None


def list_tokens(db: Database) -> list[dict[str, Any]]:
    """Every token (never the token itself): id, name, scope, dates, `state` and `active`."""
    t = api_tokens
    now = clock.now_s()
    cols = (t.c.id, t.c.name, t.c.scope, t.c.created_at, t.c.expires_at, t.c.revoked_at, t.c.last_used_at)
    with db.read() as conn:
        rows = conn.execute(sa.select(*cols).order_by(t.c.id)).all()
    out = []
    for r in rows:
        state = token_state(r.revoked_at, r.expires_at, now)
        out.append(
            {
                "id": r.id,
                "name": r.name,
                "scope": r.scope,
                "created_at": clock.iso(r.created_at),
                "expires_at": _iso(r.expires_at),
                "revoked_at": _iso(r.revoked_at),
                "last_used_at": _iso(r.last_used_at),
                "state": state.value,
                "active": state is TokenState.ACTIVE,
            }
        )
    return out


def revoke_token(db: Database, token_id: int) -> bool:
    """Revoke by id; True when it was not revoked before (idempotent), NotFound for an
    unknown id. Joins the caller's transaction when there is one."""
    t = api_tokens
    with db.transaction() as conn:
        found = conn.execute(sa.select(t.c.revoked_at).where(t.c.id == token_id)).first()
        if found is None:
            raise NotFound(f"no API token with id {token_id}")
        if found.revoked_at is not None:
            return False
        conn.execute(t.update().where(t.c.id == token_id).values(revoked_at=clock.now_s()))
        return True


def active_count(db: Database) -> int:
    """Tokens that authenticate now: neither revoked nor expired."""
    t = api_tokens
    now = clock.now_s()
    usable = sa.and_(t.c.revoked_at.is_(None), sa.or_(t.c.expires_at.is_(None), t.c.expires_at > now))
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(usable)).scalar_one())


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Token:
    """A stored token as the checker sees it."""

    id: int
    name: str
    scope: str
    expires_at: float | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of authenticating a request: `token` when one was recognised (also when
    it is revoked or expired), `denial` when it does not authenticate."""

    token: Token | None
    denial: Denial | None = None

    @property
    def ok(self) -> bool:
        return self.denial is None


class TokenChecker:
    """Answers "which token is this, and is it valid?" from a periodically reloaded copy of
    the token table.

    `required` is true when any token that is not revoked exists (expired ones included: an
    expiry never opens the API) or the server was told to insist on one (bound to a
    non-loopback address, or behind a proxy): with none, a loopback server is open."""

    def __init__(self, db: Database, always_required: bool = False, cache_seconds: float = CACHE_SECONDS) -> None:
        self.db = db
        self.always_required = always_required
        self.cache_seconds = cache_seconds
        self._tokens: dict[str, Token] = {}
        self._any_unrevoked = False
        self._loaded_at: float | None = None
        self._used: dict[int, float] = {}
        self._lock = threading.Lock()

    def stale(self) -> bool:
        return self._loaded_at is None or clock.monotonic() - self._loaded_at >= self.cache_seconds

    def refresh(self) -> None:
        """Reload the tokens (blocking: run it in a thread) and record last uses."""
        now = clock.monotonic()
        with self._lock:
            if self._loaded_at is not None and now - self._loaded_at < self.cache_seconds:
                return
            self._flush_used()
            t = api_tokens
            cols = (t.c.id, t.c.name, t.c.token_hash, t.c.scope, t.c.expires_at, t.c.revoked_at)
            with self.db.read() as conn:
                rows = conn.execute(sa.select(*cols)).all()
            self._tokens = {
                r.token_hash: Token(int(r.id), r.name, r.scope, r.expires_at, r.revoked_at is not None) for r in rows
            }
            self._any_unrevoked = any(not tok.revoked for tok in self._tokens.values())
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
        return self.always_required or self._any_unrevoked

    def check(self, authorization: str | None) -> Verdict:
        """Authenticate an Authorization header value (in memory, like `required`). The
        token itself goes nowhere but into its hash."""
        if not authorization:
            return Verdict(None, Denial.MISSING)
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return Verdict(None, Denial.MALFORMED)
        # A dict lookup on the SHA-256 leaks nothing useful: an attacker cannot steer the hash.
        token = self._tokens.get(hash_token(value))
        if token is None:
            return Verdict(None, Denial.UNKNOWN)
        if token.revoked:
            return Verdict(token, Denial.REVOKED)
        now = clock.now_s()
        if token.expires_at is not None and now >= token.expires_at:
            return Verdict(token, Denial.EXPIRED)
        self._used[token.id] = now
        return Verdict(token)

    def close(self) -> None:
        with self._lock:
            self._flush_used()
