"""What the Redis backends share (the queue on Redis Streams, the KV namespace): a client
from a binding URL, and Redis's errors as edgepipe's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.errors import BindingError, ConfigError, TransientError

# A dropped or refused connection, a timeout, a replica that is read-only during a failover.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError)


@contextmanager
def translate(what: str) -> Iterator[None]:
    """Redis's exceptions as edgepipe's: `TransientError` for the faults above (the worker
    backs off and tries again), `BindingError` for the rest. `what` names the binding."""
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except RedisError as exc:
        raise BindingError(f"{what}: {type(exc).__name__}: {exc}") from exc


def client_from_url(url: str, binding: str, own: str) -> tuple[redis.Redis, str | None]:
    """`redis://[USER:PASSWORD@]HOST:PORT/DB?OWN=…` plus any redis-py URL option, as a
    client (connecting lazily: a Redis that is down fails the first operation, not start-up)
    and the value of edgepipe's own parameter `own` (the last one given; None when absent).
    A bad URL is a ConfigError naming `bindings.<binding>`, never showing the password."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == own]
    shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"config error: bindings.{binding}: {shown!r}: the path is the database number, /0 … /15")
    rest = urlencode([(k, v) for k, v in query if k != own])
    try:
        client = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)))
    except ValueError as exc:
        raise ConfigError(f"config error: bindings.{binding}: {shown!r}: {exc}") from None
    return client, values[-1] if values else None
