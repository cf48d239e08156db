"""What the SQS queue backend does beyond the queue contract (tests/test_queue.py runs that
on it too): how it uses SQS's batch calls and limits, the bodies SQS cannot carry as text,
leases held by SQS, its two queues, its dead letters and their lasting counts in the DB.
Against moto's threaded server, in this process (a frozen clock freezes its timers too)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import boto3
import msgspec
import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from pipeline.bindings.queue import REASON_INVALID, REASON_RETRIES, REASON_TOO_LATE, MessageBatch, QueueSettings
from pipeline.bindings.queue_sqs import MAX_BATCH_BYTES, SqsQueue
from pipeline.env import Env
from pipeline.errors import BindingError, ConfigError, TransientError
from pipeline.schema import counters
from tests.conftest import AWS_REGION, MakeEnv

LEASE_S = 2  # a real lease: moto keeps it by the (unfrozen) clock
LEASE_WAIT_S = 30  # the most a receive waits for an expired lease's messages (it returns when they come)


@pytest.fixture
def sqs(moto_server: str, aws_credentials: None) -> Iterator[Any]:
    """A plain boto3 client on the moto server, to look at the queues from outside."""
    client = boto3.client("sqs", region_name=AWS_REGION, endpoint_url=moto_server)
    yield client
    client.close()


@pytest.fixture
def queue_name(sqs: Any) -> Iterator[str]:
    name = f"edgepipe-sqs-{secrets.token_hex(4)}"
    yield name
    for q in (name, f"{name}-dlq"):
        with contextlib.suppress(sqs.exceptions.QueueDoesNotExist):
            sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=q)["QueueUrl"])


@pytest.fixture
def make_sqs_env(make_env: MakeEnv, sqlite_url: str, moto_server: str, queue_name: str) -> MakeEnv:
    """`make_sqs_env(consumer={...})`: an Env whose queue is `queue_name` on moto, created."""

    def make(**sections: dict[str, Any]) -> Env:
        url = f"sqs://{queue_name}?region={AWS_REGION}&endpoint_url={moto_server}"
        env = make_env(sqlite_url, bindings={"queue": url}, **sections)
        env.QUEUE.ensure()
        return env

    return make


@pytest.fixture
def env(make_sqs_env: MakeEnv) -> Env:
    return make_sqs_env()


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time("2026-11-20T12:00:00Z") as f:
        yield f


def calls(env: Env, operation: str) -> list[dict[str, Any]]:
    """The parameters of every `operation` call this env's queue makes from now on."""
    seen: list[dict[str, Any]] = []
    env.QUEUE.client.meta.events.register(  # type: ignore[attr-defined]
        f"before-parameter-build.sqs.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


def raw_messages(sqs: Any, queue: str) -> list[dict[str, Any]]:
    """The messages of `queue` as SQS stores them (received, then made visible again)."""
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=5, MessageAttributeNames=["All"])
    messages = got.get("Messages", [])
    for m in messages:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0)
    return messages


def request_bytes(params: dict[str, Any]) -> int:
    """A SendMessageBatch request's size as SQS counts it: bodies, attribute names, types, values."""
    size = 0
    for entry in params["Entries"]:
        size += len(entry["MessageBody"].encode())
        size += sum(
            len(k) + len(a["DataType"]) + len(a["StringValue"].encode()) for k, a in entry["MessageAttributes"].items()
        )
    return size


def stats(env: Env) -> dict[str, int]:
    s = env.QUEUE.stats()
    return {k: s[k] for k in ("pending", "in_flight", "dlq")}


# -- batch calls and limits ----------------------------------------------------------


