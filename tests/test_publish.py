"""What acknowledging a webhook costs the broker, and what it leaves there: on the Redis broker
the pending entry and the task message in one round trip, both or neither; on RabbitMQ no
pending set and no Redis at all, and Redis only the dedup cache the worker can do without."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import redis
from flask import Flask
from sqlalchemy import func, select

from app.applying.domain import APPLIED, DUPLICATE
from app.base.extensions import db
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing.pending import PENDING_DATA, PENDING_DUE
from app.plumbing.queues import WEBHOOK_QUEUE
from app.records.models import WebhookEvent
from config import Settings
from tests.support import free_port, rabbitmq_vhost, sent_to_redis

URL = "/api/v1/voice/webhook"


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """Publishing writes no row: SQLite, unless a test asks for both databases."""
    return request.getfixturevalue(f"{getattr(request, 'param', 'sqlite')}_url")


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """A virtual host of this module's own on the machine's RabbitMQ."""
    with rabbitmq_vhost() as url:
        yield url


def webhook(n: int) -> dict[str, str]:
    return {"sessionId": f"ONE_{n}", "phoneNumber": "+254712345678", "status": "busy", "duration": str(n)}


def client_commands(redis_url: str, work: Callable[[], None]) -> list[str]:
    """The command names clients sent while ``work`` ran: each is one round trip."""
    return [entry["command"].split(" ", 1)[0].upper() for entry in sent_to_redis(redis_url, work)]


def test_an_accepted_webhook_is_one_round_trip_to_redis(app: Flask) -> None:
    client, redis_url = app.test_client(), app.extensions["settings"].redis_url
    assert client.post(URL, data=webhook(0)).status_code == 200  # first use: queue and script set up
    accepted = 25

    def post() -> None:
        for n in range(1, accepted + 1):
            assert client.post(URL, data=webhook(n)).status_code == 200

    assert client_commands(redis_url, post) == ["EVALSHA"] * accepted
    redis_ = redis.Redis.from_url(redis_url)
    assert redis_.llen(WEBHOOK_QUEUE) == accepted + 1
    assert redis_.hlen(PENDING_DATA) == redis_.zcard(PENDING_DUE) == accepted + 1
    redis_.close()


@pytest.mark.parametrize("broken", [WEBHOOK_QUEUE, PENDING_DATA, PENDING_DUE])
def test_the_pending_entry_and_the_message_are_written_together_or_not_at_all(app: Flask, broken: str) -> None:
    """A key of the wrong type makes one of the writes fail: then neither may be written."""
    client, redis_ = app.test_client(), redis.Redis.from_url(app.extensions["settings"].redis_url)
    redis_.set(broken, "not what the service expects")
    response = client.post(URL, data=webhook(1))
    assert response.status_code == 503 and response.headers["Retry-After"]
    written = {WEBHOOK_QUEUE: "llen", PENDING_DATA: "hlen", PENDING_DUE: "zcard"}
    for key, size in written.items():
        if key != broken:
            assert getattr(redis_, size)(key) == 0, key
    redis_.close()


def test_on_rabbitmq_a_webhook_sends_nothing_to_redis(make_app, settings: Settings, amqp_url: str) -> None:
    app = make_app(dataclasses.replace(settings, celery_broker_url=amqp_url))
    client = app.test_client()
    assert client.post(URL, data=webhook(0)).status_code == 200

    def post() -> None:
        for n in range(1, 11):
            assert client.post(URL, data=webhook(n)).status_code == 200

    assert client_commands(settings.redis_url, post) == []
    assert redis.Redis.from_url(settings.redis_url).hlen(PENDING_DATA) == 0


def test_on_rabbitmq_webhooks_are_accepted_and_ready_while_redis_is_down(make_app, settings: Settings,
                                                                         amqp_url: str) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = make_app(dataclasses.replace(settings, celery_broker_url=amqp_url, redis_url=nowhere))
    client = app.test_client()
    assert client.post(URL, data=webhook(1)).status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["degraded"], body["checks"]["redis"]["ok"]) == ("degraded", ["redis"], False)
    assert body["checks"]["broker"]["ok"] and body["checks"]["database"]["ok"]


def test_on_the_redis_broker_redis_down_is_not_ready(make_app, settings: Settings) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = make_app(dataclasses.replace(settings, redis_url=nowhere))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert set(response.get_json()["failed"]) == {"redis", "broker"}


def envelope(seconds: int) -> Envelope:
    fields = {"sessionId": "S", "status": "completed", "phoneNumber": "+254712345678", "duration": "42"}
    return Envelope(Event("S", "completed", "+254712345678", None, 42, fields).to_message(),
                    f"2026-03-06T14:00:{seconds:02d}+00:00")


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_on_rabbitmq_the_worker_applies_once_without_redis(make_app, settings: Settings, amqp_url: str) -> None:
    """The dedup cache unreachable: the database fingerprint turns the second copy away."""
    from app.applying.delivery import deliver

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = make_app(dataclasses.replace(settings, celery_broker_url=amqp_url, redis_url=nowhere))
    with app.app_context():
        assert deliver(envelope(1), owner="task-1") == APPLIED
        assert deliver(envelope(5), owner="task-2") == DUPLICATE
        assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 1


def test_on_the_redis_broker_the_worker_waits_for_redis(make_app, settings: Settings) -> None:
    from app.applying.delivery import deliver

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = make_app(dataclasses.replace(settings, redis_url=nowhere))
    with app.app_context(), pytest.raises(redis.ConnectionError):
        deliver(envelope(1), owner="task-1")


def test_a_broker_on_another_redis_keeps_the_pending_set_where_the_worker_reads_it(
        make_app, settings: Settings, tmp_path) -> None:
    """The pending entry goes to REDIS_URL's server (the workers drop it there, the sweeper reads
    it there); only the message goes to the broker's."""
    from tests.support import RedisServer

    other = RedisServer(tmp_path / "broker").start()
    try:
        app = make_app(dataclasses.replace(settings, celery_broker_url=other.url))
        assert app.test_client().post(URL, data=webhook(1)).status_code == 200
        cache, broker = redis.Redis.from_url(settings.redis_url), redis.Redis.from_url(other.url)
        assert (cache.hlen(PENDING_DATA), cache.zcard(PENDING_DUE), cache.llen(WEBHOOK_QUEUE)) == (1, 1, 0)
        assert (broker.hlen(PENDING_DATA), broker.llen(WEBHOOK_QUEUE)) == (0, 1)
        cache.close()
        broker.close()
    finally:
        other.stop()
