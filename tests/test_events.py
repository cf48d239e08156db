"""The event model: every field's rule, timestamps in each accepted form, and errors that
name the field. Every case runs through both validators, `parse_event` on the decoded value
and `decode_message` on the same event as a stored JSON body, which must agree; and
`decode_batch`, the bulk path over a batch of bodies, must agree with `decode_message`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from freezegun import freeze_time
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline import clock
from pipeline.errors import ValidationError
from pipeline.events import MIN_TS_MS, Event, decode_batch, decode_message, parse_event
from pipeline.paths import PathNormalizer

NOW = "2026-11-20T12:00:00Z"
NOW_MS = int(datetime(2026, 11, 20, 12, tzinfo=UTC).timestamp() * 1000)
NORM = PathNormalizer()


def good(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "evt-1",
        "ts": NOW_MS - 60_000,
        "method": "get",
        "path": "/users/42/?x=1",
        "status": 200,
        "response_time_ms": 12.5,
        "host": "API.Example.com",
        "colo": "FRA",
        "bytes": 512,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValidationError as exc:
        return exc


def parse(obj: Any, fallback_id: str | None = None, now_ms: int = NOW_MS) -> Any:
    """parse_event's verdict, after checking that decode_message reaches the same one on the
    JSON document (when the value survives a JSON round trip: NaN, for one, does not)."""
    expected = outcome(parse_event, obj, NORM, now_ms, fallback_id)
    try:
        doc = orjson.dumps(obj)
    except TypeError:
        doc = None
    if doc is not None and orjson.loads(doc) == obj and not isinstance(obj, list):  # an array: several events
        got = outcome(decode_message, doc, NORM, now_ms, fallback_id)
        assert repr(got) == repr(expected) and type(got) is type(expected)
    if isinstance(expected, ValidationError):
        raise expected
    return expected


def rejects(obj: Any, field: str) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        parse(obj)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    return err.value


def test_valid_event_is_normalised() -> None:
    ev = parse(good())
    assert ev.id == "evt-1"
    assert ev.ts == NOW_MS - 60_000
    assert ev.method == "GET"
    assert ev.path == "/users/:id"
    assert ev.status == 200
    assert ev.response_time_ms == 12.5 and isinstance(ev.response_time_ms, float)
    assert ev.host == "api.example.com"
    assert ev.colo == "FRA"
    assert ev.bytes == 512


def test_optional_fields_may_be_absent() -> None:
    ev = parse(good(host=..., colo=..., bytes=...))
    assert (ev.host, ev.colo, ev.bytes) == ("", None, None)


def test_optional_fields_may_be_null() -> None:
    ev = parse(good(host=None, colo=None, bytes=None))
    assert (ev.host, ev.colo, ev.bytes) == ("", None, None)


def test_unknown_fields_are_ignored() -> None:
    ev = parse(good(user_agent="curl/8", extra={"nested": [1, 2]}, tls=True))
    assert ev.path == "/users/:id"
    assert not hasattr(ev, "user_agent")


# -- id -------------------------------------------------------------------------------


def test_id_max_128_chars() -> None:
    assert parse(good(id="x" * 128)).id == "x" * 128
    err = rejects(good(id="x" * 129), "id")
    assert "128" in err.reason


def test_id_must_be_a_string() -> None:
    rejects(good(id=12345), "id")


def test_missing_id_uses_fallback() -> None:
    assert parse(good(id=...), fallback_id="0193-msg").id == "0193-msg"
    assert parse(good(id="own"), fallback_id="0193-msg").id == "own"


def test_missing_id_without_fallback_is_rejected() -> None:
    rejects(good(id=...), "id")
    rejects(good(id=""), "id")


# -- required fields and types ------------------------------------------------------------


@pytest.mark.parametrize("field", ["ts", "method", "path", "status", "response_time_ms"])
def test_required_fields(field: str) -> None:
    err = rejects(good(**{field: ...}), field)
    assert "required" in err.reason
    rejects(good(**{field: None}), field)


@pytest.mark.parametrize("body", [[1, 2], "text", 42, None, True])
def test_event_must_be_an_object(body: Any) -> None:
    rejects(body, "event")


@pytest.mark.parametrize("method", ["G E T", "", "GET1", "X" * 17, 7, ["GET"], "GET\n"])
def test_method_must_be_a_token(method: Any) -> None:
    rejects(good(method=method), "method")


@pytest.mark.parametrize("method", ["get", "Post", "PROPFIND", "purge"])
def test_method_upper_cased(method: str) -> None:
    assert parse(good(method=method)).method == method.upper()


@pytest.mark.parametrize("path", ["users", "", "http://x/", 42, ["/a"]])
def test_path_must_be_a_string_starting_with_slash(path: Any) -> None:
    rejects(good(path=path), "path")


def test_path_length_limit() -> None:
    assert parse(good(path="/" + "z" * 2047)).path == "/" + "z" * 2047
    err = rejects(good(path="/" + "z" * 2048), "path")
    assert "2048" in err.reason


@pytest.mark.parametrize("status", [100, 200, 204, 301, 404, 500, 599, 404.0])
def test_status_range_accepts(status: Any) -> None:
    assert parse(good(status=status)).status == int(status)


@pytest.mark.parametrize("status", [99, 600, 999, 0, -200])
def test_status_range_rejects(status: int) -> None:
    err = rejects(good(status=status), "status")
    assert str(status) in err.reason


@pytest.mark.parametrize("status", ["200", 200.5, [200], {"code": 200}])
def test_status_type(status: Any) -> None:
    rejects(good(status=status), "status")


def test_status_bool_is_not_an_int() -> None:
    rejects(good(status=True), "status")


@pytest.mark.parametrize("rt", [0, 0.0, 1, 59_999.9, 86_400_000])
def test_response_time_accepts(rt: float) -> None:
    assert parse(good(response_time_ms=rt)).response_time_ms == float(rt)


@pytest.mark.parametrize("rt", [-0.001, -5, float("nan"), float("inf"), float("-inf"), 86_400_000.5, 1.7e308])
def test_response_time_must_be_finite_and_within_a_day(rt: float) -> None:
    rejects(good(response_time_ms=rt), "response_time_ms")


@pytest.mark.parametrize("rt", ["12", True, [1], {"ms": 1}])
def test_response_time_type(rt: Any) -> None:
    rejects(good(response_time_ms=rt), "response_time_ms")


def test_host_rules() -> None:
    assert parse(good(host="h" * 255)).host == "h" * 255
    rejects(good(host="h" * 256), "host")
    rejects(good(host=80), "host")


def test_colo_rules() -> None:
    assert parse(good(colo="c" * 16)).colo == "c" * 16
    rejects(good(colo="c" * 17), "colo")
    rejects(good(colo=1), "colo")


@pytest.mark.parametrize("nbytes", [0, 1, 10**12])
def test_bytes_accepts(nbytes: int) -> None:
    assert parse(good(bytes=nbytes)).bytes == nbytes


@pytest.mark.parametrize("nbytes", [-1, 1.5, "10", True])
def test_bytes_rejects(nbytes: Any) -> None:
    rejects(good(bytes=nbytes), "bytes")


# -- ts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NOW_MS - 1, NOW_MS - 1),
        (float(NOW_MS - 1000), NOW_MS - 1000),
        ("2026-11-20T11:00:00Z", NOW_MS - 3_600_000),
        ("2026-11-20T11:00:00z", NOW_MS - 3_600_000),
        ("2026-11-20T11:00:00.250Z", NOW_MS - 3_600_000 + 250),
        ("2026-11-20T13:00:00+02:00", NOW_MS - 3_600_000),
        ("2026-11-20T06:30:00-05:00", NOW_MS - 30 * 60_000),
        ("2026-11-20 11:00:00Z", NOW_MS - 3_600_000),
    ],
)
def test_ts_forms(value: Any, expected: int) -> None:
    assert parse(good(ts=value)).ts == expected


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00Z", "", True, [NOW_MS], float("nan")])
def test_ts_rejects_garbage(value: Any) -> None:
    rejects(good(ts=value), "ts")


def test_ts_before_2000_is_rejected() -> None:
    assert parse(good(ts=MIN_TS_MS)).ts == MIN_TS_MS
    rejects(good(ts=MIN_TS_MS - 1), "ts")
    err = rejects(good(ts=NOW_MS // 1000), "ts")  # epoch seconds by mistake
    assert "milliseconds" in err.reason


@freeze_time(NOW)
def test_ts_at_most_five_minutes_in_the_future() -> None:
    now_ms = clock.now_ms()
    assert now_ms == NOW_MS
    limit = now_ms + 5 * 60_000
    assert parse_event(good(ts=limit), NORM, clock.now_ms()).ts == limit
    assert parse_event(good(ts="2026-11-20T12:05:00Z"), NORM, clock.now_ms()).ts == limit
    for too_far in (limit + 1, "2026-11-20T12:05:00.001Z", "2026-11-21T00:00:00Z"):
        with pytest.raises(ValidationError) as err:
            parse_event(good(ts=too_far), NORM, clock.now_ms())
        assert err.value.field == "ts"
        assert "future" in err.value.reason


def test_future_limit_moves_with_the_clock() -> None:
    ts = NOW_MS + 10 * 60_000
    with freeze_time(NOW), pytest.raises(ValidationError):
        parse_event(good(ts=ts), NORM, clock.now_ms())
    with freeze_time("2026-11-20T12:06:00Z"):
        assert parse_event(good(ts=ts), NORM, clock.now_ms()).ts == ts


def test_row_carries_overflow_flag() -> None:
    ev = parse(good())
    row = ev.row(overflow=1)
    assert row["overflow"] == 1
    assert {k: row[k] for k in ("ts", "id", "method", "path", "status", "host")} == {
        "ts": NOW_MS - 60_000,
        "id": "evt-1",
        "method": "GET",
        "path": "/users/:id",
        "status": 200,
        "host": "api.example.com",
    }


def test_decode_message_reports_malformed_json() -> None:
    for doc in (b'{"id": "x", "ts": ', b'{"response_time_ms": NaN}', b"\xff\xfe", b""):
        with pytest.raises(ValidationError) as err:
            decode_message(doc, NORM, NOW_MS)
        assert str(err.value).startswith("body: malformed JSON")


EDGES = [
    None, True, False, -1, 0, 1, 99, 100, 599, 600, 2**63, -0.0, 0.5, 1e308, MIN_TS_MS - 1, MIN_TS_MS,
    NOW_MS + 300_000, NOW_MS + 300_001, float(NOW_MS), "", "GET", "get", "G3T", "/", "/a//b/", "x",
    "2026-11-20T11:00:00Z", "a" * 16, "a" * 17, "a" * 128, "a" * 129, "a" * 255, "a" * 256, [], {}, [1], {"a": 1},
]  # fmt: skip
FIELDS = ("id", "ts", "method", "path", "status", "response_time_ms", "host", "colo", "bytes", "extra")


@pytest.mark.parametrize("field", FIELDS)
def test_both_validators_agree_at_the_edges(field: str) -> None:
    """Each field of an event of the common shape set to each edge value: decode_message on
    the document reaches parse_event's verdict (the same Event or the same error)."""
    verdicts = {type(outcome(parse, good(**{"method": "GET", "path": "/users/42", field: v}), "fb")) for v in EDGES}
    assert verdicts <= {Event, ValidationError}
    assert len(verdicts) == 2 or field == "extra"  # each field has edges on both sides


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGES), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=20), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(NOW_MS - 10**9, NOW_MS + 10**6), st.integers(99, 600), st.text(min_size=120, max_size=300),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, max_size=3), st.booleans())
def test_both_validators_agree_on_any_json_object(changes: dict[str, Any], drop_id: bool) -> None:
    """Several fields of an event of the common shape replaced by arbitrary JSON values."""
    obj = good(**({"method": "GET", "path": "/users/42"} | changes))
    if drop_id:
        obj.pop("id", None)
    assert isinstance(outcome(parse, obj, "fallback-id"), ValidationError | Event)


