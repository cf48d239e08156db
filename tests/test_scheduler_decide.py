"""The scheduler's decision step through simulated time: cron meaning (Sunday!), a full
week with frozen time, time zones, missed-run catch-up, retries with backoff."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from pipeline import clock, cron
from pipeline.config import Config
from pipeline.errors import ConfigError, ValidationError
from scheduler.decide import ABANDONED, FAILED, RUNNING, SUCCEEDED, Policy, RunRecord, decide

DEFAULT_TABLE = Config().schedule.jobs
POLICY = Policy(misfire_grace=3600, max_attempts=3, retry_backoff=60, lease_seconds=300)


def _fires(expr: str, start: datetime, days: int = 7, tz: str = "UTC") -> list[datetime]:
    spec = cron.parse("j", expr, tz)
    out, t = [], start - timedelta(microseconds=1)
    while (t := spec.next_fire(t)) is not None and t < start + timedelta(days=days):
        out.append(t)
    return out


MONDAY = datetime(2026, 11, 16, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN", "Sun", "0,7", "7-7"])
def test_sunday_is_sunday(dow: str) -> None:
    fires = _fires(f"0 5 * * {dow}", MONDAY, days=14)
    assert [f.isoformat() for f in fires] == ["2026-11-22T05:00:00+00:00", "2026-11-29T05:00:00+00:00"]
    assert all(f.strftime("%A") == "Sunday" for f in fires)


@pytest.mark.parametrize(
    ("dow", "days"),
    [
        ("1-5", ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
        ("mon-fri", ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
        ("*/2", ["Tuesday", "Thursday", "Saturday", "Sunday"]),  # cron: 0,2,4,6
        ("0-2", ["Monday", "Tuesday", "Sunday"]),
        ("5-7", ["Friday", "Saturday", "Sunday"]),
        ("6", ["Saturday"]),
        ("1", ["Monday"]),
    ],
)
def test_day_of_week_has_crontab_meaning(dow: str, days: list[str]) -> None:
    fires = _fires(f"30 1 * * {dow}", MONDAY)
    assert [f.strftime("%A") for f in fires] == days


@pytest.mark.parametrize(
    "expr",
    ["0 2 * *", "0 2 * * 8", "0 2 * * mon-sun-x", "0 2 * * 5-1", "61 2 * * *", "0 2 1 * 1", "0 2 * * */0", "x"],
)
def test_bad_expressions_are_refused_naming_the_job(expr: str) -> None:
    with pytest.raises(ValidationError) as info:
        cron.parse("archive", expr)
    assert info.value.field == "schedule.jobs.archive"
    with pytest.raises(ConfigError, match=r"schedule\.jobs\.archive"):
        Config().replace(schedule={"jobs": {"archive": expr}})


def test_aliases_and_unknown_timezone() -> None:
    assert [f.hour for f in _fires("@daily", MONDAY, days=2)] == [0, 0]
    with pytest.raises(ConfigError, match=r"schedule\.timezone"):
        Config().replace(schedule={"timezone": "Mars/Olympus"})


def _simulate_week(tz: str, start: datetime, step_s: int = 300) -> list[tuple[str, datetime]]:
    """Drive the decision step every `step_s` through 7 days with frozen time; every due
    run succeeds at once. Returns (job, slot) for each run started."""
    specs = cron.parse_table(DEFAULT_TABLE, tz)
    runs: dict[str, list[RunRecord]] = {}
    started: list[tuple[str, datetime]] = []
    with freeze_time(start) as frozen:
        while clock.now() < start + timedelta(days=7):
            now = clock.now()
            for due in decide(now, specs, runs, POLICY):
                started.append((due.job, due.scheduled_for))
                rec = RunRecord(due.job, due.slot, due.attempt, SUCCEEDED, now.timestamp(), now.timestamp())
                runs.setdefault(due.job, []).append(rec)
            frozen.tick(step_s)
    return started


def test_simulated_week_each_job_once_at_its_hour_utc() -> None:
    started = _simulate_week("UTC", MONDAY)
    counts = Counter(job for job, _ in started)
    assert counts == {
        "rollup": 7,
        "archive": 7,
        "clean": 7,
        "monitor": 7,
        "snapshot_prune": 1,
        "expire": 7,
        "backup": 7,
    }
    assert len(set(started)) == len(started)
    times = {"rollup": (0, 15), "backup": (1, 0), "archive": (2, 0), "clean": (3, 0), "monitor": (4, 0),
             "snapshot_prune": (5, 0), "expire": (6, 0)}  # fmt: skip
    for job, slot in started:
        assert (slot.hour, slot.minute) == times[job], (job, slot)
    (prune,) = [slot for job, slot in started if job == "snapshot_prune"]
    assert prune.astimezone(UTC).strftime("%A %H:%M") == "Sunday 05:00"
    days = sorted(slot.date() for job, slot in started if job == "archive")
    assert days == [(MONDAY + timedelta(days=d)).date() for d in range(7)]


def test_simulated_week_in_another_timezone() -> None:
    # New York in November is UTC-5: 02:00 local is 07:00 UTC; Sunday 05:00 local is 10:00 UTC.
    started = _simulate_week("America/New_York", MONDAY)
    counts = Counter(job for job, _ in started)
    assert counts == {
        "rollup": 7,
        "archive": 7,
        "clean": 7,
        "monitor": 7,
        "snapshot_prune": 1,
        "expire": 7,
        "backup": 7,
    }
    utc_hours = {"rollup": 5, "backup": 6, "archive": 7, "clean": 8, "monitor": 9, "snapshot_prune": 10, "expire": 11}
    for job, slot in started:
        assert slot.astimezone(UTC).hour == utc_hours[job], (job, slot)
    (prune,) = [slot for job, slot in started if job == "snapshot_prune"]
    assert prune.strftime("%A %H:%M") == "Sunday 05:00"
    assert prune.astimezone(UTC).isoformat() == "2026-11-22T10:00:00+00:00"


def test_week_across_a_dst_change_fires_at_local_hours() -> None:
    # Europe/Berlin leaves summer time on Sunday 2026-10-25 at 03:00 local.
    start = datetime(2026, 10, 19, tzinfo=UTC)
    started = _simulate_week("Europe/Berlin", start)
    assert Counter(job for job, _ in started) == {
        "rollup": 7, "archive": 7, "clean": 7, "monitor": 7, "snapshot_prune": 1, "expire": 7, "backup": 7,
    }  # fmt: skip
    assert {slot.hour for job, slot in started if job == "archive"} == {2}


def test_missed_slots_coalesce_into_one_catch_up_within_grace() -> None:
    specs = cron.parse_table({"archive": "0 2 * * *", "tick": "*/10 * * * *"}, "UTC")
    now = datetime(2026, 11, 18, 2, 40, tzinfo=UTC)  # down since 01:00: four ticks and archive missed
    due = {d.job: d for d in decide(now, specs, {}, POLICY)}
    assert due["archive"].scheduled_for == datetime(2026, 11, 18, 2, 0, tzinfo=UTC)
    assert due["archive"].reason == "catch_up" and due["archive"].attempt == 1
    assert due["tick"].scheduled_for == datetime(2026, 11, 18, 2, 40, tzinfo=UTC)  # only the latest slot
    late = datetime(2026, 11, 18, 3, 1, tzinfo=UTC)  # beyond the one-hour grace: skipped
    assert [d.job for d in decide(late, specs, {}, POLICY)] == ["tick"]


def test_failure_is_retried_with_backoff_up_to_max_attempts() -> None:
    specs = cron.parse_table({"archive": "0 2 * * *"}, "UTC")
    slot = datetime(2026, 11, 18, 2, 0, tzinfo=UTC).timestamp()
    t = slot + 5
    runs = {"archive": [RunRecord("archive", slot, 1, FAILED, slot, t)]}
    at = lambda s: datetime.fromtimestamp(s, UTC)  # noqa: E731
    assert decide(at(t + 59), specs, runs, POLICY) == []
    (due,) = decide(at(t + 60), specs, runs, POLICY)
    assert (due.attempt, due.reason) == (2, "retry")
    runs["archive"].append(RunRecord("archive", slot, 2, FAILED, t + 60, t + 61))
    assert decide(at(t + 61 + 119), specs, runs, POLICY) == []  # backoff doubles
    (due,) = decide(at(t + 61 + 120), specs, runs, POLICY)
    assert due.attempt == 3
    runs["archive"].append(RunRecord("archive", slot, 3, FAILED, t + 200, t + 201))
    assert decide(at(t + 5000), specs, runs, POLICY) == []  # max_attempts reached


def test_running_attempt_waits_for_its_lease_then_is_retried() -> None:
    specs = cron.parse_table({"clean": "0 3 * * *"}, "UTC")
    slot = datetime(2026, 11, 18, 3, 0, tzinfo=UTC)
    runs = {"clean": [RunRecord("clean", slot.timestamp(), 1, RUNNING, slot.timestamp())]}
    later = slot + timedelta(minutes=20)
    assert decide(later, specs, runs, POLICY, leased={"clean"}) == []
    (due,) = decide(later, specs, runs, POLICY, leased=set())
    assert due.attempt == 2
    runs["clean"][0] = RunRecord("clean", slot.timestamp(), 1, ABANDONED, slot.timestamp(), later.timestamp())
    assert decide(later, specs, runs, POLICY) == []  # marked abandoned now: backoff as for a failure
    (due,) = decide(later + timedelta(seconds=60), specs, runs, POLICY)
    assert due.attempt == 2


def test_a_wall_time_repeated_by_dst_fires_once() -> None:
    # 2026-10-25 02:30 happens twice in Berlin (CEST, then CET).
    fires = _fires("30 2 * * *", datetime(2026, 10, 24, tzinfo=UTC), days=3, tz="Europe/Berlin")
    assert [f.astimezone(UTC).isoformat() for f in fires] == [
        "2026-10-24T00:30:00+00:00",
        "2026-10-25T00:30:00+00:00",
        "2026-10-26T01:30:00+00:00",
    ]