def test_a_batch_is_assembled_from_pages_of_ten(env: Env) -> None:
    ids = env.QUEUE.send_batch([{"n": i} for i in range(25)])
    receives = calls(env, "ReceiveMessage")
    batch = env.QUEUE.receive(25, 0)
    assert [m.id for m in batch] == ids
    assert [p["MaxNumberOfMessages"] for p in receives] == [10, 10, 5]  # full: no fourth call
    assert {(p["WaitTimeSeconds"], p["VisibilityTimeout"]) for p in receives} == {(0, 30)}
    receives.clear()
    env.QUEUE.send_batch(list(range(3)))
    assert len(env.QUEUE.receive(100, 0)) == 3
    assert [p["MaxNumberOfMessages"] for p in receives] == [10, 10]  # the second page is empty: done


def test_sends_are_split_at_ten_entries_and_256_kib(env: Env) -> None:
    sends = calls(env, "SendMessageBatch")
    env.QUEUE.send_batch(list(range(25)))
    assert [len(p["Entries"]) for p in sends] == [10, 10, 5]
    sends.clear()
    big = ["a" * 100_000, "b" * 100_000, "c" * 100_000, "d" * 10]
    ids = env.QUEUE.send_batch(big)
    assert [len(p["Entries"]) for p in sends] == [2, 2]  # a third 100 kB body would pass 256 KiB
    assert all(request_bytes(p) <= MAX_BATCH_BYTES for p in sends)
    got = env.QUEUE.receive(100, 0)
    assert [m.id for m in got][-4:] == ids and [m.body for m in got][-4:] == big


def test_failed_entries_are_sent_again_with_their_ids(env: Env, sqs: Any) -> None:
    """SendMessageBatch reports an entry failed (the server's fault): it is sent again, once."""
    queue = env.QUEUE
    assert isinstance(queue, SqsQueue)
    real = queue.client

    class Flaky:
        def __init__(self, fail: int, sender_fault: bool) -> None:
            self.fail, self.sender_fault = fail, sender_fault

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
            if self.fail <= 0:
                return real.send_message_batch(QueueUrl=QueueUrl, Entries=Entries)
            self.fail -= 1
            answer = real.send_message_batch(QueueUrl=QueueUrl, Entries=Entries[1:]) if Entries[1:] else {}
            failed = {"Id": Entries[0]["Id"], "SenderFault": self.sender_fault, "Code": "InternalError"}
            return {"Successful": answer.get("Successful", []), "Failed": [failed]}

    queue.client = Flaky(fail=1, sender_fault=False)
    ids = queue.send_batch(["x", "y", "z"])
    assert sorted(m.id for m in queue.receive(10, 0)) == sorted(ids)  # each once

    queue.client = Flaky(fail=5, sender_fault=False)
    with pytest.raises(TransientError, match="1 of 1 messages not sent"):
        queue.send("never")
    queue.client = Flaky(fail=1, sender_fault=True)  # the request itself is wrong: not tried again
    with pytest.raises(BindingError, match="not sent") as refused:
        queue.send("refused")
    assert type(refused.value) is BindingError
    queue.client = real
    assert stats(env)["pending"] == 0


# -- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "base64"),
    [
        (b"\x00\x01\xffbytes", True),
        ("text with a NUL \x00 and a \ufffe", True),
        (msgspec.Raw(b'{"s": "\xef\xbf\xbf"}'), True),  # U+FFFF: JSON SQS cannot carry as text
        ("plain ünïcödé text, \U0001f600", False),
        ({"json": [1, 2]}, False),
        ("", False),  # SQS refuses an empty body: it travels as a placeholder
        (b"", False),
    ],
)
def test_bodies_sqs_cannot_carry_as_text_travel_in_base64(env: Env, sqs: Any, body: Any, base64: bool) -> None:
    env.QUEUE.send(body)
    (stored,) = raw_messages(sqs, env.QUEUE.name)
    encoding = stored["MessageAttributes"].get("encoding", {}).get("StringValue")
    assert (encoding == "base64") is base64
    (msg,) = env.QUEUE.receive(1, 0).messages
    expected = orjson_loads(body) if isinstance(body, msgspec.Raw) else body
    assert msg.body == expected and type(msg.body) is type(expected)


