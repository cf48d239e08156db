"""The traffic event: one per request, validated the same way by every producer and
the consumer. `parse_event` validates a decoded JSON value by hand (not a pydantic model)
and names the offending field in one line. `decode_message` is the consumer's hot path: it
decodes a stored JSON body (one event, or an array of events) straight into Events with
msgspec and accepts the common shape at once; anything else goes through `parse_event`,
which gives the verdict and the error message, so both always agree. `decode_batch` is
the same fast path over a whole batch of bodies, checked in bulk.

Fields: `id` (≤ 128 chars, the idempotency key; when absent the queue message id is
used, which stays the same across redeliveries), `ts` (epoch milliseconds or RFC 3339,
UTC, an RFC 3339 string must carry its offset; at most 5 minutes in the future),
`method`, `path`, `status` (100–599), `response_time_ms` (finite, 0 to `MAX_RESPONSE_TIME_MS`),
optional `host`, `colo`, `bytes` (int, 0 to `MAX_BYTES`). Unknown fields are ignored.

The bounds are what every backend can store and sum: `bytes` ≤ 2^40 (1 TiB) per event
leaves an hourly row's 64-bit `bytes_sum` room for 8,388,608 maximal events (and any
realistic hour), a response time of at most a day keeps `rt_sum_ms` finite, and no text
field may hold NUL or a lone surrogate, which PostgreSQL cannot store. A value past them is
refused at the door, naming the field, rather than failing a batch in the database.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter, methodcaller
from typing import Annotated, Any, cast

import msgspec

from pipeline.bindings.queue import decode_body
from pipeline.errors import ValidationError
from pipeline.paths import PathNormalizer

MAX_ID_LEN = 128
MAX_FUTURE_MS = 5 * 60 * 1000
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_BYTES = 2**40
MAX_RESPONSE_TIME_MS = 86_400_000.0  # a day
_METHOD = re.compile(r"[A-Za-z]{1,16}")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, lone surrogates
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)")


class Event(msgspec.Struct, gc=False):
    """A validated event. The annotations double as the JSON shape `decode_message` accepts
    on its fast path (type and range checked in C); `parse_event` enforces the same rules
    and more forms (RFC 3339 `ts`, null or absent `id`/`host`, lower-case methods)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
    ts: int  # epoch ms
    method: str
    path: str  # normalised
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    response_time_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_RESPONSE_TIME_MS)]
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""  # lower-cased
    colo: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] | None = None

    def values(self, overflow: int = 0) -> tuple[Any, ...]:
        """The `traffic_events` row, in `EVENT_COLUMNS` order."""
        return (
            self.ts, self.id, self.method, self.path, overflow, self.status,
            self.response_time_ms, self.host, self.colo, self.bytes,
        )  # fmt: skip

    def row(self, overflow: int = 0) -> dict[str, Any]:
        return dict(zip(EVENT_COLUMNS, self.values(overflow), strict=True))


EVENT_COLUMNS = ("ts", "id", "method", "path", "overflow", "status", "response_time_ms", "host", "colo", "bytes")


