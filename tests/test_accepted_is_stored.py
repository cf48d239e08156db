"""Property: any event the validator accepts is stored by every backend. The validator is the
only gate before the database, so a value it lets through that SQLite or PostgreSQL refuses
(an integer past 64 bits, NUL in text, a sum that overflows) would fail a whole batch."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.traffic import TrafficConsumer
from pipeline.env import Env
from pipeline.errors import ValidationError
from pipeline.events import MAX_BYTES, parse_event
from pipeline.paths import PathNormalizer
from pipeline.worker import Worker
from tests.conftest import MakeEnv
from tests.faults import NOW, NOW_MS

ODD = st.sampled_from(["\U0010ffff", "\u2028", "\x7f", "\x01", "'", '"', "\\", "é", "𝄞", " ", "%00", "\ufeff"])
STORABLE = st.text(st.characters(exclude_characters="\x00"), max_size=8)  # no NUL; text() has no lone surrogate
SAFE = st.lists(st.one_of(STORABLE, ODD), max_size=6).map("".join)
TEXT = st.lists(st.one_of(SAFE, st.sampled_from(["\x00", "\ud800", "\udfff"])), max_size=4).map("".join)
INTS = st.one_of(
    st.integers(-10, 10),
    st.sampled_from([MAX_BYTES, MAX_BYTES + 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64]),
    st.integers(0, 2**70),
)
NUMBERS = st.one_of(INTS, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([86_400_000, 1.7e308]))


def mostly(valid: st.SearchStrategy[Any], edgy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four, so that many examples reach the database."""
    return st.one_of(valid, valid, valid, edgy)


def events() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "id": mostly(SAFE.map(lambda t: ("k" + t)[:128]), TEXT),
            "method": mostly(st.sampled_from(["GET", "post", "PATCH", "Purge"]), TEXT),
            "path": mostly(SAFE.map(lambda t: "/" + t), TEXT.map(lambda t: "/" + t)),
            "status": mostly(st.integers(100, 599), INTS),
            "response_time_ms": mostly(st.floats(0, 86_400_000), NUMBERS),
        },
        optional={
            "host": mostly(SAFE, st.one_of(TEXT, INTS)),
            "colo": mostly(SAFE.map(lambda t: t[:16]), TEXT),
            "bytes": mostly(st.integers(0, MAX_BYTES), st.one_of(INTS, st.none())),
        },
    )


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_every_accepted_event_is_stored(db_url: str, make_env: MakeEnv) -> None:
    env = make_env(db_url, consumer={"max_batch_size": 1}, paths={"max_paths_per_hour": 1_000_000})
    worker = Worker(env, TrafficConsumer(env.config).handle_batch)
    normalizer = PathNormalizer(env.config.paths)
    serial = itertools.count()
    stored: list[dict[str, Any]] = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(event=events())
    def check(event: dict[str, Any]) -> None:
        event["ts"] = NOW_MS - next(serial)  # a key of its own: never a duplicate
        try:
            parse_event(event, normalizer, NOW_MS)
        except ValidationError:
            return
        _store_one(env, worker, event)
        stored.append(event)

    with freeze_time(NOW):
        check()
    assert len(stored) >= 20, len(stored)  # the property was exercised, not only the refusals


def _store_one(env: Env, worker: Worker, event: dict[str, Any]) -> None:
    env.QUEUE.send(event)
    result = worker.step(wait=0)
    assert result is not None and result.ok, (event, result)
    assert result.report.inserted == 1, (event, result.report)
    assert env.QUEUE.stats()["dlq"] == 0, (event, env.QUEUE.dlq_list())
