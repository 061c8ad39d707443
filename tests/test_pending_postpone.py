"""``app.plumbing.pending.postpone`` on a real Redis: a worker that holds an event (or will retry it) moves
its pending entry's due time, so the sweeper leaves it alone till then; an event the pending set
does not hold is not added by it; on RabbitMQ, where there is no pending set, it does nothing."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import redis
from flask import Flask

from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import pending
from config import Settings
from tests.support import RedisServer, rabbitmq_vhost, sent_to_redis, sqlite_only

REDELIVERY = 60  # PENDING_REDELIVERY_SECONDS in these tests


def envelope(session: str) -> Envelope:
    event = Event(session, "busy", "+254712345678", None, None, {"sessionId": session, "status": "busy"})
    return Envelope(event.to_message(), "2026-03-06T14:00:00+00:00", None)


def due(client: redis.Redis, key: str) -> float | None:
    return client.zscore(pending.PENDING_DUE, key)


@pytest.fixture
def redis_app(make_app: Any, settings: Settings) -> Flask:
    return make_app(replace(settings, pending_redelivery_seconds=REDELIVERY))


@sqlite_only  # Redis alone decides; the database plays no part
def test_postpone_moves_a_held_entrys_due_time_and_the_sweeper_waits_for_it(redis_app: Flask) -> None:
    client = redis_app.extensions["redis"]
    held = envelope("HELD")
    with redis_app.app_context():
        pending.add(client, held.key, held, time.time() - 5)  # due already: the sweeper would send it
        before = time.time()
        pending.postpone(held.key, 30)
        after = time.time()
        # Due when the worker's 30 s are over, plus the redelivery age (as a fresh entry would be).
        assert before + 30 + REDELIVERY <= due(client, held.key) <= after + 30 + REDELIVERY
        assert pending.take_due(time.time()) == []  # a sweep now leaves it alone
        assert pending.take_due(after + 30 + REDELIVERY + 1) == [held]  # and sends it once it is due
        # The entry itself is untouched: the same envelope, still held.
        assert client.hget(pending.PENDING_DATA, held.key).decode() == held.to_json()


@sqlite_only
def test_postpone_of_an_event_not_held_adds_nothing(redis_app: Flask) -> None:
    client = redis_app.extensions["redis"]
    held, other = envelope("HELD"), envelope("APPLIED-ALREADY")
    with redis_app.app_context():
        pending.add(client, held.key, held, 1000.0)
        pending.postpone(other.key, 30)  # e.g. applied and dropped meanwhile: it must not come back
        assert due(client, other.key) is None
        assert client.zrange(pending.PENDING_DUE, 0, -1, withscores=True) == [(held.key.encode(), 1000.0)]
        assert client.hkeys(pending.PENDING_DATA) == [held.key.encode()]


def test_postpone_on_rabbitmq_is_a_no_op(make_app: Any, sqlite_url: str, redis_server: RedisServer) -> None:
    with rabbitmq_vhost() as broker_url:
        app = make_app(Settings(database_url=sqlite_url, redis_url=redis_server.url, celery_broker_url=broker_url,
                                pending_redelivery_seconds=REDELIVERY, log_format="console"))
        client = redis.Redis.from_url(redis_server.url)
        held = envelope("ON-RABBIT")
        client.zadd(pending.PENDING_DUE, {held.key: 1000.0})  # whatever may be in Redis is not the broker's

        def postpone() -> None:
            with app.app_context():
                pending.postpone(held.key, 30)
                pending.postpone(envelope("NEVER-HELD").key, 30)

        assert sent_to_redis(redis_server.url, postpone) == []  # not a single command
        assert client.zrange(pending.PENDING_DUE, 0, -1, withscores=True) == [(held.key.encode(), 1000.0)]
        client.close()
