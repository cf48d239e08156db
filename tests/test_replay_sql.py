"""`edgepipe replay sql`: SQL over the archive objects of a range (DuckDB, the analytics
extra). Objects are made by the real pipeline (consume, archive and clean with the clock
moved on), on a local directory and on S3 (moto in process and over HTTP); every answer is
checked against the hourly aggregates and against the events sent."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from archiver import replay, sql
from pipeline import clock
from pipeline.schema import OTHER_PATH, STATUS_COLUMNS, path_stats_hourly
from tests import archive_support
from tests.archive_support import consume, event, ms, run_job
from tests.conftest import run_cli

archive_url = archive_support.archive_url
archive_env = archive_support.archive_env


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: `replay sql` reads the archive objects alone, and the objects are the
    same whichever database the archive job read (tests/test_archiver.py runs both)."""
    return sqlite_url


NOW = "2026-11-22T02:00:00Z"
CUTOFF_MS = ms("2026-11-19T02:00:00Z")  # NOW − detail_days (3): older rows are archived, then cleaned
FULL = ("--from", "2026-11-17", "--to", "2026-11-23")
PATHS = ["/a", "/b", "/c", "/d", "/e"]
STATUSES = (200, 500, 404, 301, 503, 201, 102)


def _load(env: Any) -> list[dict[str, Any]]:
    """400 events, one every 10 minutes (plus a few ms each) from 2026-11-17T20:00; those
    before the cutoff end up in the bucket only (30 hourly objects), the others stay hot."""
    events = []
    for i in range(400):
        ts = ms("2026-11-17T20:00:00Z") + i * 600_000 + i * 37
        extra: dict[str, Any] = {"colo": "FRA"} if i % 3 == 0 else {}
        if i % 11 == 0:
            extra["bytes"] = None
        events.append(event(i, ts, path=PATHS[i % 5], status=STATUSES[i % 7], **extra))
    assert consume(env, events)["inserted"] == 400
    assert run_job(env, "archive", NOW)["rows"] == len(_archived(events))
    run_job(env, "clean", NOW)
    return events


def _archived(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["ts"] < CUTOFF_MS]


def _sql(env: Any, statement: str, *args: str) -> Any:
    return run_cli(env, "replay", "sql", statement, *args)


def _rows(env: Any, statement: str, *args: str) -> list[dict[str, Any]]:
    res = _sql(env, statement, *(args or FULL), "--json")
    assert res.exit_code == 0, res.stderr
    return list(json.loads(res.stdout)["rows"])


def _rfc3339(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}" + (f".{ts_ms % 1000:03d}" if ts_ms % 1000 else "") + "Z"


