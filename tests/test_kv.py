"""The KV binding's contract, written once and run over every KV backend (the `env`
fixture parametrises the DB backends the embedded KV lives in)."""

from __future__ import annotations

from typing import Any

import pytest
from freezegun import freeze_time

from pipeline.bindings.kv import MAX_VALUE_BYTES
from pipeline.errors import ValidationError

T0 = "2026-11-20T12:00:00Z"


@pytest.fixture
def kv(env: Any) -> Any:
    assert env.KV is not None
    return env.KV


def test_put_get_types_and_metadata(kv: Any) -> None:
    kv.put("a", "héllo", metadata={"v": 1})
    assert kv.get("a") == "héllo"
    assert kv.get("a", type="bytes") == "héllo".encode()
    assert kv.get_with_metadata("a") == {"value": "héllo", "metadata": {"v": 1}}
    kv.put("j", {"x": [1, 2]})
    assert kv.get("j", type="json") == {"x": [1, 2]}
    kv.put("b", b"\x00\xff")
    assert kv.get("b", type="bytes") == b"\x00\xff"
    assert kv.get("missing") is None
    assert kv.get_with_metadata("missing") == {"value": None, "metadata": None}


def test_put_replaces_value_and_metadata(kv: Any) -> None:
    kv.put("k", "one", metadata={"n": 1})
    kv.put("k", "two")
    assert kv.get_with_metadata("k") == {"value": "two", "metadata": None}
    kv.delete("k")
    assert kv.get("k") is None
    kv.delete("k")  # deleting a missing key is not an error


def test_list_byte_order_prefix_and_cursor(kv: Any) -> None:
    names = ["b", "a", "B", "a/1", "a/2", "é", "z", "a\u00ff", "a/10", "ab"]
    for n in names:
        kv.put(n, n, metadata={"n": n})
    everything = kv.list()
    assert [k["name"] for k in everything["keys"]] == sorted(names, key=lambda s: s.encode())
    assert everything["list_complete"] is True and everything["cursor"] == ""
    assert everything["keys"][0]["metadata"] == {"n": "B"}

    prefixed = kv.list(prefix="a/")
    assert [k["name"] for k in prefixed["keys"]] == ["a/1", "a/10", "a/2"]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = kv.list(limit=3, cursor=cursor)
        pages += 1
        seen += [k["name"] for k in page["keys"]]
        if page["list_complete"]:
            break
        assert page["cursor"]
        cursor = page["cursor"]
    assert seen == sorted(names, key=lambda s: s.encode())
    assert pages == 4


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda kv: kv.put("x" * 513, "v"), "key"),
        (lambda kv: kv.put("é" * 257, "v"), "key"),  # 514 bytes
        (lambda kv: kv.put("", "v"), "key"),
        (lambda kv: kv.put(".", "v"), "key"),
        (lambda kv: kv.put("k", b"x" * (MAX_VALUE_BYTES + 1)), "value"),
        (lambda kv: kv.put("k", "v", metadata={"m": "x" * 1020}), "metadata"),
        (lambda kv: kv.put("k", "v", expiration_ttl=59), "expiration_ttl"),
        (lambda kv: kv.put("k", "v", expiration=1.0), "expiration"),
        (lambda kv: kv.put("k", "v", expiration=2e9, expiration_ttl=100), "expiration"),
        (lambda kv: kv.put("k", object()), "value"),
        (lambda kv: kv.list(limit=0), "limit"),
        (lambda kv: kv.list(limit=1001), "limit"),
        (lambda kv: kv.list(cursor="!!!not base64"), "cursor"),
        (lambda kv: kv.get("k", type="stream"), "type"),
    ],
)
def test_limits_raise_clear_errors_and_change_nothing(kv: Any, call: Any, field: str) -> None:
    kv.put("k", "original", metadata={"keep": True})
    with pytest.raises(ValidationError) as info:
        call(kv)
    assert info.value.field == field
    assert kv.get_with_metadata("k") == {"value": "original", "metadata": {"keep": True}}
    assert [k["name"] for k in kv.list()["keys"]] == ["k"]


def test_limits_at_the_boundary_are_accepted(kv: Any) -> None:
    kv.put("x" * 512, "v", expiration_ttl=60, metadata={"m": "x" * 1010})
    assert kv.get("x" * 512) == "v"


def test_expiry_with_frozen_time(kv: Any) -> None:
    with freeze_time(T0) as frozen:
        kv.put("ttl", "soon", expiration_ttl=60)
        kv.put("abs", "later", expiration=frozen().timestamp() + 3600)
        kv.put("forever", "always")
        listed = {k["name"]: k for k in kv.list()["keys"]}
        assert listed["ttl"]["expiration"] == int(frozen().timestamp()) + 60
        assert "expiration" not in listed["forever"]

        frozen.tick(59)
        assert kv.get("ttl") == "soon"
        frozen.tick(1)
        assert kv.get("ttl") is None
        assert kv.get_with_metadata("ttl") == {"value": None, "metadata": None}
        assert [k["name"] for k in kv.list()["keys"]] == ["abs", "forever"]

        frozen.tick(3600)
        assert kv.get("abs") is None
        assert [k["name"] for k in kv.list()["keys"]] == ["forever"]
        assert kv.purge_expired() == 2
        kv.put("ttl", "again")  # an expired key can be written afresh
        assert kv.get("ttl") == "again"


def test_list_skips_expired_keys_without_losing_the_page_size(kv: Any) -> None:
    with freeze_time(T0) as frozen:
        for i in range(6):
            kv.put(f"k{i}", "v", expiration_ttl=60 if i % 2 else None)
        frozen.tick(61)
        page = kv.list(limit=2)
        assert [k["name"] for k in page["keys"]] == ["k0", "k2"]
        rest = kv.list(limit=2, cursor=page["cursor"])
        assert [k["name"] for k in rest["keys"]] == ["k4"] and rest["list_complete"]
