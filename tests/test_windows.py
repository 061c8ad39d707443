"""Windows a line-by-line reading found, each placed on purpose with real Redis, databases and
RabbitMQ: two drainers of the Redis-held dead letters, dead letters on RabbitMQ while the database
is down, a Redis that refuses writes on RabbitMQ, ready hooks whose URL comes back, and two
relays of one recording's hooks."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import func, select

from app import create_app
from app.applying import hooks
from app.applying.deadletters import DEAD_LETTER_LIST, NotKept, dead_letter, drain_redis
from app.applying.delivery import deliver
from app.applying.domain import APPLIED, DUPLICATE, apply_event
from app.base.extensions import db
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.records.models import DeadLetter, HookOutbox, WebhookEvent
from config import Settings
from tests.support import RedisServer, free_port, rabbitmq_vhost, sqlite_only, wait_for

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
PHONE = "+254712345678"


def envelope(session: str, status: str = "completed", url: str | None = None, seconds: float = 0) -> Envelope:
    """An event; its duration is its time, so events at other times are distinct events."""
    duration = int(seconds)
    fields = {"sessionId": session, "status": status, "phoneNumber": PHONE, "duration": str(duration)}
    if url:
        fields["recordingUrl"] = url
    event = Event(session, status, PHONE, url, duration, fields)
    return Envelope(event.to_message(), (T0 + timedelta(seconds=seconds)).isoformat(), None)


class AfterFirst:
    """A Redis client that runs ``then`` once, right after its first ``name`` call returned: the
    other party's steps placed between this one's."""

    def __init__(self, client: redis.Redis, name: str, then: Callable[[], None]) -> None:
        self._client, self._name, self._then, self._done = client, name, then, False

    def __getattr__(self, attribute: str) -> Any:
        real = getattr(self._client, attribute)
        if attribute != self._name:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            if not self._done:
                self._done = True
                self._then()
            return result

        return call


def letters(app: Flask) -> list[str]:
    with app.app_context():
        rows = db.session.scalars(select(DeadLetter).order_by(DeadLetter.id)).all()
        found = [row.session_id for row in rows]
        db.session.rollback()
        return found


def test_two_drainers_at_once_file_every_dead_letter_once(make_app: Any, settings: Settings) -> None:
    """Drainer A reads the list's head, drainer B drains the whole list, then A goes on: every
    letter is filed once, none is removed unfiled."""
    first, second = make_app(settings), make_app(settings)
    client: redis.Redis = first.extensions["redis"]
    records = [{"letter_key": f"task-{name}", "envelope": json.loads(envelope(name).to_json()),
                "error": "OperationalError: down", "attempts": 3, "failed_at": T0.isoformat()}
               for name in ("A", "B", "C")]
    client.rpush(DEAD_LETTER_LIST, *[json.dumps(record) for record in records])

    def drain_all_in_second() -> None:
        with second.app_context():
            assert drain_redis() == 3

    first.extensions["redis"] = AfterFirst(client, "lindex", drain_all_in_second)
    with first.app_context():
        drain_redis()
    first.extensions["redis"] = client
    assert sorted(letters(first)) == ["A", "B", "C"]
    assert client.llen(DEAD_LETTER_LIST) == 0


def test_on_rabbitmq_a_dead_letter_the_database_cannot_take_stays_out_of_redis(
    redis_server: RedisServer,
) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    broken = create_app(Settings(database_url=nowhere, redis_url=redis_server.url,
                                 celery_broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    client: redis.Redis = broken.extensions["redis"]
    client.delete(DEAD_LETTER_LIST)
    with broken.app_context():
        with pytest.raises(NotKept):  # the task keeps its message in RabbitMQ instead
            dead_letter(envelope("S"), "OperationalError: down", attempts=15, letter_key="task-1")
        db.engine.dispose()
    assert client.llen(DEAD_LETTER_LIST) == 0
    client.close()


def test_on_the_redis_broker_a_dead_letter_nothing_can_take_is_not_kept(redis_server: RedisServer) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    gone = f"redis://127.0.0.1:{free_port()}/0"
    broken = create_app(Settings(database_url=nowhere, redis_url=gone))
    with broken.app_context():
        with pytest.raises(NotKept):
            dead_letter(envelope("S"), "OperationalError: down", attempts=15, letter_key="task-1")
        db.engine.dispose()
    broken.extensions["redis"].close()


@sqlite_only
@pytest.mark.parametrize("refusal", ["readonly", "oom"])
def test_on_rabbitmq_a_redis_that_refuses_writes_leaves_the_decision_to_the_database(
    make_app: Any, settings: Settings, tmp_path: Any, refusal: str
) -> None:
    """READONLY (a replica behind a plain redis:// after a failover) or OOM (noeviction): the
    event is applied once, by the fingerprint, not dead-lettered."""
    cache = RedisServer(tmp_path / "cache").start()
    try:
        probe = redis.Redis.from_url(cache.url)
        if refusal == "readonly":
            probe.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a replica of nobody: read-only
        else:
            probe.config_set("maxmemory-policy", "noeviction")
            probe.config_set("maxmemory", "1")  # every write is refused as out of memory
        app = make_app(Settings(database_url=settings.database_url, redis_url=cache.url,
                                celery_broker_url="amqp://guest:guest@127.0.0.1:5672//", log_format="console"))
        env = envelope("RO")
        with app.app_context():
            assert deliver(env, owner="t1") == APPLIED
            assert deliver(env, owner="t2") == DUPLICATE  # the fingerprint turned the copy away
            assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 1
            db.session.rollback()
        app.extensions["redis"].close()
        probe.close()
    finally:
        cache.stop()


HOOK_TASK, HOOK_QUEUE = "crm.tasks.recording_ready", "voice-hooks-test"
URL_A, URL_B = "https://r.example/a.mp3", "https://r.example/b.mp3"


@pytest.fixture
def hook_app(make_app: Any, settings: Settings, redis_server: RedisServer) -> Flask:
    app = make_app(Settings(database_url=settings.database_url, redis_url=redis_server.url,
                            voice_hook_task=HOOK_TASK, voice_hook_queue=HOOK_QUEUE, log_format="console"))
    app.extensions["redis"].delete(HOOK_QUEUE)
    return app


def apply(app: Flask, env: Envelope) -> None:
    with app.app_context():
        apply_event(db.session, env.event, datetime.fromisoformat(env.received_at))


def sent_hooks(app: Flask) -> list[tuple[str, str]]:
    """(task id, URL) of each hook task on the broker, in the order the broker took them."""
    client: redis.Redis = app.extensions["redis"]
    messages = [json.loads(raw) for raw in reversed(client.lrange(HOOK_QUEUE, 0, -1))]  # LPUSH: newest first
    return [(m["headers"]["id"], json.loads(base64.b64decode(m["body"]))[0][0]["recording_url"]) for m in messages]


def test_a_url_that_goes_a_b_a_sends_three_distinct_tasks(hook_app: Flask) -> None:
    for seconds, url in ((1, URL_A), (2, URL_B), (3, URL_A)):
        apply(hook_app, envelope("S", url=url, seconds=seconds))
    with hook_app.app_context():
        assert hooks.relay(db.session) == 3
    sent = sent_hooks(hook_app)
    assert [url for _, url in sent] == [URL_A, URL_B, URL_A]
    assert len({task for task, _ in sent}) == 3  # a consumer that drops repeats still ends on A


def outbox_urls(app: Flask) -> list[str]:
    with app.app_context():
        rows = db.session.scalars(select(HookOutbox).order_by(HookOutbox.id))
        urls = [row.recording["recording_url"] for row in rows]
        db.session.rollback()
        return urls


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_relay_never_sends_a_newer_hook_while_another_holds_an_older_one(
    hook_app: Flask, make_app: Any, settings: Settings
) -> None:
    """Relay 1 holds the recording's oldest row (row locked, its send not done); relay 2 runs
    meanwhile and must not send the newer row. Relay 1's send then fails: the next relay sends
    both, the older first."""
    other = make_app(Settings(database_url=settings.database_url, redis_url=settings.redis_url,
                              voice_hook_task=HOOK_TASK, voice_hook_queue=HOOK_QUEUE, log_format="console"))
    apply(hook_app, envelope("S", url=URL_A, seconds=1))
    apply(hook_app, envelope("S", url=URL_B, seconds=2))
    with hook_app.app_context():
        held = db.session.scalar(select(HookOutbox).order_by(HookOutbox.id).limit(1).with_for_update())
        assert held.recording["recording_url"] == URL_A
        with other.app_context():
            assert hooks.relay(db.session) == 0  # the newer row waits behind the held one
        db.session.rollback()  # relay 1's send failed: the row stays, unlocked
    assert sent_hooks(hook_app) == []
    with hook_app.app_context():
        assert hooks.relay(db.session) == 2
    assert [url for _, url in sent_hooks(hook_app)] == [URL_A, URL_B]


@sqlite_only
def test_a_row_the_broker_refuses_holds_back_its_recording_only(hook_app: Flask) -> None:
    """The broker refuses one message (too large for it); other recordings' hooks still go out,
    and the refused recording's later hook waits behind it."""
    apply(hook_app, envelope("BIG", url=URL_A, seconds=1))
    apply(hook_app, envelope("BIG", url=URL_B, seconds=2))
    apply(hook_app, envelope("OK", url=URL_A, seconds=3))
    with hook_app.app_context():
        first = db.session.scalar(select(HookOutbox).order_by(HookOutbox.id).limit(1))
        first.recording = {**first.recording, "padding": "x" * (2 * 1024 * 1024)}
        db.session.commit()
    client: redis.Redis = hook_app.extensions["redis"]
    client.config_set("proto-max-bulk-len", str(1024 * 1024))  # the broker refuses a 2 MB message
    try:
        with hook_app.app_context():
            assert hooks.relay(db.session, path="sweeper") == 1
    finally:
        client.config_set("proto-max-bulk-len", str(512 * 1024 * 1024))
    assert [url for _, url in sent_hooks(hook_app)] == [URL_A]  # OK's, not BIG's second
    assert outbox_urls(hook_app) == [URL_A, URL_B]  # BIG's two, in order


@sqlite_only
def test_quorum_queues_dead_letter_past_their_delivery_limit_and_the_sweeper_files_it(
    make_app: Any, settings: Settings
) -> None:
    """A message delivered more often than the delivery limit goes to the dead-letter queue (not
    dropped), and the drain files it as a dead letter, listed and replayable, once."""
    from kombu import Connection

    from app.applying.deadletters import drain_broker, replay
    from app.plumbing.publish import send
    from app.plumbing.queues import DELIVERY_LIMIT, REPLAY_QUEUE, WEBHOOK_QUEUE

    with rabbitmq_vhost() as broker_url:
        app = make_app(Settings(database_url=settings.database_url, redis_url=settings.redis_url,
                                celery_broker_url=broker_url, celery_queue_type="quorum", log_format="console"))
        env = envelope("POISON")
        with app.app_context():
            assert drain_broker() == 0  # declares the dead-letter queue, as a worker does when ready
            send(env, WEBHOOK_QUEUE)
        declared = app.extensions["celery"].amqp.queues  # the service's own queue declarations
        with Connection(broker_url) as connection:
            queue = declared[WEBHOOK_QUEUE].bind(connection.default_channel)
            for _ in range(DELIVERY_LIMIT + 1):  # each delivery given back, as a worker dying on it would
                message = wait_for(lambda: queue.get(no_ack=False), timeout=10, interval=0.05)
                message.reject(requeue=True)
            assert queue.queue_declare(passive=True).message_count == 0  # no longer in the queue...
        with app.app_context():
            assert drain_broker() == 1  # ...but in the dead-letter queue, and now filed
            assert drain_broker() == 0
            [letter] = db.session.scalars(select(DeadLetter)).all()
            assert letter.session_id == "POISON" and "delivery limit" in letter.error
            assert replay(None, REPLAY_QUEUE) == [letter.id]
        with Connection(broker_url) as connection:
            queue = declared[REPLAY_QUEUE].bind(connection.default_channel)
            message = wait_for(lambda: queue.get(no_ack=False), timeout=10, interval=0.05)
            assert message.payload[0][0] == env.message
            message.ack()