def _hourly(env: Any, *group: str) -> list[dict[str, Any]]:
    """The hourly aggregates of the archived hours, summed by `group`."""
    psh = path_stats_hourly
    sums = [sa.func.sum(psh.c[c]).label(c) for c in ("requests", *STATUS_COLUMNS, "bytes_sum")]
    keys = [psh.c[g] for g in group]
    stmt = sa.select(*keys, *sums).where(psh.c.hour < CUTOFF_MS // 1000).group_by(*keys).order_by(*keys)
    with env.DB.read() as conn:
        return [{k: v if isinstance(v, str) else int(v) for k, v in r.items()} for r in conn.execute(stmt).mappings()]


SUMS = """count(*) AS requests,
    count(*) FILTER (WHERE status // 100 = 1) AS status_1xx, count(*) FILTER (WHERE status // 100 = 2) AS status_2xx,
    count(*) FILTER (WHERE status // 100 = 3) AS status_3xx, count(*) FILTER (WHERE status // 100 = 4) AS status_4xx,
    count(*) FILTER (WHERE status // 100 = 5) AS status_5xx, coalesce(sum(bytes), 0) AS bytes_sum"""


@freeze_time(NOW)
def test_answers_equal_the_aggregates_and_the_events_sent(archive_env: Any) -> None:
    """Counts, per-path counts, per-hour status classes and bytes from `events` equal the
    same sums of `path_stats_hourly` and of the events sent, on every archive backend; the
    Hive columns and `ts` agree with each event's own time."""
    env = archive_env(paths={"max_paths_per_hour": 3})
    events = _load(env)
    archived = _archived(events)
    assert replay.objects_in(env.ARCHIVE, env.config.archive.prefix, *map(clock.parse_time, FULL[1::2]))

    total = _rows(env, "SELECT count(*) AS n, sum(bytes) AS b, count(DISTINCT id) AS ids FROM events")
    assert total == [{"n": len(archived), "b": sum(e["bytes"] or 0 for e in archived), "ids": len(archived)}]
    assert len(archived) == 180  # the cutoff falls where the loader says it does

    by_hour = _rows(
        env, f"SELECT epoch(date_trunc('hour', ts))::BIGINT AS hour, {SUMS} FROM events GROUP BY 1 ORDER BY 1"
    )
    assert by_hour == _hourly(env, "hour")
    truth: dict[int, Counter[str]] = defaultdict(Counter)
    for e in archived:
        truth[e["ts"] // 3_600_000 * 3600].update({"requests": 1, f"status_{e['status'] // 100}xx": 1,
                                                   "bytes_sum": e["bytes"] or 0})  # fmt: skip
    assert {r["hour"]: {k: v for k, v in r.items() if k != "hour" and v} for r in by_hour} == truth

    # The aggregates count a row with overflow = 1 under __other__; the raw path is kept.
    agg_path = _rows(env, f"SELECT CASE WHEN overflow = 1 THEN '{OTHER_PATH}' ELSE path END AS path, {SUMS} "
                          "FROM events GROUP BY 1 ORDER BY 1")  # fmt: skip
    assert agg_path == _hourly(env, "path") and any(r["path"] == OTHER_PATH for r in agg_path)
    raw_path = _rows(env, "SELECT path, count(*) AS n FROM events GROUP BY path ORDER BY path")
    assert {r["path"]: r["n"] for r in raw_path} == Counter(e["path"] for e in archived)

    rows = _rows(env, "SELECT id, ts, ts_ms, dt, hour, status, bytes, colo FROM events")
    sent = {e["id"]: e for e in archived}
    assert sorted(r["id"] for r in rows) == sorted(sent)
    for r in rows:
        e, when = sent[r["id"]], datetime.fromtimestamp(sent[r["id"]]["ts"] / 1000, UTC)
        assert r == {"id": e["id"], "ts": _rfc3339(e["ts"]), "ts_ms": e["ts"], "dt": f"{when:%Y-%m-%d}",
                     "hour": when.hour, "status": e["status"], "bytes": e["bytes"], "colo": e.get("colo")}  # fmt: skip