def test_an_array_body_is_judged_element_by_element() -> None:
    """A message holding several events: each element gets parse_event's own verdict, and
    an element without an id takes `<message id>:<index>`, on both paths."""
    fast = [good(method="GET", path=f"/a/{i}") for i in range(3)]
    assert decode_message(orjson.dumps(fast), NORM, NOW_MS, "m") == [parse(e) for e in fast]
    mixed = [good(method="GET"), good(status=700), {"ts": NOW_MS, "method": "GET", "path": "/x", "status": 200,
             "response_time_ms": 1}, "not an event", good(id=None)]  # fmt: skip
    got = decode_message(orjson.dumps(mixed), NORM, NOW_MS, "m")
    expected = [outcome(parse_event, e, NORM, NOW_MS, f"m:{i}") for i, e in enumerate(mixed)]
    assert [repr(g) for g in got] == [repr(e) for e in expected]
    assert [type(g).__name__ for g in got] == ["Event", "ValidationError", "Event", "ValidationError", "Event"]
    assert (got[2].id, got[4].id) == ("m:2", "m:4")
    assert decode_message(b"[]", NORM, NOW_MS, "m") == []


BODIES = st.one_of(
    st.builds(lambda c: good(**({"method": "GET", "path": "/users/42"} | c)),
              st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, max_size=1)),
    st.sampled_from([good(), good(id="evt-2", ts=NOW_MS - 1), good(id="evt-3", path="/a//b/", host="")]),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(BODIES, st.lists(BODIES, max_size=3)), max_size=6), st.integers(NOW_MS - 120_000, NOW_MS))
