"""Drill-down into the hot detail rows (`pipeline.detail`, `edgepipe events`, `GET /v1/events`)
on SQLite and PostgreSQL, with events stored by the real consumer: every filter and their
combinations against the truth computed here from the events sent, newest first; paging
with the cursor returns each matching row exactly once (a property test); `--path` narrowed
through the hourly aggregates, `__other__` hours included, and through the daily rows once
the hourly rows are pruned; the query plans (the (ts, id) index walked, never a scan of
the table); bad input refused; the CLI and the API agree."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import clock, detail
from pipeline.clock import HOUR_MS
from pipeline.env import Env
from pipeline.errors import ValidationError
from pipeline.http.app import create_app
from pipeline.http.read_api import encode_cursor
from pipeline.paths import PathNormalizer
from pipeline.schema import OTHER_PATH, path_stats_hourly, traffic_events
from tests.archive_support import consume, run_job
from tests.conftest import MakeEnv, run_cli
from tests.http_support import client_for

MAX_PATHS = 4  # [paths] max_paths_per_hour of the seeded env: busy hours overflow into __other__
RAW_PATHS = [
    "/users/42/orders/", "/users/7/orders", "//items", "/items/", "/search?q=1", "/a/0123456789abcdef0123",
    "/b", "/c", "/d",
]  # fmt: skip
METHODS = ["GET", "get", "post", "Delete"]
STATUSES = [200, 200, 201, 301, 404, 404, 500, 503, 102]
HOSTS = ["API.example.com", "shop.example.com", None]
NORMALIZER = PathNormalizer()

# The filter grid: every combination is checked against the truth.
PATH_OPTIONS = [None, "/users/1/orders/", "/rare", "/nope", "/items", "/b"]
METHOD_OPTIONS = [None, "post"]
STATUS_OPTIONS = [None, "404", "5xx"]
HOST_OPTIONS = [None, "API.EXAMPLE.COM"]


def _hour_base() -> int:
    """The start of the hour before the current one, in epoch ms: the newest seeded hour."""
    return clock.now_ms() // HOUR_MS * HOUR_MS - HOUR_MS


def _traffic(n: int = 420, hours: int = 40, seed: int = 5) -> list[dict[str, Any]]:
    """`n` events over the `hours` hours up to the end of `_hour_base()`'s hour; every
    seventh shares its predecessor's ts (ties ordered by id); `/rare` in three hours only."""
    rng = random.Random(seed)
    top = _hour_base() + HOUR_MS - 1
    out: list[dict[str, Any]] = []
    for i in range(n):
        ts = out[-1]["ts"] if i % 7 == 6 else top - rng.randrange(hours * HOUR_MS)
        ev: dict[str, Any] = {
            "id": f"e{i:05d}",
            "ts": ts,
            "method": rng.choice(METHODS),
            "path": rng.choice(RAW_PATHS),
            "status": rng.choice(STATUSES),
            "response_time_ms": rng.choice((0.5, 12.25, 480.0)),
        }
        host = rng.choice(HOSTS)
        if host is not None:
            ev["host"] = host
        if rng.random() < 0.7:
            ev["colo"] = rng.choice(("AMS", "SFO"))
        if rng.random() < 0.8:
            ev["bytes"] = rng.randrange(10_000)
        out.append(ev)
    for k, h in enumerate((3, 4, 17)):  # the rare path's three hours (sent first: not `__other__`)
        out.insert(k, {"id": f"r{k}", "ts": top - h * HOUR_MS - 1000 * k, "method": "POST", "path": "/rare",
                    "status": 404, "response_time_ms": 1.0, "host": "api.example.com"})  # fmt: skip
    return out


def _stored(ev: dict[str, Any]) -> dict[str, Any]:
    """An event as the drill-down shows it (`overflow` left out: the consumer decides it)."""
    return {
        "ts": detail.iso_ms(ev["ts"]),
        "id": ev["id"],
        "method": ev["method"].upper(),
        "path": NORMALIZER.normalize(ev["path"]),
        "status": ev["status"],
        "response_time_ms": float(ev["response_time_ms"]),
        "host": (ev.get("host") or "").lower(),
        "colo": ev.get("colo"),
        "bytes": ev.get("bytes"),
    }