def _int(obj: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int:
    v = obj[name]
    if type(v) is not int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ValidationError(name, f"must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValidationError(name, f"must be between {lo} and {hi}, got {v}" if hi else f"must be ≥ {lo}, got {v}")
    return v


def _str(obj: dict[str, Any], name: str, max_len: int, default: str | None = None) -> str | None:
    v = obj.get(name)
    if v is None:
        return default
    return _text(name, v, max_len)


def _text(name: str, v: Any, max_len: int) -> str:
    """`v`, a present (not None) value of field `name`, checked to be a storable string."""
    if not isinstance(v, str):
        raise ValidationError(name, f"must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise ValidationError(name, f"longer than {max_len} characters ({len(v)})")
    _storable(name, v)
    return v


def _storable(name: str, v: str) -> str:
    bad = _UNSTORABLE.search(v)
    if bad is not None:
        raise ValidationError(name, f"contains {bad.group()!r} at position {bad.start()}, which cannot be stored")
    return v


def storable(text: str) -> str:
    """`text` with what no backend can store (NUL, lone surrogates) percent-encoded: for a
    producer that records what it saw rather than validating it (the traffic collector,
    where a request for `/a%00b` arrives decoded as `/a\x00b`)."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), text)


def parse_ts(v: Any, now_ms: int) -> int:
    if isinstance(v, bool):
        raise ValidationError("ts", "must be epoch milliseconds or an RFC 3339 string, got bool")
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise ValidationError("ts", "must be finite")
        ts = int(v)
    elif isinstance(v, str):
        try:
            if not _RFC3339.fullmatch(v):
                raise ValueError(v)
            dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValidationError("ts", f"not RFC 3339 with a UTC offset: {v[:40]!r}") from None
        ts = int(dt.timestamp() * 1000)
    else:
        raise ValidationError("ts", f"must be epoch milliseconds or an RFC 3339 string, got {type(v).__name__}")
    if ts < MIN_TS_MS:
        raise ValidationError("ts", f"before 2000-01-01 ({ts}); epoch milliseconds expected")
    if ts > now_ms + MAX_FUTURE_MS:
        raise ValidationError("ts", "more than 5 minutes in the future")
    return ts


_REQUIRED = ("ts", "method", "path", "status", "response_time_ms")
_COMMON_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))


def parse_event(obj: Any, normalizer: PathNormalizer, now_ms: int, fallback_id: str | None = None) -> Event:
    """Validate one decoded JSON value; raise ValidationError naming the field.

    The common shapes (int ts, upper-case method, float latency) take the short branches;
    everything else goes through the general checks, which produce the error messages."""
    if not isinstance(obj, dict):
        raise ValidationError("event", f"must be a JSON object, got {type(obj).__name__}")
    get = obj.get
    ts, method, path, status, rt = get("ts"), get("method"), get("path"), get("status"), get("response_time_ms")
    if ts is None or method is None or path is None or status is None or rt is None:
        raise ValidationError(next(n for n in _REQUIRED if get(n) is None), "required")
    event_id = get("id")
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_ID_LEN or _UNSTORABLE.search(event_id):
        event_id = _str(obj, "id", MAX_ID_LEN) or fallback_id
    if not event_id:
        raise ValidationError("id", "required (or must be assigned by the producer)")
    if type(ts) is not int or not MIN_TS_MS <= ts <= now_ms + MAX_FUTURE_MS:
        ts = parse_ts(ts, now_ms)
    if type(method) is not str or method not in _COMMON_METHODS:  # lists/dicts are unhashable
        if not isinstance(method, str) or not _METHOD.fullmatch(method):
            raise ValidationError("method", f"must be an HTTP method token, got {str(method)[:20]!r}")
        method = method.upper()
    if type(path) is not str or len(path) > normalizer.cfg.max_length or _UNSTORABLE.search(path):
        path = _text("path", path, normalizer.cfg.max_length)
    if not path.startswith("/"):
        raise ValidationError("path", "must start with '/'")
    if type(status) is not int or not 100 <= status <= 599:
        status = _int(obj, "status", 100, 599)
    if type(rt) is not float or not 0 <= rt <= MAX_RESPONSE_TIME_MS:  # NaN fails the comparison too
        if isinstance(rt, bool) or not isinstance(rt, int | float):
            raise ValidationError("response_time_ms", f"must be a number, got {type(rt).__name__}")
        if not math.isfinite(rt) or not 0 <= rt <= MAX_RESPONSE_TIME_MS:
            raise ValidationError("response_time_ms", f"must be between 0 and {MAX_RESPONSE_TIME_MS:.0f}, got {rt}")
        rt = float(rt)
    host = get("host")
    if host is not None:
        host = (host if type(host) is str and len(host) <= 255 else _text("host", host, 255)).lower()
        _storable("host", host)
    colo = get("colo")
    if colo is not None and (type(colo) is not str or len(colo) > 16):
        colo = _str(obj, "colo", 16)
    if colo:
        _storable("colo", colo)
    nbytes = get("bytes")
    if nbytes is not None and (type(nbytes) is not int or not 0 <= nbytes <= MAX_BYTES):
        nbytes = _int(obj, "bytes", 0, MAX_BYTES)
    return Event(event_id, ts, method, normalizer.normalize(path), status, rt, host or "", colo, nbytes)


_decode_one_or_many = msgspec.json.Decoder(Event | list[Event]).decode


def _complete(events: list[Event], normalizer: PathNormalizer, now_ms: int, min_ts: int = 0) -> bool:
    """Complete Events msgspec decoded (normalised paths, lower-case hosts), if all have the
    common shape: ts from `min_ts` (and 2000) to 5 minutes ahead, a common upper-case
    method, a path within limits, no (ts, id) key twice. Checked in bulk; False, having
    changed nothing, leaves the verdict to the general path."""
    if not events:
        return True
    ts = list(map(_TS, events))
    if min(ts) < max(min_ts, MIN_TS_MS) or max(ts) > now_ms + MAX_FUTURE_MS:
        return False
    if not set(map(_METHOD_OF, events)) <= _COMMON_METHODS:
        return False
    if len(set(zip(ts, map(_ID, events), strict=True))) != len(events):
        return False
    paths = set(map(_PATH, events))
    if max(map(len, paths)) > normalizer.cfg.max_length or not all(map(_ROOTED, paths)):
        return False
    hosts = set(map(_HOST, events))
    colos = {c for c in map(_COLO, events) if c}
    if "\x00" in "".join((*paths, *hosts, *colos, *map(_ID, events))):  # decoded JSON holds no lone surrogate
        return False
    # Checked: from here on, complete the events (few distinct paths and hosts per batch;
    # most are already normal, and then the events are left as they are).
    path_of = {p: n for p, n in zip(paths, map(normalizer.normalize, paths), strict=True) if n != p}
    host_of = {h: low for h in hosts if (low := h.lower()) != h}
    if path_of or host_of:
        for ev in events:
            ev.path = path_of.get(ev.path, ev.path)
            ev.host = host_of.get(ev.host, ev.host)
    return True


_TS, _ID, _PATH, _HOST, _COLO, _METHOD_OF = (attrgetter(f) for f in ("ts", "id", "path", "host", "colo", "method"))
_ROOTED = methodcaller("startswith", "/")


def decode_batch(raws: list[bytes], normalizer: PathNormalizer, now_ms: int, min_ts: int) -> list[Event] | None:
    """The common case of a whole batch, checked in bulk: every body decodes into Events of
    the common shape (`_complete`), none older than `min_ts`, no (ts, id) key twice.
    Returns the events in body order, or None, having changed nothing: then
    `decode_message` decides message by message, and explains what it refuses."""
    decode = _decode_one_or_many
    try:
        got = [decode(raw) for raw in raws]
    except msgspec.DecodeError:
        return None
    if list in set(map(type, got)):
        events = [ev for g in got for ev in (g if isinstance(g, list) else (g,))]
    else:
        events = cast("list[Event]", got)  # no list among them: all Events
    return events if _complete(events, normalizer, now_ms, min_ts) else None


def decode_message(
    raw: bytes, normalizer: PathNormalizer, now_ms: int, fallback_id: str | None = None
) -> Event | Sequence[Event | ValidationError]:
    """Validate a queue message's stored JSON body: one event (an object: its Event, or
    ValidationError raised) or several (an array: an Event or a ValidationError per
    element; an element without an id gets `fallback_id:index`, which a redelivery keeps).
    Bodies of the common shape decode straight into Events; anything else goes through
    `parse_event`, so both paths reach the same verdicts."""
    try:
        got = _decode_one_or_many(raw)
    except msgspec.DecodeError:
        got = None
    if got is not None and _complete(got if isinstance(got, list) else [got], normalizer, now_ms):
        return got
    obj = decode_body(raw, "json")  # raises ValidationError("body", "malformed JSON: …")
    if not isinstance(obj, list):
        return parse_event(obj, normalizer, now_ms, fallback_id)
    out: list[Event | ValidationError] = []
    for i, item in enumerate(obj):
        try:
            out.append(parse_event(item, normalizer, now_ms, None if fallback_id is None else f"{fallback_id}:{i}"))
        except ValidationError as exc:
            out.append(exc)
    return out