def orjson_loads(raw: msgspec.Raw) -> Any:
    import orjson

    return orjson.loads(bytes(raw))


def test_a_foreign_message_reads_as_json_with_sqs_ids(env: Env, sqs: Any, frozen: FrozenDateTimeFactory) -> None:
    url = sqs.get_queue_url(QueueName=env.QUEUE.name)["QueueUrl"]
    sent = sqs.send_message(QueueUrl=url, MessageBody='{"from": "elsewhere"}')
    (msg,) = env.QUEUE.receive(1, 0).messages
    assert (msg.id, msg.body, msg.attempts) == (sent["MessageId"], {"from": "elsewhere"}, 1)
    assert msg.timestamp.isoformat() == "2026-11-20T12:00:00+00:00"  # SQS's SentTimestamp


# -- leases and retries -------------------------------------------------------------------


def test_a_lost_lease_redelivers_and_its_late_settle_applies_nothing(make_sqs_env: MakeEnv) -> None:
    env = make_sqs_env(consumer={"visibility_timeout": LEASE_S})
    ids = env.QUEUE.send_batch(["a", "b"])
    lost = env.QUEUE.receive(2, 0)
    assert env.QUEUE.receive(2, 0).messages == []  # held by the lease
    again = env.QUEUE.receive(2, wait_seconds=LEASE_WAIT_S)
    assert sorted(m.id for m in again) == sorted(ids) and [m.attempts for m in again] == [2, 2]
    deletes = calls(env, "DeleteMessageBatch")
    env.QUEUE.settle(lost)  # the lease is over: its receipt handles may be someone else's now
    env.QUEUE.release(lost)
    assert deletes == [] and stats(env) == {"pending": 0, "in_flight": 2, "dlq": 0}
    env.QUEUE.settle(again)
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 0}


def test_a_settle_after_the_lease_under_a_frozen_clock_applies_nothing(
    make_sqs_env: MakeEnv, frozen: FrozenDateTimeFactory
) -> None:
    env = make_sqs_env(consumer={"visibility_timeout": 10})
    env.QUEUE.send("x")
    batch = env.QUEUE.receive(1, 0)
    frozen.tick(10)
    env.QUEUE.settle(batch)
    frozen.tick(0.5)
    assert [m.attempts for m in env.QUEUE.receive(1, 0)] == [2]


def test_a_retry_is_sent_again_with_its_id_and_its_deliveries(env: Env, frozen: FrozenDateTimeFactory) -> None:
    mid = env.QUEUE.send({"n": 1})
    first = env.QUEUE.receive(1, 0)
    first.retry_all(delay_seconds=5)
    frozen.tick(2)
    env.QUEUE.settle(first)
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 0}  # waiting, not in flight
    frozen.tick(4.9)
    assert env.QUEUE.receive(1, 0).messages == []
    frozen.tick(0.1)
    (again,) = env.QUEUE.receive(1, 0).messages
    assert (again.id, again.attempts, again.timestamp.isoformat()) == (mid, 2, "2026-11-20T12:00:00+00:00")


def test_a_delay_beyond_fifteen_minutes_hides_the_message_where_it_is(env: Env, frozen: FrozenDateTimeFactory) -> None:
    env.QUEUE.send("later")
    batch = env.QUEUE.receive(1, 0)
    batch.retry_all(delay_seconds=3600)
    sends = calls(env, "SendMessageBatch")
    env.QUEUE.settle(batch)
    assert sends == [] and stats(env) == {"pending": 0, "in_flight": 1, "dlq": 0}
    frozen.tick(3599)
    assert env.QUEUE.receive(1, 0).messages == []
    frozen.tick(2)
    assert [m.attempts for m in env.QUEUE.receive(1, 0)] == [2]