def _truth(events: list[dict[str, Any]], **q: Any) -> list[dict[str, Any]]:
    """The matching events, newest first, computed from the events sent."""
    since, until = q.get("since"), q.get("until")
    path, method, status, host = (q.get(k) for k in ("path", "method", "status", "host"))
    want_path = None if path is None else NORMALIZER.normalize(path)
    out = []
    for ev in events:
        row = _stored(ev)
        if since is not None and ev["ts"] < clock.parse_time(since) * 1000:
            continue
        if until is not None and ev["ts"] >= clock.parse_time(until) * 1000:
            continue
        if want_path is not None and row["path"] != want_path:
            continue
        if method is not None and row["method"] != method.upper():
            continue
        if status is not None and not (
            row["status"] // 100 == int(status[0]) if status.endswith("xx") else row["status"] == int(status)
        ):
            continue
        if host is not None and row["host"] != host.lower():
            continue
        out.append((ev["ts"], ev["id"], row))
    return [row for _, _, row in sorted(out, key=lambda t: (t[0], t[1]), reverse=True)]


def _seed(make_env: MakeEnv, db_url: str, events: list[dict[str, Any]] | None = None) -> tuple[Env, list[Any]]:
    env = make_env(db_url, paths={"max_paths_per_hour": MAX_PATHS}, consumer={"max_batch_size": 500})
    events = _traffic() if events is None else events
    assert consume(env, events)["inserted"] == len(events)
    return env, events


def _overflow(env: Env) -> dict[str, bool]:
    """id -> the `overflow` flag the consumer stored."""
    with env.DB.read() as conn:
        rows = conn.execute(sa.select(traffic_events.c.id, traffic_events.c.overflow))
        return {i: bool(o) for i, o in rows}


def _page(env: Env, limit: int = 10_000, after: Any = None, step: int = detail.STEP, per_read: int = 24,
          **q: Any) -> detail.Page:  # fmt: skip
    since = q.get("since")
    until = q.get("until")
    f = detail.filters(
        NORMALIZER,
        since=None if since is None else clock.parse_time(since),
        until=None if until is None else clock.parse_time(until),
        **{k: q.get(k) for k in ("path", "method", "status", "host")},
    )
    return detail.page(env.DB, f, limit, after, step=step, periods_per_read=per_read)


def _without_overflow(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "overflow"} for r in rows]


# --- every filter and combination ---------------------------------------------------------


def test_every_filter_and_combination_matches_the_truth(make_env: MakeEnv, db_url: str) -> None:
    env, events = _seed(make_env, db_url)
    flags = _overflow(env)
    base = _hour_base()
    windows = [
        {},
        {"since": detail.iso_ms(base - 20 * HOUR_MS + 1234)},  # RFC 3339 with milliseconds
        {"since": str((base - 30 * HOUR_MS) / 1000), "until": clock.iso((base - 2 * HOUR_MS) / 1000)},  # epoch s
    ]
    checked = matched = 0
    for window, path, method, status, host in itertools.product(
        windows, PATH_OPTIONS, METHOD_OPTIONS, STATUS_OPTIONS, HOST_OPTIONS
    ):
        q = {**window, "path": path, "method": method, "status": status, "host": host}
        want = _truth(events, **q)
        got = _page(env, step=41, per_read=2, **q)  # small steps: many per walk
        assert _without_overflow(got.rows) == want, q
        assert [r["overflow"] for r in got.rows] == [flags[r["id"]] for r in want], q
        assert got.next is None
        checked, matched = checked + 1, matched + len(want)
    assert checked == 3 * 6 * 2 * 3 * 2 and matched > 1000
    # The default walk (one step covers the seeded table) gives the same.
    for q in ({}, {"status": "5xx"}, {"path": "/b", "method": "POST"}, {"host": "shop.example.com"}):
        assert _without_overflow(_page(env, **q).rows) == _truth(events, **q)