@freeze_time(NOW)
def test_only_the_objects_of_the_range_are_read_and_bad_ones_are_named_and_skipped(archive_env: Any) -> None:
    """A range reads the objects of its hours only (a corrupt object outside it goes
    unnoticed) and keeps exactly the rows with from <= ts < to, cutting hours; over a range
    holding a corrupt object, the query runs over the others and the command exits 6
    naming it, as every replay command does."""
    env = archive_env()
    archived = _archived(_load(env))
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    listing = replay.objects_in(store, prefix, *map(clock.parse_time, FULL[1::2]))
    by_hour = {hour: key for key, hour, _size in listing}
    corrupt = [by_hour[ms(t) // 1000] for t in ("2026-11-17T21:00:00Z", "2026-11-18T10:00:00Z")]
    for key in corrupt:
        body = bytearray(store.get_bytes(key))
        body[len(body) // 2] ^= 0xFF
        store.put_bytes(key, bytes(body), store.head(key).metadata)

    # From an event's own ts (included) to another's (excluded), in the middle of hours 05 and 07.
    first, last = (
        next(e for e in archived if e["ts"] >= ms(t)) for t in ("2026-11-18T05:30:00Z", "2026-11-18T07:20:00Z")
    )
    lo, hi = _rfc3339(first["ts"]), _rfc3339(last["ts"])
    res = _sql(env, "SELECT id FROM events ORDER BY ts", "--from", lo, "--to", hi, "--json")
    assert res.exit_code == 0, res.stderr
    assert "skipped" not in res.stderr and "events: 11 rows from 3 objects" in res.stderr
    want = [e["id"] for e in archived if first["ts"] <= e["ts"] < last["ts"]]
    assert [r["id"] for r in json.loads(res.stdout)["rows"]] == want and len(want) == 11
    assert want[0] == first["id"] and last["id"] not in want and ms(lo) % 1000 != 0

    res = _sql(env, "SELECT count(*) AS n, min(dt) AS d0 FROM events", *FULL, "--json")
    assert res.exit_code == 6
    lost = sum(1 for e in archived if e["ts"] // 3_600_000 * 3600 in {key_hour for key_hour, k in by_hour.items()
                                                                       if k in corrupt})  # fmt: skip
    assert json.loads(res.stdout)["rows"] == [{"n": len(archived) - lost, "d0": "2026-11-17"}] and lost == 12
    for key in corrupt:
        assert f"edgepipe: skipped {key}: " in res.stderr
    assert f"events: {len(archived) - lost} rows from {len(listing) - 2} objects" in res.stderr


@freeze_time(NOW)
def test_json_csv_and_table_output(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    archived = _archived(_load(env))
    statement = "SELECT id, ts, ts_ms, dt, hour, colo, bytes, response_time_ms FROM events ORDER BY ts_ms LIMIT 4"
    res = _sql(env, statement, *FULL, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    columns = ["id", "ts", "ts_ms", "dt", "hour", "colo", "bytes", "response_time_ms"]
    assert doc == {"columns": columns, "rows": [
        {"id": e["id"], "ts": _rfc3339(e["ts"]), "ts_ms": e["ts"], "dt": "2026-11-17", "hour": 20,
         "colo": e.get("colo"), "bytes": e["bytes"], "response_time_ms": e["response_time_ms"]}
        for e in archived[:4]
    ]}  # fmt: skip
    assert doc["rows"][1]["ts"] == "2026-11-17T20:10:00.037Z" and doc["rows"][0]["bytes"] is None

    res = _sql(env, statement, *FULL, "--csv")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[0] == ",".join(columns)
    parsed = list(csv.DictReader(io.StringIO(res.stdout)))
    assert parsed == [{c: "" if v is None else str(v) for c, v in row.items()} for row in doc["rows"]]

    res = _sql(env, "SELECT path, count(*) AS requests FROM events GROUP BY path ORDER BY path", *FULL)
    assert res.exit_code == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "/" in line and "│" in line]
    counts = Counter(e["path"] for e in archived)
    assert [re.findall(r"(/\w)\s*│\s*(\d+)", line)[0] for line in lines] == [(p, str(counts[p])) for p in PATHS]

    res = _sql(env, "SELECT 1 AS n", *FULL, "--json", "--csv")
    assert res.exit_code == 3 and "--csv: cannot be combined with --json" in res.stderr and res.stdout == ""
    res = _sql(env, "SELECT 1 AS n, 2 AS n", *FULL, "--json")
    assert res.exit_code == 3 and "two columns named 'n'" in res.stderr and res.stdout == ""
    res = _sql(env, "SELECT 1 AS n, 2 AS n", *FULL, "--csv")
    assert res.exit_code == 0 and res.stdout == "n,n\n1,2\n"


@freeze_time(NOW)
def test_an_empty_range_gives_an_empty_table_of_the_documented_schema(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _load(env)
    empty = ("--from", "2026-11-21", "--to", "2026-11-22")  # hot rows only: no object
    assert _rows(env, "SELECT count(*) AS n, sum(bytes) AS b FROM events", *empty) == [{"n": 0, "b": None}]
    for rng in (empty, FULL):
        described = _rows(env, "DESCRIBE events", *rng)
        assert [(r["column_name"], r["column_type"]) for r in described] == [(n, t) for n, t, _m in sql.COLUMNS]
    res = _sql(env, "SELECT * FROM events", *empty, "--csv")
    assert res.exit_code == 0 and res.stdout == ",".join(n for n, _t, _m in sql.COLUMNS) + "\n"
    res = _sql(env, "SELECT * FROM events", *empty, "--json")
    assert json.loads(res.stdout) == {"columns": [n for n, _t, _m in sql.COLUMNS], "rows": []}

    help_text = run_cli(env, "replay", "sql", "--help").stdout
    for name, sql_type, _meaning in sql.COLUMNS:
        assert re.search(rf"^\s+{name}\s+{sql_type}\s", help_text, re.M), name


@freeze_time(NOW)
def test_values_become_json_and_csv_as_documented(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    statement = (
        "SELECT 1.50::DECIMAL(5,2) AS d, 2.00::DECIMAL(5,2) AS i, TIMESTAMPTZ '2026-11-18 05:00:00+02' AS tz, "
        "TIMESTAMP '2026-11-18 05:00:00.000123' AS us, DATE '2026-11-18' AS day, INTERVAL 90 MINUTE AS iv, "
        "[1, 2] AS l, {'k': 'v'} AS s, NULL AS n, true AS b, 'x,\"y\"' AS t"
    )
    assert _rows(env, statement) == [{
        "d": 1.5, "i": 2, "tz": "2026-11-18T03:00:00Z", "us": "2026-11-18T05:00:00.000123Z", "day": "2026-11-18",
        "iv": 5400.0, "l": [1, 2], "s": {"k": "v"}, "n": None, "b": True, "t": 'x,"y"',
    }]  # fmt: skip
    res = _sql(env, statement, *FULL, "--csv")
    assert list(csv.reader(io.StringIO(res.stdout)))[1] == [
        "1.5", "2", "2026-11-18T03:00:00Z", "2026-11-18T05:00:00.000123Z", "2026-11-18", "5400.0", "[1,2]",
        '{"k":"v"}', "", "true", 'x,"y"',
    ]  # fmt: skip


@freeze_time(NOW)
def test_sql_errors_exit_3_with_one_line_naming_the_problem(make_env: Any, db_url: str) -> None:
    env = make_env(db_url)
    _load(env)
    for statement, words in [
        ("SELEC count(*) FROM events", ['Parser Error: syntax error at or near "SELEC"']),
        ("SELECT nope FROM events", ["Binder Error", '"nope"']),
        ("SELECT * FROM no_such_table", ["Catalog Error", "no_such_table"]),
        ("SELECT 'x'::INTEGER + count(*) FROM events", ["Conversion Error", "'x'"]),
        ("   ", ["no statement given"]),
    ]:
        res = _sql(env, statement, *FULL, "--json")
        assert res.exit_code == 3, (statement, res.stderr)
        errors = [line for line in res.stderr.splitlines() if not line.startswith("events: ")]
        assert len(errors) == 1 and errors[0].startswith("edgepipe: SQL: "), res.stderr
        assert all(w in errors[0] for w in words), errors[0]
        assert res.stdout == ""


def test_without_the_extra_the_command_says_so_and_exits_2(
    make_env: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(sqlite_url)
    monkeypatch.setitem(sys.modules, "duckdb", None)  # `import duckdb` now raises ImportError
    res = _sql(env, "SELECT count(*) FROM events", "--json")
    assert res.exit_code == 2
    assert res.stderr == "edgepipe: replay sql needs the analytics extra: pip install 'edgepipe[analytics]'\n"
    assert res.stdout == ""
    res = run_cli(env, "replay", "list", "--json")  # the other replay commands do not need it
    assert res.exit_code == 0 and json.loads(res.stdout) == []


@freeze_time(NOW)
def test_load_in_many_staging_rounds_keeps_every_row_and_leaves_no_file(
    make_env: Any, db_url: str, tmp_path: Path
) -> None:
    """`sql.load` reading the staged NDJSON into `events` every few objects (here after each
    one) gives the table one round gives, and clears its staging directory each round."""
    env = make_env(db_url)
    archived = _archived(_load(env))
    store, prefix = env.ARCHIVE, env.config.archive.prefix
    lo, hi = map(clock.parse_time, FULL[1::2])
    tables = []
    for stage_bytes in (1, sql.STAGE_BYTES):
        bad: list[dict[str, str]] = []
        work = tmp_path / f"work-{stage_bytes}"
        work.mkdir()
        con = duckdb.connect(":memory:")
        found = replay.iter_objects(store, prefix, lo, hi, bad, sql.ROW_DECODER)
        assert sql.load(con, found, int(lo * 1000), int(hi * 1000), work, stage_bytes) == (30, len(archived))
        assert bad == [] and list(work.iterdir()) == []
        tables.append(con.execute("SELECT * FROM events ORDER BY seq").fetchall())
        con.close()
    assert tables[0] == tables[1] and len(tables[0]) == len(archived)
