"""The ARCHIVE binding: an object store (S3 / R2 / MinIO / moto, or a local directory).

Contract every backend keeps:
* `put` streams the body from a file object in bounded memory (backends that support it
  switch to a multipart upload above `multipart_threshold` bytes) and either stores the
  whole object with its metadata or nothing visible under the key;
* `head` returns size and metadata, `get` streams the body in chunks, `list` pages
  through keys under a prefix in key order, `delete` is idempotent;
* a missing key raises `NotFound`; throttling and connection failures raise
  `TransientError` (retried here with backoff); anything else raises `BindingError`.

Metadata is a flat dict of short lower-case string keys and string values (S3 user
metadata rules), e.g. `rows`, `sha256`, `min-ts`.
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from pipeline import clock, log
from pipeline.errors import TransientError

CHUNK = 1024 * 1024
RETRY_ATTEMPTS = 5
RETRY_BASE_S = 0.2
RETRY_MAX_S = 30.0  # the longest pause between two attempts

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


class ObjectStore(abc.ABC):
    """One bucket (and key prefix). Keys passed in and returned are relative to it."""

    multipart_threshold: int = 8 * 1024 * 1024

    @abc.abstractmethod
    def put(self, key: str, body: BinaryIO, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Store the rest of `body` under `key`, replacing any previous object."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and metadata of `key`; NotFound when absent."""

    @abc.abstractmethod
    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The body of `key` in chunks; NotFound when absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in key order (metadata may be empty)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error when it does not exist."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    def cleanup(self, older_than_s: float) -> int:
        """Remove what killed or failed writes left behind (temp files, incomplete
        multipart uploads) started more than `older_than_s` seconds ago; return how many.
        Never touches a stored object. The default: a backend with nothing to clean."""
        return 0

    # -- helpers built on the primitives ----------------------------------------------

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> ObjectInfo:
        return self.put(key, io.BytesIO(data), metadata)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get(key))

    def digest(self, key: str) -> tuple[int, str]:
        """(size, sha256 hex) of the stored body, streamed."""
        h = hashlib.sha256()
        size = 0
        for chunk in self.get(key):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()


def with_retries(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Call `fn` up to `attempts` times, retrying TransientError with exponential backoff
    (capped at `RETRY_MAX_S`); other errors pass at once. Each retry logs `archive_retry`
    and a last failed attempt `archive_gave_up` (both WARNING), naming the operation."""
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except TransientError as exc:
            if attempt == attempts:
                log.event("archive_gave_up", logging.WARNING, op=what, attempts=attempts, error=exc)
                raise
            delay = min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S)
            log.event("archive_retry", logging.WARNING, op=what, attempt=attempt, delay_s=round(delay, 3), error=exc)
            clock.sleep(delay)
    raise AssertionError("unreachable")
