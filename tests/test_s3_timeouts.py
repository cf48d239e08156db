"""The S3 archive against an endpoint that accepts connections and never answers: every
request times out after `[archive] read_timeout`, botocore makes exactly one attempt per
try (the server counts the connections), `with_retries` makes `max_attempts` of them and
logs each retry; connection-level botocore/urllib3 errors are transient; a malformed
`endpoint_url` is a one-line ConfigError at start-up."""

from __future__ import annotations

import io
import logging
import socket
import threading
from typing import Any

import pytest
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError

from pipeline import log
from pipeline.bindings import archive as archive_mod
from pipeline.config import Config
from pipeline.env import ARCHIVE_BACKENDS
from pipeline.errors import ConfigError, TransientError


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections, never reads and never answers.
    `peers` lists the client ports of accepted connections, in accept order."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[int] = []
        self.probes: set[int] = set()  # ports of `accepted()`'s own connections
        self.conns: list[socket.socket] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, name="silent-s3", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            conn, addr = self.sock.accept()
            with self.cond:
                if self.stopping:
                    conn.close()
                    return
                self.conns.append(conn)
                self.peers.append(addr[1])
                self.cond.notify_all()

    def accepted(self) -> int:
        """Connections accepted so far from clients other than this method. A probe is
        connected now and waited for: the accept queue is first in, first out, so once the
        probe is accepted, every connection made before it has been too."""
        with socket.create_connection(("127.0.0.1", self.port)) as probe:
            port = probe.getsockname()[1]
            self.probes.add(port)
            with self.cond:
                assert self.cond.wait_for(lambda: port in self.peers, timeout=60)
                return len([p for p in self.peers[: self.peers.index(port)] if p not in self.probes])

    def close(self) -> None:
        with self.cond:
            self.stopping = True
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes accept()
        self.thread.join(60)
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent_server() -> Any:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog seeing the "edgepipe" logger even after `pipeline.log.setup()` stopped it
    propagating."""
    monkeypatch.setattr(log.logger, "propagate", True)
    caplog.set_level(logging.DEBUG, logger="edgepipe")
    return caplog


def _s3_store(url: str, **archive: Any) -> Any:
    cfg = Config().replace(bindings={"archive": url}, archive=archive)
    return ARCHIVE_BACKENDS["s3"](url, None, cfg)  # type: ignore[arg-type]


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={name} ")]


@pytest.mark.parametrize("op", ["head", "put"])
def test_silent_endpoint_times_out_with_one_connection_per_logged_attempt(
    op: str,
    silent_server: SilentServer,
    aws_credentials: None,
    records: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(archive_mod, "RETRY_BASE_S", 0.0)
    max_attempts = 2
    endpoint = f"http://127.0.0.1:{silent_server.port}"
    store = _s3_store(
        f"s3://bkt/archive?region=us-east-1&endpoint_url={endpoint}&addressing_style=path",
        connect_timeout=1,
        read_timeout=1,
        max_attempts=max_attempts,
    )
    try:
        cfg = store.client.meta.config
        assert (cfg.connect_timeout, cfg.read_timeout) == (1, 1)
        assert cfg.retries["total_max_attempts"] == 1
        with pytest.raises(TransientError, match="ReadTimeoutError"):
            if op == "head":
                store.head("some/key")
            else:
                store.put("some/key", io.BytesIO(b"x" * 1000), {"rows": "1"})
    finally:
        store.close()
    assert silent_server.accepted() == max_attempts  # no retries hidden inside botocore

    retries = _events(records, "archive_retry")
    assert len(retries) == max_attempts - 1
    assert all(f"op={op} " in r and "error=" in r for r in retries)
    assert [int(r.split("attempt=")[1].split()[0]) for r in retries] == list(range(1, max_attempts))
    gave_up = _events(records, "archive_gave_up")
    assert len(gave_up) == 1 and f"op={op} " in gave_up[0] and f"attempts={max_attempts} " in gave_up[0]
    assert all(r.levelno == logging.WARNING for r in records.records if r.getMessage().startswith("event=archive_"))


@pytest.mark.parametrize(
    "exc",
    [
        ReadTimeoutError(endpoint_url="http://s3", error="timed out"),
        ConnectTimeoutError(endpoint_url="http://s3", error="timed out"),
        EndpointConnectionError(endpoint_url="http://s3", error="refused"),
        ConnectionClosedError(endpoint_url="http://s3", error="closed"),
        ResponseStreamingError(error=ProtocolError("Connection broken")),
        ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_failures_are_transient(exc: Exception) -> None:
    from pipeline.bindings.archive_s3 import translate

    with pytest.raises(TransientError), translate():
        raise exc


@pytest.mark.parametrize(
    "endpoint",
    ["notaurl", "ftp://minio:9000", "http://", "https:///path", "http://minio:notaport", "minio:9000"],
)
def test_bad_endpoint_url_is_a_config_error(endpoint: str) -> None:
    from pipeline.bindings.archive_s3 import S3Store

    url = f"s3://bkt/p?endpoint_url={endpoint}"
    with pytest.raises(ConfigError, match=r"^config error: bindings\.archive: endpoint_url must be") as err:
        S3Store.from_url(url)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"bindings\.archive"):
        _s3_store(url)


def test_valid_endpoint_urls_are_accepted(aws_credentials: None) -> None:
    from pipeline.bindings.archive_s3 import S3Store

    for endpoint in ("http://127.0.0.1:9000", "https://account.r2.cloudflarestorage.com", "http://minio"):
        store = S3Store.from_url(f"s3://bkt/p?region=auto&endpoint_url={endpoint}")
        assert store.client.meta.endpoint_url == endpoint
        store.close()
