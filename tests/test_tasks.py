"""The task's own decisions: what it retries, when it gives up, where the event goes then.

``Task.apply`` runs the task body in this process (retries run at once, countdowns ignored): this
tests the retry policy, not the queue. The queue is tested by the end-to-end tests' real worker.
"""

from __future__ import annotations

import json
import statistics

import pytest
from flask import Flask
from sqlalchemy import select

from app import create_app
from app.applying import tasks
from app.applying.deadletters import DEAD_LETTER_LIST
from app.applying.tasks import BACKOFF_MAX_SECONDS, CLAIM_BUSY_MAX_SECONDS, apply_webhook_event, backoff_seconds
from app.base.extensions import db
from app.payload.envelope import Envelope
from app.plumbing.pending import PENDING_DATA
from app.plumbing.pending import add as add_pending
from app.records.models import DeadLetter, VoiceRecording
from config import Settings
from tests.support import free_port

MESSAGE = {"session_id": "S", "status": "completed", "phone_number": "+254712345678", "recording_url": None,
           "duration": 7, "payload": {"sessionId": "S", "status": "completed", "phoneNumber": "+254712345678",
                                      "duration": "7"}}
RECEIVED = "2026-03-06T14:00:00+00:00"


def test_task_applies_and_reports_the_outcome(app: Flask) -> None:
    result = apply_webhook_event.apply(args=(MESSAGE, RECEIVED, "req-1"))
    assert result.get() == "applied"
    assert apply_webhook_event.apply(args=(MESSAGE, RECEIVED, "req-2")).get() == "duplicate"
    with app.app_context():
        assert db.session.get(VoiceRecording, "S").duration == 7


def test_database_down_is_retried_then_dead_lettered_once(app: Flask, settings: Settings) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    broken = create_app(Settings(database_url=nowhere, redis_url=settings.redis_url))
    envelope = Envelope(MESSAGE, RECEIVED, "req-1")
    add_pending(broken.extensions["redis"], envelope.key, envelope, 0)
    try:
        apply_webhook_event.apply(args=(MESSAGE, RECEIVED, "req-1"))
        client = broken.extensions["redis"]
        [raw] = client.lrange(DEAD_LETTER_LIST, 0, -1)  # the database is down: Redis holds it
        letter = json.loads(raw)
        assert letter["attempts"] == Settings().event_max_retries + 1
        assert letter["error"].startswith("OperationalError")
        assert letter["envelope"]["message"] == MESSAGE
        assert not client.hexists(PENDING_DATA, envelope.key)  # dead-lettered: the sweeper leaves it
    finally:
        with broken.app_context():
            db.engine.dispose()


def test_an_error_that_is_not_transient_is_dead_lettered_at_once(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(*_args: object, **_kwargs: object) -> str:
        calls.append(1)
        raise ValueError("not something a retry fixes")

    monkeypatch.setattr(tasks, "deliver", broken)
    assert apply_webhook_event.apply(args=(MESSAGE, RECEIVED, "req-1")).get() == "dead_lettered"
    assert calls == [1]
    with app.app_context():
        [letter] = db.session.scalars(select(DeadLetter)).all()
        assert (letter.attempts, letter.error) == (1, "ValueError: not something a retry fixes")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    for retries in range(12):
        samples = [backoff_seconds(retries) for _ in range(200)]
        step = min(BACKOFF_MAX_SECONDS, 2**retries)
        assert step / 2 <= min(samples) and max(samples) <= step
        assert statistics.pstdev(samples) > 0  # jittered
    assert max(backoff_seconds(10, busy=True) for _ in range(100)) <= CLAIM_BUSY_MAX_SECONDS