def test_the_bulk_path_agrees_with_message_by_message(bodies: list[Any], min_ts: int) -> None:
    """decode_batch either declines (None) or returns exactly the events decode_message
    accepts for each body, in order: all of them accepted, none older than `min_ts`, no
    (ts, id) twice."""
    try:
        raws = [orjson.dumps(b) for b in bodies]
    except TypeError:  # an integer beyond 64 bits: not a document a producer can store
        assume(False)
    verdicts = [outcome(decode_message, raw, NORM, NOW_MS, f"m{i}") for i, raw in enumerate(raws)]
    flat: list[Any] = [e for v in verdicts for e in (v if isinstance(v, list) else [v])]
    got = decode_batch(raws, NORM, NOW_MS, min_ts)
    if got is not None:
        assert got == flat
        assert all(type(e) is Event and e.ts >= min_ts for e in flat)
        assert len({(e.ts, e.id) for e in flat}) == len(flat)


def test_the_bulk_path_takes_common_batches_and_declines_the_rest() -> None:
    single = [good(id=f"s{i}", method="GET") for i in range(3)]
    packed = [good(id=f"p{i}", method="POST", path=f"/p/{i}/") for i in range(3)]
    raws = [orjson.dumps(e) for e in single] + [orjson.dumps(packed), b"[]"]
    got = decode_batch(raws, NORM, NOW_MS, 0)
    assert got == [parse(e) for e in single + packed]
    assert [e.path for e in got] == ["/users/:id"] * 3 + ["/p/:id"] * 3 and got[0].host == "api.example.com"
    declined = {
        "older than min_ts": (raws, NOW_MS),
        "a key twice": ([orjson.dumps(single[0])] * 2, 0),
        "an invalid event": ([*raws, orjson.dumps(good(status=700))], 0),
        "an element without an id": ([orjson.dumps([good(id=None)])], 0),
        "a lower-case method": ([orjson.dumps(good())], 0),
        "malformed JSON": ([b"{"], 0),
    }
    for why, (batch, min_ts) in declined.items():
        before = [bytes(r) for r in batch]
        assert decode_batch(batch, NORM, NOW_MS, min_ts) is None, why
        assert batch == before


