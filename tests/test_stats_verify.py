"""hot + cold == total through six simulated days of ingest, consume, archive and clean;
the union of the bucket and the hot table is exactly the ingested set; `edgepipe stats`
and `edgepipe verify` through the CLI, including a failing verify."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner
from freezegun import freeze_time

from archiver import verify as replay_verify
from pipeline import clock, totals
from pipeline.cli import main
from pipeline.jobs import JOBS
from pipeline.schema import path_stats_hourly
from tests.archive_support import at, bucket_ids, consume, event, hot_ids

START = "2026-11-10T00:00:00Z"


def _day(rng: random.Random, day: int, n: int) -> list[dict[str, Any]]:
    base = int(clock.parse_time(START) * 1000) + day * 86_400_000
    return [
        event(day * 10_000 + i, base + rng.randrange(0, 86_400_000 - 3_600_000), path=f"/p{rng.randrange(6)}",
              status=rng.choice((200, 201, 304, 404, 500)))
        for i in range(n)
    ]  # fmt: skip


def test_six_days_end_to_end(make_env: Any, db_url: str) -> None:
    env = make_env(db_url, cleaner={"batch_size": 50})
    rng = random.Random(11)
    accepted: set[str] = set()
    too_late = 0
    for day in range(6):
        now = at(START) + timedelta(days=day, hours=23, minutes=30)
        with freeze_time(now):
            events = _day(rng, day, 150)
            dupes = rng.sample(events, 30)
            late = [event(90_000 + day, int((now - timedelta(days=4)).timestamp() * 1000))]
            report = consume(env, events + dupes + late)
            accepted |= {e["id"] for e in events}
            if day >= 1:  # older than the watermark once the archiver has run
                too_late += report["too_late"]
            else:
                accepted |= {e["id"] for e in late}
            assert report["inserted"] == 150 + (0 if day >= 1 else 1)
        for job, hour in (("archive", 2), ("clean", 3)):
            when = at(START) + timedelta(days=day + 1, hours=hour)
            with freeze_time(when):
                JOBS[job](env, when, False)
            assert totals.check_totals(totals.stats(env.DB)) == []
    assert too_late == 5
    in_bucket = Counter(bucket_ids(env))
    hot = Counter(hot_ids(env))
    assert max(in_bucket.values()) == 1 and max(hot.values()) == 1
    assert not set(in_bucket) & set(hot)
    assert set(in_bucket) | set(hot) == accepted
    s = totals.stats(env.DB)
    assert s["total"]["events"] == len(accepted) and s["cold"]["events"] == len(in_bucket)
    assert totals.verify(env.DB)["ok"]
    report = replay_verify.verify(
        env.DB, env.ARCHIVE, "events", clock.parse_time(START) - 5 * 86400, clock.parse_time(START) + 7 * 86400
    )
    assert report["ok"] and report["archived_rows"] + report["hot_rows"] == len(accepted)


def _cli(tmp_path: Path, env: Any, *args: str) -> Any:
    cfg = tmp_path / "edgepipe.toml"
    cfg.write_text(f'[bindings]\ndb = "{env.config.bindings.db}"\narchive = "{env.config.bindings.archive}"\n')
    return CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)


@freeze_time("2026-11-22T03:00:00Z")
def test_stats_and_verify_commands(make_env: Any, db_url: str, tmp_path: Path) -> None:
    env = make_env(db_url)
    base = int(clock.parse_time("2026-11-18T00:00:00Z") * 1000)
    consume(env, [event(i, base + i * 60_000, status=500 if i % 5 == 0 else 200) for i in range(100)])
    consume(env, [event(1000 + i, base + 4 * 86_400_000 + i) for i in range(10)])
    JOBS["archive"](env, at("2026-11-22T02:00:00Z"), False)
    JOBS["clean"](env, at("2026-11-22T03:00:00Z"), False)
    res = _cli(tmp_path, env, "stats", "--json")
    assert res.exit_code == 0
    s = json.loads(res.stdout)
    assert set(s) == {"hot", "cold", "total", "deployment_started_at", "rejected"}
    assert (s["hot"]["events"], s["cold"]["events"], s["total"]["events"]) == (10, 100, 110)
    assert s["cold"]["status_5xx"] == 20
    res = _cli(tmp_path, env, "verify")
    assert res.exit_code == 0 and res.stdout.strip().endswith("ok")
    with env.DB.transaction() as conn:  # an aggregate that no longer matches the rows
        conn.execute(sa.update(path_stats_hourly).values(requests=path_stats_hourly.c.requests + 1))
    res = _cli(tmp_path, env, "verify", "--json")
    assert res.exit_code == 6
    report = json.loads(res.stdout)
    assert not report["ok"] and report["problems"][0].startswith("events: hot 10 + cold 100 != total")