def test_release_makes_the_batch_visible_and_counts_the_delivery(env: Env) -> None:
    env.QUEUE.send_batch(["a", "b"])
    batch = env.QUEUE.receive(2, 0)
    env.QUEUE.release(batch)
    again = env.QUEUE.receive(2, 0)
    assert sorted(m.body for m in again) == ["a", "b"]
    assert [m.attempts for m in again] == [2, 2]  # SQS cannot take a receive back


def test_oldest_age_is_that_of_the_last_batch_received_while_the_queue_is_not_empty(
    env: Env, frozen: FrozenDateTimeFactory
) -> None:
    assert env.QUEUE.oldest_age_s() == 0
    env.QUEUE.send("old")
    frozen.tick(30)
    env.QUEUE.send("newer")
    frozen.tick(10)
    assert env.QUEUE.oldest_age_s() == 0  # nothing received here yet
    batch = env.QUEUE.receive(2, 0)
    frozen.tick(5)
    assert env.QUEUE.oldest_age_s() == 45
    env.QUEUE.settle(batch)
    assert env.QUEUE.oldest_age_s() == 0  # empty


# -- the two queues ---------------------------------------------------------------------


def test_ensure_creates_the_queue_and_its_dlq_once(
    make_env: MakeEnv, sqlite_url: str, moto_server: str, queue_name: str, sqs: Any
) -> None:
    url = f"sqs://{queue_name}?region={AWS_REGION}&endpoint_url={moto_server}"
    env = make_env(sqlite_url, bindings={"queue": url})
    assert sqs.list_queues(QueueNamePrefix=queue_name).get("QueueUrls", []) == []
    env.QUEUE.ensure()
    env.QUEUE.ensure()
    urls = sqs.list_queues(QueueNamePrefix=queue_name)["QueueUrls"]
    assert sorted(u.rsplit("/", 1)[1] for u in urls) == [queue_name, f"{queue_name}-dlq"]
    for u in urls:
        retention = sqs.get_queue_attributes(QueueUrl=u, AttributeNames=["MessageRetentionPeriod"])
        assert retention["Attributes"]["MessageRetentionPeriod"] == "1209600"