@pytest.mark.parametrize("value", ["2026-11-20T11:00:00", "2026-11-20", "2026-11-20T11:00Z", "20261120T110000Z"])
def test_ts_strings_must_be_rfc_3339_with_an_offset(value: str) -> None:
    err = rejects(good(ts=value), "ts")
    assert "RFC 3339" in str(err)


@pytest.mark.parametrize("nbytes", [0, 1, 2**40])
def test_bytes_up_to_a_tebibyte(nbytes: int) -> None:
    assert parse(good(bytes=nbytes)).bytes == nbytes


@pytest.mark.parametrize("nbytes", [2**40 + 1, 2**63 - 1, 2**63, 2**64 + 5])
def test_bytes_beyond_a_tebibyte_are_refused(nbytes: int) -> None:
    err = rejects(good(bytes=nbytes), "bytes")
    assert str(2**40) in str(err)


@pytest.mark.parametrize("field", ["id", "path", "host", "colo"])
@pytest.mark.parametrize("bad", ["\x00", "\ud800"])
def test_text_postgresql_cannot_store_is_refused(field: str, bad: str) -> None:
    value = {"path": "/a" + bad + "b"}.get(field, "a" + bad + "b")
    err = rejects(good(**{field: value}), field)
    assert "cannot be stored" in str(err)


def test_a_batch_with_nul_goes_the_slow_way_and_names_the_field() -> None:
    """The bulk check of `decode_batch` must not let a NUL through on its fast path."""
    raws = [orjson.dumps(good(id=f"e{i}", method="GET", path="/ok")) for i in range(3)]
    raws.append(orjson.dumps(good(id="bad", method="GET", path="/x\x00y")))
    assert decode_batch(raws, NORM, NOW_MS, 0) is None
    with pytest.raises(ValidationError, match=r"^path: "):
        decode_message(raws[-1], NORM, NOW_MS)
