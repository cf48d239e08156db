"""The ARCHIVE binding contract, one suite over every backend: the file directory, moto in
process (mock_aws) and moto's threaded server over real HTTP (endpoint_url)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pipeline.bindings import archive as archive_mod
from pipeline.bindings.archive import ObjectStore, with_retries
from pipeline.config import Config
from pipeline.env import ARCHIVE_BACKENDS
from pipeline.errors import BindingError, ConfigError, NotFound, TransientError, ValidationError
from tests import archive_support

# Fixtures shared by the archive tests.
archive_url = archive_support.archive_url
MB = 1024 * 1024


def _store(url: str, **archive: Any) -> ObjectStore:
    cfg = Config().replace(bindings={"archive": url}, archive=archive)
    return ARCHIVE_BACKENDS[url.split(":", 1)[0]](url, None, cfg)  # type: ignore[arg-type]


@pytest.fixture
def store(archive_url: str) -> ObjectStore:
    s = _store(archive_url)
    yield s
    s.close()


def test_put_head_get_roundtrip_with_metadata(store: ObjectStore) -> None:
    info = store.put("events/dt=2026-11-19/hour=05/a.gz", io.BytesIO(b"hello world"), {"Rows": 2, "sha256": "ab"})
    assert info.size == 11
    head = store.head("events/dt=2026-11-19/hour=05/a.gz")
    assert head.size == 11
    assert head.metadata["rows"] == "2" and head.metadata["sha256"] == "ab"
    assert store.get_bytes("events/dt=2026-11-19/hour=05/a.gz") == b"hello world"
    store.put_bytes("events/dt=2026-11-19/hour=05/a.gz", b"new", {"rows": "1"})
    assert store.get_bytes("events/dt=2026-11-19/hour=05/a.gz") == b"new"
    assert store.head("events/dt=2026-11-19/hour=05/a.gz").metadata == {"rows": "1"}


def test_missing_key_is_not_found_and_delete_is_idempotent(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.head("nope/x")
    with pytest.raises(NotFound):
        b"".join(store.get("nope/x"))
    store.put_bytes("k/x", b"1")
    store.delete("k/x")
    store.delete("k/x")
    with pytest.raises(NotFound):
        store.head("k/x")
    assert [i.key for i in store.list("k/")] == []


def test_list_by_prefix_in_key_order_across_pages(store: ObjectStore) -> None:
    keys = [f"events/dt=2026-11-1{d}/hour=0{h}/p.gz" for d in (8, 9) for h in range(3)]
    for k in reversed(keys):
        store.put_bytes(k, k.encode())
    store.put_bytes("other/z", b"z")
    if hasattr(store, "page_size"):
        store.page_size = 2  # force several list pages
    listed = list(store.list("events/"))
    assert [i.key for i in listed] == keys
    assert [i.size for i in listed] == [len(k) for k in keys]
    assert [i.key for i in store.list("events/dt=2026-11-19/")] == keys[3:]


def test_multipart_upload_above_threshold(archive_url: str) -> None:
    store = _store(archive_url, multipart_threshold=5 * MB)
    body = os.urandom(11 * MB + 123)
    info = store.put("big/object.bin", io.BytesIO(body), {"sha256": "x"})
    assert info.size == len(body)
    assert store.head("big/object.bin").size == len(body)
    assert store.head("big/object.bin").metadata["sha256"] == "x"
    assert store.get_bytes("big/object.bin") == body
    store.close()


def test_streamed_get_yields_bounded_chunks(store: ObjectStore) -> None:
    body = os.urandom(300_000)
    store.put_bytes("c/x", body)
    chunks = list(store.get("c/x", chunk_size=65536))
    assert b"".join(chunks) == body
    assert len(chunks) >= 4 and max(len(c) for c in chunks) <= 65536


def test_file_store_rejects_bad_keys_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = _store(f"file://{tmp_path / 'b'}")
    for key in ("", "/abs", "a/../b", ".meta/x", "a//b"):
        with pytest.raises(ValidationError) as err:
            store.put_bytes(key, b"x")
        assert err.value.field == "key"
    store.put_bytes("a/b", b"x")
    assert list((tmp_path / "b" / ".tmp").iterdir()) == []
    assert [i.key for i in store.list()] == ["a/b"]


def test_file_store_put_failure_keeps_previous_object(tmp_path: Path) -> None:
    store = _store(f"file://{tmp_path / 'b'}")
    store.put_bytes("a/b", b"old", {"rows": "1"})

    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(4)

    with pytest.raises(BindingError):
        store.put("a/b", Broken(b"0123456789"), {"rows": "9"})
    assert store.get_bytes("a/b") == b"old"
    assert list((tmp_path / "b" / ".tmp").iterdir()) == []


@pytest.mark.usefixtures("aws_credentials")
def test_s3_missing_bucket_is_a_binding_error_not_retried() -> None:
    from moto import mock_aws

    with mock_aws():
        store = _store("s3://no-such-bucket/p?region=us-east-1")
        with pytest.raises(BindingError) as err:
            store.put_bytes("k", b"x")
        assert not isinstance(err.value, TransientError)
        assert "NoSuchBucket" in str(err.value)


@pytest.mark.usefixtures("aws_credentials")
def test_s3_unreachable_endpoint_is_transient_after_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_mod, "RETRY_BASE_S", 0.0)
    store = _store("s3://b/p?region=us-east-1&endpoint_url=http://127.0.0.1:9&addressing_style=path")
    with pytest.raises(TransientError):
        store.head("k")


def test_s3_error_mapping_and_retry_policy() -> None:
    from pipeline.bindings.archive_s3 import translate

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            with translate():
                raise client_error("SlowDown", 503)
        return "ok"

    archive_mod.RETRY_BASE_S, saved = 0.0, archive_mod.RETRY_BASE_S
    try:
        assert with_retries(flaky, "test") == "ok" and len(calls) == 3
        denied: list[int] = []

        def forbidden() -> None:
            denied.append(1)
            with translate():
                raise client_error("AccessDenied", 403)

        with pytest.raises(BindingError) as err:
            with_retries(forbidden, "test")
        assert not isinstance(err.value, TransientError) and len(denied) == 1
    finally:
        archive_mod.RETRY_BASE_S = saved


def test_s3_url_and_checksum_settings() -> None:
    from pipeline.bindings.archive_s3 import S3Store

    store = S3Store.from_url(
        "s3://bkt/some/prefix?region=eu-west-1&endpoint_url=http://minio:9000&addressing_style=path"
    )
    assert (store.bucket, store.prefix) == ("bkt", "some/prefix/")
    cfg = store.client.meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert store.client.meta.endpoint_url == "http://minio:9000"
    with pytest.raises(ConfigError, match="unknown URL parameter 'regoin'"):
        S3Store.from_url("s3://bkt/p?regoin=x")
    with pytest.raises(ConfigError, match="addressing_style"):
        S3Store.from_url("s3://bkt/p?addressing_style=sideways")