def test_a_missing_queue_asks_for_init(
    make_env: MakeEnv, sqlite_url: str, moto_server: str, queue_name: str, sqs: Any
) -> None:
    url = f"sqs://{queue_name}?region={AWS_REGION}&endpoint_url={moto_server}"
    env = make_env(sqlite_url, bindings={"queue": url})
    for use in (lambda: env.QUEUE.send("x"), lambda: env.QUEUE.receive(1, 0), env.QUEUE.stats):
        with pytest.raises(BindingError, match=f"sqs queue '{queue_name}' does not exist: run `edgepipe init`"):
            use()
    env.QUEUE.ensure()
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=f"{queue_name}-dlq")["QueueUrl"])
    with pytest.raises(BindingError, match=f"'{queue_name}-dlq' does not exist: run `edgepipe init`"):
        env.QUEUE.stats()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqs://q?region=us-east-1&colour=blue", "unknown URL parameter 'colour'"),
        ("sqs://no.dots.fifo?region=us-east-1", "names a standard queue"),
        ("sqs://q/extra?region=us-east-1", "names a standard queue"),
        ("sqs://q?endpoint_url=localhost:4566", "bindings.queue: endpoint_url must be an http"),
        (f"sqs://{'q' * 40}?region=us-east-1", "too long for its dead-letter counters"),
    ],
)
def test_bad_urls_fail_at_start_up(env: Env, url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        SqsQueue.from_url(url, env.DB, QueueSettings())


# -- dead letters ---------------------------------------------------------------------------


def dead_letter(env: Env, reasons: list[str]) -> list[str]:
    ids = env.QUEUE.send_batch([{"n": i} for i in range(len(reasons))])
    batch = env.QUEUE.receive(len(reasons), 0)
    for m in batch:
        m.dead_letter(reasons[m.body["n"]], f"n: bad {m.body['n']}")
    env.QUEUE.settle(batch)
    return ids


def test_listing_the_dlq_hides_no_letter(env: Env, sqs: Any) -> None:
    ids = dead_letter(env, [REASON_INVALID, REASON_INVALID, REASON_TOO_LATE])
    for _ in range(3):
        assert [d["message_id"] for d in env.QUEUE.dlq_list()] == ids
        assert env.QUEUE.stats()["dlq_invalid"] == 2
    url = sqs.get_queue_url(QueueName=f"{env.QUEUE.name}-dlq")["QueueUrl"]
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (counts["ApproximateNumberOfMessages"], counts["ApproximateNumberOfMessagesNotVisible"]) == ("3", "0")
    (letter, *_) = raw_messages(sqs, f"{env.QUEUE.name}-dlq")
    attrs = {k: v["StringValue"] for k, v in letter["MessageAttributes"].items()}
    assert {"id", "reason", "error", "attempts", "failed-at", "enqueued-at", "content-type"} <= set(attrs)


def test_rejected_totals_live_in_the_db(env: Env) -> None:
    dead_letter(env, [REASON_INVALID, REASON_INVALID, REASON_TOO_LATE])
    name = env.QUEUE.name

    def rows() -> dict[str, int]:
        with env.DB.read() as conn:
            found = conn.execute(sa.select(counters.c.name, counters.c.value)).all()
        return {n.removeprefix(f"dlq_total.{name}."): v for n, v in found if n.startswith(f"dlq_total.{name}.")}

    assert rows() == {REASON_INVALID: 2, REASON_TOO_LATE: 1}
    assert env.QUEUE.rejected_totals() == {"invalid": 2, "too_late": 1, "poison": 0, "retries_exhausted": 0}
    assert env.QUEUE.dlq_purge(reason=REASON_TOO_LATE) == 1
    assert env.QUEUE.dlq_redrive(reason=REASON_INVALID, limit=1) == 1
    assert rows() == {REASON_INVALID: 1, REASON_TOO_LATE: 1}  # a purge keeps the count, a redrive leaves it
    assert stats(env) == {"pending": 1, "in_flight": 0, "dlq": 1}


def test_dead_parts_and_exhausted_retries_reach_the_dlq(make_sqs_env: MakeEnv) -> None:
    env = make_sqs_env(consumer={"max_retries": 0})
    env.QUEUE.send_batch([[{"ok": 1}, {"bad": 2}, {"bad": 3}], "flaky"])
    batch = env.QUEUE.receive(2, 0)
    array, flaky = batch.messages
    array.dead_letter_part(1, REASON_INVALID, "bad: 2")
    array.dead_letter_part(2, REASON_INVALID, "bad: 3")
    flaky.retry()
    env.QUEUE.settle(batch)
    listed = {d["message_id"]: d for d in env.QUEUE.dlq_list()}
    assert set(listed) == {f"{array.id}:1", f"{array.id}:2", flaky.id}
    assert listed[f"{array.id}:2"]["body"] == '{"bad":3}'
    assert listed[flaky.id]["reason"] == REASON_RETRIES and listed[flaky.id]["attempts"] == 1
    assert stats(env) == {"pending": 0, "in_flight": 0, "dlq": 3}


def test_a_redriven_letter_keeps_its_id_and_starts_its_attempts_again(make_sqs_env: MakeEnv) -> None:
    env = make_sqs_env(consumer={"max_retries": 1})
    (mid,) = env.QUEUE.send_batch(["x"])
    for _ in range(2):
        env.QUEUE.settle(env.QUEUE.receive(1, 0), failure="boom")
    (letter,) = env.QUEUE.dlq_list()
    assert (letter["message_id"], letter["attempts"]) == (mid, 2)
    assert env.QUEUE.dlq_redrive() == 1
    back: MessageBatch = env.QUEUE.receive(1, 0)
    assert [(m.id, m.attempts, m.body) for m in back] == [(mid, 1, "x")]