def test_the_data_exercises_ties_overflow_and_sparse_paths(make_env: MakeEnv, db_url: str) -> None:
    """The seeded data has what the filter test needs to mean something: equal ts ordered
    by id, rows counted as `__other__` that keep their own path, a path in few hours."""
    env, events = _seed(make_env, db_url)
    rows = _page(env).rows
    assert len(rows) == len(events)
    assert any(a["ts"] == b["ts"] and a["id"] > b["id"] for a, b in itertools.pairwise(rows))
    flagged = [r for r in rows if r["overflow"]]
    assert flagged and all(r["path"] != OTHER_PATH for r in flagged)
    with env.DB.read() as conn:
        hourly = conn.execute(sa.select(path_stats_hourly.c.hour, path_stats_hourly.c.path)).all()
    assert {p for _, p in hourly} >= {OTHER_PATH, "/b", "/rare"}
    assert len({h for h, p in hourly if p == "/rare"}) == 3
    # A path whose rows are all `__other__` in an hour is still found there.
    overflowed = {(r["path"], clock.hour_of_ms(int(clock.parse_time(r["ts"]) * 1000))) for r in flagged}
    assert any((h, p) not in set(hourly) for p, h in overflowed)


# --- paging --------------------------------------------------------------------------------


def test_paging_returns_every_matching_row_exactly_once(make_env: MakeEnv, db_url: str) -> None:
    env, events = _seed(make_env, db_url, _traffic(n=150, hours=12, seed=9))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        path=st.sampled_from(PATH_OPTIONS),
        method=st.sampled_from(METHOD_OPTIONS),
        status=st.sampled_from([*STATUS_OPTIONS, "2xx", "301"]),
        host=st.sampled_from(HOST_OPTIONS),
        limit=st.integers(1, 40),
        step=st.integers(1, 50),
        per_read=st.integers(1, 4),
    )
    def check(path: Any, method: Any, status: Any, host: Any, limit: int, step: int, per_read: int) -> None:
        q = {"path": path, "method": method, "status": status, "host": host}
        want = _truth(events, **q)
        pages, after = [], None
        while True:
            page = _page(env, limit, after, step, per_read, **q)
            pages.append(page.rows)
            if page.next is None:
                break
            assert len(page.rows) == limit
            assert page.next == (int(clock.parse_time(page.rows[-1]["ts"]) * 1000), page.rows[-1]["id"])
            after = page.next
        got = [r for rows in pages for r in rows]
        assert _without_overflow(got) == want
        assert len(pages) == max(1, -(-len(want) // limit))

    check()


# --- path narrowing through the aggregates -----------------------------------------------


def test_path_walks_only_the_hours_its_aggregates_name(make_env: MakeEnv, db_url: str) -> None:
    """Rows of a path in an hour whose aggregates do not name it are not read: the walk is
    narrowed by `path_stats_hourly` (this test writes such a row by hand to see it)."""
    env, _ = _seed(make_env, db_url)
    ts = _hour_base() - 45 * HOUR_MS + 5  # before the seeded hours: no aggregates at all
    with env.DB.transaction() as conn:
        conn.execute(traffic_events.insert().values(
            ts=ts, id="planted", method="POST", path="/rare", overflow=0, status=404, response_time_ms=1.0,
            host="api.example.com",
        ))  # fmt: skip
    assert [r["id"] for r in _page(env, path="/rare").rows] == ["r0", "r1", "r2"]
    assert "planted" in [r["id"] for r in _page(env, method="POST", status="404").rows]
    with env.DB.transaction() as conn:  # its hour's aggregates name the path: now it is walked
        conn.execute(path_stats_hourly.insert().values(**_hourly_row(clock.hour_of_ms(ts), "/rare")))
    assert [r["id"] for r in _page(env, path="/rare").rows] == ["r0", "r1", "r2", "planted"]


def _hourly_row(hour: int, path: str) -> dict[str, Any]:
    row: dict[str, Any] = {c.name: 0 for c in path_stats_hourly.columns}
    return row | {"hour": hour, "host": "api.example.com", "path": path, "method": "POST", "requests": 1}


def test_path_after_the_hourly_rows_are_pruned_uses_the_daily_rows(make_env: MakeEnv, db_url: str) -> None:
    """Archived (not yet cleaned) rows of days whose hourly rows the rollup pruned: the
    path is narrowed through `path_stats_daily` for those days, `path_stats_hourly` after."""
    env = make_env(db_url, retention={"hourly_days": 5})
    t0 = clock.parse_time("2026-11-10T00:00:00Z") * 1000
    old = [{"id": f"o{i:03d}", "ts": int(t0 + i * 1_234_567), "method": "GET", "path": ("/x", "/y")[i % 2],
            "status": 200, "response_time_ms": 1.0} for i in range(150)]  # fmt: skip  # 2026-11-10 to 12
    new = [{"id": f"n{i:03d}", "ts": int(clock.parse_time("2026-11-17T10:00:00Z") * 1000 + i), "method": "GET",
            "path": "/x", "status": 500, "response_time_ms": 1.0} for i in range(5)]  # fmt: skip
    with freeze_time("2026-11-13T00:10:00Z"):
        assert consume(env, old)["inserted"] == len(old)
    with freeze_time("2026-11-17T02:00:00Z"):
        run_job(env, "archive", "2026-11-17T02:00:00Z")
    with freeze_time("2026-11-17T12:00:00Z"):
        assert consume(env, new)["inserted"] == len(new)
    with freeze_time("2026-11-18T00:20:00Z"):
        assert run_job(env, "rollup", "2026-11-18T00:15:00Z")["pruned_days"] == 3
    with env.DB.read() as conn:
        assert conn.execute(sa.select(sa.func.min(path_stats_hourly.c.hour))).scalar() >= t0 / 1000 + 7 * 86_400
    events = old + new
    for q in ({"path": "/x"}, {"path": "/y"}, {"path": "/x", "until": "2026-11-11T12:00:00Z"},
                  {"path": "/y", "since": "2026-11-11T05:00:00Z", "until": "2026-11-12"}):  # fmt: skip
        want = _truth(events, **q)
        assert want and _without_overflow(_page(env, step=9, per_read=2, **q).rows) == want, q


# --- query plans ---------------------------------------------------------------------------


@contextmanager
def _statements(env: Env) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and their parameters) the block runs on `env`'s database."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(env.DB.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(env.DB.engine, "before_cursor_execute", record)


def _plan(env: Env, statement: str, parameters: Any) -> list[str]:
    with env.DB.read() as conn:
        if env.DB.dialect == "sqlite":
            return [r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
        return [r[0] for r in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)]


def _ts_id_index(env: Env) -> str:
    """The index of the UNIQUE (ts, id) constraint: `uq_traffic_events_ts_id` on PostgreSQL;
    on SQLite the one it made for the constraint (`sqlite_autoindex_traffic_events_N`)."""
    if env.DB.dialect != "sqlite":
        return "uq_traffic_events_ts_id"
    with env.DB.read() as conn:
        for _, name, unique, origin, _ in conn.exec_driver_sql("PRAGMA index_list(traffic_events)"):
            cols = [r[2] for r in conn.exec_driver_sql(f"PRAGMA index_info('{name}')")]
            if unique and origin == "u" and cols == ["ts", "id"]:
                return str(name)
    raise AssertionError("no UNIQUE (ts, id) index on traffic_events")


def _problems(env: Env, plan: list[str], index: str) -> list[str]:
    """Why a plan of a statement on traffic_events is not a walk of the (ts, id) index."""
    text = "\n".join(plan)
    out = []
    if env.DB.dialect == "sqlite":
        if not re.search(rf"^SEARCH traffic_events USING (COVERING )?INDEX {index}\b", text, re.M):
            out.append("no SEARCH of the (ts, id) index")
        if re.search(r"^SCAN traffic_events\b", text, re.M):
            out.append("SCAN traffic_events")
        if "TEMP B-TREE" in text:
            out.append("a sort")
    else:
        if index not in text:
            out.append("the (ts, id) index unused")
        if "Seq Scan on traffic_events" in text:
            out.append("Seq Scan on traffic_events")
    return out


PLAN_CASES: list[dict[str, Any]] = [
    {},
    {"status": "5xx"},
    {"host": "nowhere.example"},  # matches nothing: the whole table walked, step by step
    {"method": "DELETE", "status": "404", "host": "shop.example.com"},
    {"path": "/b"},
    {"path": "/users/9/orders", "method": "GET", "status": "2xx", "host": "api.example.com"},
]


def test_plans_walk_the_ts_id_index_never_scan_the_table(make_env: MakeEnv, db_url: str) -> None:
    env, _ = _seed(make_env, db_url, _traffic(n=6000, hours=60, seed=3))
    with env.DB.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    index = _ts_id_index(env)
    window = {"since": detail.iso_ms(_hour_base() - 30 * HOUR_MS), "until": clock.iso(clock.now_s())}
    runs: list[tuple[dict[str, Any], list[tuple[str, Any]]]] = []
    paged = 0
    for q in [*PLAN_CASES, *(case | window for case in PLAN_CASES)]:
        with _statements(env) as seen:
            first = _page(env, 50, **q)
            if first.next is not None:
                _page(env, 50, first.next, **q)  # a second page, below the cursor
        runs.append((q, seen))
        paged += first.next is not None
    assert paged >= 8
    for q, seen in runs:
        on_events = [(s, _plan(env, s, p)) for s, p in seen if "FROM traffic_events" in s]
        assert on_events, q
        for statement, plan in on_events:
            assert _problems(env, plan, index) == [], (q, statement, plan)
        if env.DB.dialect == "sqlite":
            for s, p in seen:  # the hours of a path: a range of the aggregates' primary key
                if "FROM path_stats_hourly" in s:
                    assert re.search(
                        r"^SEARCH path_stats_hourly USING PRIMARY KEY \(hour>", "\n".join(_plan(env, s, p)), re.M
                    )
            continue
        texts = ["\n".join(plan) for _, plan in on_events]
        if set(q) <= {"since", "until"}:  # no filter: one statement a page, the index walked backwards
            assert len(texts) == 2 and all(f"Index Scan Backward using {index} on traffic_events" in t for t in texts)
        elif "path" not in q:  # filters: the first step's key found in the index alone
            assert " OFFSET " in on_events[0][0]
            assert f"Index Only Scan Backward using {index} on traffic_events" in texts[0], texts[0]


def test_the_plan_check_catches_a_scan(make_env: MakeEnv, db_url: str) -> None:
    """The plain statement this module avoids — filters and ORDER BY … LIMIT, no ts range —
    is flagged by the same check: the plan test can fail."""
    env, _ = _seed(make_env, db_url, _traffic(n=6000, hours=60, seed=3))
    with env.DB.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    te = traffic_events
    naive = (
        sa.select(*detail.COLUMNS)
        .where(te.c.host == "nowhere.example")
        .order_by(te.c.ts.desc(), te.c.id.desc())
        .limit(100)
    )
    sql = str(naive.compile(env.DB.engine, compile_kwargs={"literal_binds": True}))
    assert _problems(env, _plan(env, sql, ()), _ts_id_index(env))


# --- bad input -----------------------------------------------------------------------------

BAD_STATUS = ["6xx", "0xx", "abc", "99", "600", "5x", "4XXX", "40x", "", " ", "4.0e2", "²00"]


@pytest.mark.anyio
async def test_bad_input_is_refused_by_the_api_and_the_cli(make_env: MakeEnv, db_url: str) -> None:
    env, _ = _seed(make_env, db_url, _traffic(n=30, hours=3))
    hourly_cursor = encode_cursor([1_700_000_000, "h", "/p", "GET"])
    bad_api: list[tuple[dict[str, Any], str]] = [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-11-19", "until": "2026-11-18"}, "until"),
        ({"since": "1e400"}, "since"),
        *(({"status": s}, "status") for s in BAD_STATUS if s.strip()),
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": hourly_cursor}, "cursor"),
        ({"cursor": encode_cursor(["1700000000000", "e1"])}, "cursor"),
        ({"cursor": encode_cursor([-1, "e1"])}, "cursor"),
        ({"cursor": encode_cursor([1, "x" * 129])}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"path": "items"}, "path"),
        ({"method": "G ET"}, "method"),
        ({"path": "/a\x00"}, "path"),
        ({"host": "h" * 256}, "host"),
    ]
    async with client_for(create_app(env)) as c:
        for params, field in bad_api:
            r = await c.get("/v1/events", params=params)
            assert r.status_code == 400, (params, r.text)
            body = r.json()
            assert body["error"] == "validation_error" and body["detail"].startswith(f"{field}: "), (params, body)
        ok = await c.get("/v1/events", params={"limit": 1000, "status": "5XX", "method": "get"})
    assert ok.status_code == 200
    assert all(r["status"] >= 500 and r["method"] == "GET" for r in ok.json()["rows"])

    bad_cli: list[tuple[list[str], str]] = [
        (["--since", "yesterday"], "--since"),
        (["--until", "2026-13-01"], "--until"),
        (["--since", "2026-11-19", "--until", "2026-11-18"], "--until"),
        *((["--status", s], "--status") for s in BAD_STATUS),
        (["--cursor", "garbage"], "--cursor"),
        (["--cursor", hourly_cursor], "--cursor"),
        (["--cursor", encode_cursor([-1, "e1"])], "--cursor"),
        (["--path", "items"], "--path"),
        (["--method", "G ET"], "--method"),
        (["--host", "h" * 256], "--host"),
    ]
    for args, field in bad_cli:
        res = run_cli(env, "events", *args)
        assert res.exit_code == 3, (args, res.output)
        assert res.stderr.startswith(f"edgepipe: {field}: "), (args, res.stderr)
    for limit in ("0", "10001", "ten"):
        res = run_cli(env, "events", "--limit", limit)
        assert res.exit_code == 2 and "--limit" in res.stderr  # click's usage error, like every --limit
    assert run_cli(env, "events", "--limit", "10000", "--json").exit_code == 0


