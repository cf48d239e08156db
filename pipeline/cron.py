"""Crontab expressions with their documented meaning, as APScheduler 3 triggers.

APScheduler 3's `CronTrigger.from_crontab` numbers the days of the week from Monday = 0,
so `0 5 * * 0` would fire on Mondays. Here the day-of-week field is parsed as crontab(5)
documents it — 0 and 7 are Sunday, 1 is Monday, names `sun`…`sat`, ranges, lists and
steps — and handed to APScheduler as explicit day names, which mean the same in both.

When both day-of-month and day-of-week are restricted, cron fires on either while
APScheduler requires both; such entries are refused rather than silently changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from pipeline.errors import ValidationError

DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _day(token: str, field: str) -> int:
    """A day-of-week token as a crontab number 0..7 (both 0 and 7 are Sunday)."""
    low = token.lower()
    if low in DAY_NAMES:
        return DAY_NAMES.index(low)
    if low.isdigit() and 0 <= int(low) <= 7:
        return int(low)
    raise ValidationError(field, f"bad day of week {token!r} (use 0-7 or sun..sat)")


def days_of_week(expr: str, field: str = "day_of_week") -> list[int]:
    """The set of days (0 = Sunday .. 6) a crontab day-of-week field selects, sorted."""
    days: set[int] = set()
    for item in expr.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValidationError(field, f"bad step in {item!r}")
            step = int(step_text)
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            a, _, b = base.partition("-")
            lo, hi = _day(a, field), _day(b, field)
            if hi < lo:
                raise ValidationError(field, f"range {base!r} runs backwards")
        else:
            lo = _day(base, field)
            hi = 6 if slash else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return sorted(days)


@dataclass(frozen=True)
class CronSpec:
    """One entry of the cron table: a job name, its expression and the trigger."""

    name: str
    expr: str
    timezone: str
    trigger: CronTrigger

    def _fires_from(self, start: datetime) -> Iterator[datetime]:
        """Fire times at or after `start`, in order. A wall-clock time that a fall-back
        DST change repeats fires once (its first occurrence), as cron does. The cursor
        moves in UTC (aware arithmetic in a zone is wall-clock and would stall there), and
        is pushed further whenever the trigger answers a time that is not later."""
        last: datetime | None = None
        step = timedelta(seconds=1)
        fire = self.trigger.get_next_fire_time(None, start)
        while fire is not None:
            utc = fire.astimezone(UTC)
            if last is not None and utc <= last:
                step *= 60
                after = last + step
            else:
                if not _repeated(fire):
                    yield fire
                last, step = utc, timedelta(seconds=1)
                after = utc + step
            fire = self.trigger.get_next_fire_time(None, after)

    def next_fire(self, after: datetime) -> datetime | None:
        """The first fire time strictly after `after`."""
        return next(self._fires_from(after.astimezone(UTC) + timedelta(microseconds=1)), None)

    def latest_fire(self, now: datetime, lookback: timedelta) -> datetime | None:
        """The last fire time in `[now - lookback, now]`, or None."""
        latest = None
        for fire in self._fires_from(now - lookback):
            if fire > now:
                break
            latest = fire
        return latest


def _repeated(fire: datetime) -> bool:
    """True for the second occurrence of a wall-clock time repeated by a DST change."""
    wall = fire.replace(tzinfo=None)
    first = wall.replace(tzinfo=fire.tzinfo, fold=0)
    second = wall.replace(tzinfo=fire.tzinfo, fold=1)
    return first.utcoffset() != second.utcoffset() and fire.utcoffset() == second.utcoffset()


def zone(name: str, field: str = "schedule.timezone") -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(field, f"unknown time zone {name!r}") from None


def parse(name: str, expr: str, timezone: str = "UTC") -> CronSpec:
    """Parse a 5-field crontab expression (or an @alias) for job `name`."""
    field = f"schedule.jobs.{name}"
    text = ALIASES.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise ValidationError(field, f"{expr!r} must have 5 fields: minute hour day month day-of-week")
    minute, hour, dom, month, dow = parts
    if dom != "*" and dow != "*":
        raise ValidationError(field, f"{expr!r} restricts both day of month and day of week; use one")
    days = days_of_week(dow, field)
    try:
        trigger = CronTrigger(
            minute=minute,
            hour=hour,
            day=dom,
            month=month,
            day_of_week="*" if len(days) == 7 else ",".join(DAY_NAMES[d] for d in days),
            timezone=zone(timezone),
        )
    except ValueError as exc:
        raise ValidationError(field, f"{expr!r}: {exc}") from None
    return CronSpec(name, expr, timezone, trigger)


DISABLED = ("", "off")


def parse_table(jobs: dict[str, str], timezone: str) -> list[CronSpec]:
    """The cron table; an entry set to `"off"` (or empty) is disabled."""
    return [parse(name, expr, timezone) for name, expr in sorted(jobs.items()) if expr.strip().lower() not in DISABLED]
