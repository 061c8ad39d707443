"""Dedup claims, the pending set, the sweeper and dead letters, on a real Redis and real databases.

Messages are inspected where the Redis broker keeps them (one list per queue); no worker runs here.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app import create_app
from app.applying import delivery
from app.applying.deadletters import DEAD_LETTER_LIST, dead_letter, replay
from app.applying.deadletters import drain_redis as drain_redis_dead_letters
from app.applying.delivery import deliver
from app.applying.domain import APPLIED, DUPLICATE
from app.base.extensions import db
from app.payload.envelope import Envelope
from app.payload.events import Event
from app.plumbing import pending
from app.plumbing.dedup import DEDUP_PREFIX, ClaimBusy
from app.plumbing.pending import PENDING_DATA, PENDING_DUE
from app.plumbing.publish import enqueue
from app.plumbing.publish import resend_due as sweep_pending
from app.plumbing.queues import REPLAY_QUEUE, WEBHOOK_QUEUE
from app.records.models import DeadLetter, VoiceRecording, WebhookEvent
from config import Settings
from tests.support import free_port, sqlite_only

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)


def envelope(session: str = "S", status: str = "completed", seconds: float = 0) -> Envelope:
    phone = "+254712345678"
    fields = {"sessionId": session, "status": status, "phoneNumber": phone, "duration": "420"}
    event = Event(session, status, phone, None, 420, fields)
    return Envelope(event.to_message(), (T0 + timedelta(seconds=seconds)).isoformat(), "req-1")


def queued(app: Flask, queue: str = WEBHOOK_QUEUE) -> list[list]:
    """The task arguments of every message waiting in a queue of the Redis broker."""
    client: redis.Redis = app.extensions["redis"]
    messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0] for m in messages]


def event_rows() -> int:
    return db.session.scalar(select(func.count()).select_from(WebhookEvent))


@sqlite_only  # Redis only: no query runs
def test_enqueue_holds_the_event_in_pending_and_in_the_queue(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        enqueue(env.event, T0, "req-1")
        client = app.extensions["redis"]
        assert client.hexists(PENDING_DATA, env.key)
        assert client.zscore(PENDING_DUE, env.key) > time.time()
        [args] = queued(app)
        assert args[0] == env.message
        assert args[1] == T0.isoformat()
        assert args[2] == "req-1"


def test_deliver_applies_once_and_clears_pending(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        enqueue(env.event, T0, "req-1")
        assert deliver(env, owner="task-1") == APPLIED
        client = app.extensions["redis"]
        assert client.get(DEDUP_PREFIX + env.key).decode().startswith("done:")
        assert client.ttl(DEDUP_PREFIX + env.key) > 86000
        assert not client.hexists(PENDING_DATA, env.key)
        assert client.zscore(PENDING_DUE, env.key) is None
        enqueue(env.event, T0 + timedelta(seconds=5), "req-2")  # AT delivers it again, later
        assert client.hexists(PENDING_DATA, env.key)
        assert deliver(Envelope(env.message, (T0 + timedelta(seconds=5)).isoformat()), owner="task-2") == DUPLICATE
        assert not client.hexists(PENDING_DATA, env.key)  # the duplicate's claim dropped it
        assert client.zscore(PENDING_DUE, env.key) is None
        assert event_rows() == 1


def test_redis_forgot_and_the_database_fingerprint_still_guards(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        assert deliver(env, owner="task-1") == APPLIED
        app.extensions["redis"].flushdb()
        assert deliver(envelope(seconds=5), owner="task-2") == DUPLICATE
        assert event_rows() == 1
        assert db.session.scalar(select(WebhookEvent.received_at)) == T0


def test_a_claim_held_by_another_task_is_busy(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        app.extensions["redis"].set(DEDUP_PREFIX + env.key, "claim:other-task", ex=60)
        with pytest.raises(ClaimBusy):
            deliver(env, owner="task-1")
        assert event_rows() == 0


def test_a_redelivered_task_reuses_its_own_claim(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        app.extensions["redis"].set(DEDUP_PREFIX + env.key, "claim:task-1", ex=60)
        assert deliver(env, owner="task-1") == APPLIED


def test_a_failed_transaction_gives_the_claim_back(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    def database_down(*_args: object, **_kwargs: object) -> str:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with app.app_context():
        env = envelope()
        monkeypatch.setattr(delivery, "apply_event", database_down)
        with pytest.raises(OperationalError):
            deliver(env, owner="task-1")
        assert app.extensions["redis"].get(DEDUP_PREFIX + env.key) is None
        monkeypatch.undo()
        assert deliver(env, owner="task-2") == APPLIED


def test_an_earlier_copy_after_done_goes_to_the_database(app: Flask) -> None:
    with app.app_context():
        assert deliver(envelope(seconds=30), owner="task-1") == APPLIED
        assert deliver(envelope(seconds=10), owner="task-2") == DUPLICATE
        assert db.session.scalar(select(WebhookEvent.received_at)) == T0 + timedelta(seconds=10)
        assert db.session.get(VoiceRecording, "S").created_at == T0 + timedelta(seconds=10)


@sqlite_only  # Redis only: no query runs
def test_sweeper_resends_only_what_is_due(app: Flask) -> None:
    with app.app_context():
        client = app.extensions["redis"]
        due, later = envelope("DUE"), envelope("LATER")
        pending.add(client, due.key, due, time.time() - 1)
        pending.add(client, later.key, later, time.time() + 60)
        assert sweep_pending() == 1
        assert [args[0]["session_id"] for args in queued(app)] == ["DUE"]
        assert client.zscore(PENDING_DUE, due.key) > time.time()  # not sent again at the next sweep
        assert sweep_pending() == 0


def test_each_resend_of_an_event_waits_twice_as_long(app: Flask) -> None:
    with app.app_context():
        client = app.extensions["redis"]
        env = envelope("SLOW")
        pending.add(client, env.key, env, 0)
        age = app.extensions["settings"].pending_redelivery_seconds
        now = time.time()
        waits = []
        for _ in range(8):
            assert sweep_pending(now=now) == 1
            due = client.zscore(PENDING_DUE, env.key)
            waits.append(round((due - now) / age))
            now = due
        assert waits == [2, 4, 8, 16, 32, 64, 64, 64]
        assert deliver(env, owner="t") == APPLIED
        assert client.hget(pending.PENDING_SENDS, env.key) is None


def test_dead_letters_are_stored_listed_and_replayed_once(app: Flask) -> None:
    with app.app_context():
        env = envelope()
        dead_letter(env, "OperationalError: down", attempts=11, letter_key="task-1")
        dead_letter(env, "OperationalError: down", attempts=11, letter_key="task-1")  # its message came back
        [letter] = db.session.scalars(select(DeadLetter)).all()
        assert (letter.session_id, letter.attempts, letter.fingerprint) == ("S", 11, env.key)
        assert replay(None, REPLAY_QUEUE) == [letter.id]
        [args] = queued(app, REPLAY_QUEUE)
        assert args[0] == env.message
        assert replay(None, REPLAY_QUEUE) == []  # already replayed
        assert deliver(Envelope(*args), owner="replay-1") == APPLIED
        assert deliver(Envelope(*args), owner="replay-2") == DUPLICATE


def test_dead_letters_go_to_redis_while_the_database_is_down(app: Flask, settings: Settings) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    broken = create_app(Settings(database_url=nowhere, redis_url=settings.redis_url))
    with broken.app_context():
        dead_letter(envelope(), "OperationalError: down", attempts=11, letter_key="task-1")
        db.engine.dispose()
    assert broken.extensions["redis"].llen(DEAD_LETTER_LIST) == 1
    with app.app_context():
        assert drain_redis_dead_letters() == 1
        assert db.session.scalar(select(func.count()).select_from(DeadLetter)) == 1
        assert app.extensions["redis"].llen(DEAD_LETTER_LIST) == 0