def test_parse_status() -> None:
    assert detail.parse_status("404") == (404, 404)
    assert detail.parse_status("5xx") == (500, 599) == detail.parse_status(" 5XX ")
    assert [detail.parse_status(f"{k}xx") for k in range(1, 6)] == [(k * 100, k * 100 + 99) for k in range(1, 6)]
    assert detail.parse_status("100") == (100, 100) and detail.parse_status("599") == (599, 599)
    for bad in BAD_STATUS:
        with pytest.raises(ValidationError, match=r"^status: "):
            detail.parse_status(bad)


# --- the CLI and the API agree -------------------------------------------------------------


@pytest.mark.anyio
async def test_cli_and_api_agree(make_env: MakeEnv, db_url: str) -> None:
    env, events = _seed(make_env, db_url)
    base = _hour_base()
    cases: list[dict[str, Any]] = [
        {},
        {"status": "404", "limit": 7},
        {"path": "/users/3/orders", "method": "post", "limit": 5},
        {"host": "API.example.com", "status": "5xx", "since": clock.iso((base - 24 * HOUR_MS) / 1000)},
        {"path": "/rare", "until": str(base // 1000), "limit": 1},
    ]
    async with client_for(create_app(env)) as c:
        for case in cases:
            api = (await c.get("/v1/events", params=case)).json()
            args = [a for k, v in case.items() for a in (f"--{k}", str(v))]
            res = run_cli(env, "events", *args, "--json")
            assert res.exit_code == 0, res.output
            cli = json.loads(res.stdout)
            assert cli == api and set(cli) == {"rows", "next"}, case
            filters = {k: v for k, v in case.items() if k != "limit"}
            assert _without_overflow(cli["rows"]) == _truth(events, **filters)[: case.get("limit", 100)]
            if api["next"] is not None:  # a cursor of either goes on in the other
                api2 = (await c.get("/v1/events", params=case | {"cursor": cli["next"]})).json()
                cli2 = json.loads(run_cli(env, "events", *args, "--cursor", api["next"], "--json").stdout)
                assert api2 == cli2 and api2["rows"] and api2["rows"][0]["id"] != api["rows"][0]["id"]
    assert api["next"] is not None  # the last case pages (the rare path has three rows)

    table = run_cli(env, "events", "--status", "404", "--limit", "3")
    assert table.exit_code == 0, table.output
    assert "events, 3 rows, newest first (UTC)" in table.stdout
    newest = _truth(events, status="404")[0]
    assert newest["method"] in table.stdout and newest["ts"][:10] in table.stdout  # (wrapped at 80 columns)
    assert re.search(r"more rows: --cursor \S+", table.stderr)
