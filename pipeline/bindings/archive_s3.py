"""`s3://bucket/prefix?endpoint_url=…&region=…&addressing_style=path|virtual|auto`.

boto3 against AWS S3, Cloudflare R2, MinIO or moto. Credentials come from the standard
AWS chain (env vars, profile, instance role). Checksums are computed and validated only
when the operation requires them, because several S3-compatible stores reject the CRC
checksums newer botocore sends by default; edgepipe keeps its own sha256 in the metadata.

Errors are mapped here: throttling, 5xx, connection failures and timeouts become
TransientError; access denied, a missing bucket or anything else BindingError; a missing key
NotFound. A failed multipart upload is aborted, so nothing partial is visible.

Every request has a connect timeout and a read timeout (`[archive] connect_timeout`,
`read_timeout`), and botocore makes one attempt only: all retries are `with_retries`'s, up
to `[archive] max_attempts` attempts per operation, each one logged (`archive_retry`), so an
endpoint that accepts connections and never answers fails after about
`max_attempts * (read_timeout + backoff)` seconds instead of minutes of silent retries.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import TimeoutError as URLLib3TimeoutError

from pipeline.bindings.archive import CHUNK, ObjectInfo, ObjectStore, with_retries
from pipeline.errors import BindingError, ConfigError, NotFound, TransientError

T = TypeVar("T")
TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# Failures of the connection rather than answers of the store: worth another attempt.
TRANSIENT_ERRORS = (
    ConnectTimeoutError,
    ReadTimeoutError,
    EndpointConnectionError,
    ConnectionClosedError,
    ResponseStreamingError,  # the connection broke while a body streamed in
    ConnectionError,
    ProtocolError,  # urllib3's, when it escapes botocore's wrapping (e.g. while streaming)
    URLLib3TimeoutError,
)


@contextmanager
def translate(service: str = "s3") -> Iterator[None]:
    """Map botocore's exceptions to edgepipe's (see the module docstring); messages start
    with `service` (the SQS queue backend shares this mapping)."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"{service} {code or status}: {err.get('Message', exc)}"
        if code in NOT_FOUND_CODES:
            raise NotFound(message) from exc
        if code in TRANSIENT_CODES or status in (500, 502, 503, 504):
            raise TransientError(message) from exc
        raise BindingError(message) from exc
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"{service} connection failed: {type(exc).__name__}: {exc}") from exc
    except HTTPClientError as exc:
        if isinstance(exc.kwargs.get("error"), (ProtocolError, URLLib3TimeoutError)):
            raise TransientError(f"{service} connection failed: {type(exc).__name__}: {exc}") from exc
        raise BindingError(f"{service} error: {exc}") from exc
    except BotoCoreError as exc:
        raise BindingError(f"{service} error: {exc}") from exc


def check_endpoint(endpoint: str, binding: str = "archive") -> None:
    """ConfigError (naming `bindings.<binding>`) unless `endpoint` is an http(s) URL with a
    host (and a valid port)."""
    parts = urlsplit(endpoint)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(
            f"config error: bindings.{binding}: endpoint_url must be an http:// or https:// URL with a host "
            f"(got {endpoint!r})"
        )


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        multipart_threshold: int = 8 * 1024 * 1024,
        client: Any = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.multipart_threshold = multipart_threshold
        self.page_size = 1000  # keys per list request (S3's maximum)
        self.max_attempts = max(1, max_attempts)
        config = BotoConfig(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": addressing_style},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # no hidden retries: with_retries does them
        )
        self.client = client or boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        multipart_threshold: int = 8 * 1024 * 1024,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> S3Store:
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"config error: bindings.archive: no bucket in {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region", "addressing_style"}
        if unknown:
            raise ConfigError(f"config error: bindings.archive: unknown URL parameter {sorted(unknown)[0]!r}")
        style = query.get("addressing_style", "auto")
        if style not in ("auto", "path", "virtual"):
            raise ConfigError("config error: bindings.archive: addressing_style must be auto, path or virtual")
        endpoint = query.get("endpoint_url")
        if endpoint is not None:
            check_endpoint(endpoint)
        return cls(
            parts.netloc,
            parts.path,
            endpoint_url=endpoint,
            region=query.get("region"),
            addressing_style=style,
            multipart_threshold=multipart_threshold,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            with translate():
                return fn()

        return with_retries(attempt, what, self.max_attempts)

    def put(self, key: str, body: BinaryIO, metadata: dict[str, str] | None = None) -> ObjectInfo:
        full = self.prefix + key
        meta = {str(k).lower(): str(v) for k, v in (metadata or {}).items()}
        first = body.read(self.multipart_threshold + 1)
        if len(first) <= self.multipart_threshold:
            self._call("put", lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=first, Metadata=meta))
            return ObjectInfo(key, len(first), meta)
        return self._multipart(key, full, first, body, meta)

    def _multipart(self, key: str, full: str, first: bytes, body: BinaryIO, meta: dict[str, str]) -> ObjectInfo:
        """Upload parts of `multipart_threshold` bytes; abort on any failure."""
        upload = self._call(
            "create_multipart",
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata=meta),
        )
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        size = 0
        pending = io.BytesIO(first)
        try:
            while True:
                data = pending.read(self.multipart_threshold)
                if len(data) < self.multipart_threshold:
                    data += body.read(self.multipart_threshold - len(data))
                if not data:
                    break
                number = len(parts) + 1
                resp = self._call(
                    "upload_part",
                    lambda d=data, n=number: self.client.upload_part(  # type: ignore[misc]
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=d
                    ),
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                size += len(data)
            self._call(
                "complete_multipart",
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            try:
                with translate():
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:  # the original error matters more
                pass
            raise
        return ObjectInfo(key, size, meta)

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head", lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + key))
        return ObjectInfo(key, int(resp["ContentLength"]), dict(resp.get("Metadata") or {}))

    def get(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        resp = self._call("get", lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + key))
        return self._stream(resp["Body"], chunk_size)

    @staticmethod
    def _stream(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            with translate():
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix, "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", lambda k=kwargs: self.client.list_objects_v2(**k))  # type: ignore[misc]
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(self.prefix) :], int(item["Size"]))
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key))

    def close(self) -> None:
        self.client.close()

    def cleanup(self, older_than_s: float) -> int:
        """Abort the incomplete multipart uploads under the prefix initiated more than
        `older_than_s` seconds ago (a killed process never completed or aborted them; the
        store keeps and bills their parts until then). One that is gone meanwhile is skipped."""
        from pipeline import clock

        limit = clock.now_s() - older_than_s
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        aborted = 0
        while True:
            page = self._call("list_multipart", lambda k=dict(kwargs): self.client.list_multipart_uploads(**k))  # type: ignore[misc]
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() >= limit:
                    continue
                try:
                    self._call(
                        "abort_multipart",
                        lambda u=upload: self.client.abort_multipart_upload(  # type: ignore[misc]
                            Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                        ),
                    )
                    aborted += 1
                except (NotFound, BindingError) as exc:
                    if "NoSuchUpload" not in str(exc):
                        raise
            if not page.get("IsTruncated"):
                return aborted
            kwargs |= {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
