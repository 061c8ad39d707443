"""The ready hook's outbox on real databases and a real Redis broker: written with the change,
relayed after commit, kept through a broker outage and sent by the sweeper's relay."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from kombu import Connection
from sqlalchemy import select

from app.applying import hooks
from app.applying.domain import apply_event
from app.base.extensions import db
from app.payload.events import Event
from app.records.models import HookOutbox, VoiceRecording
from config import Settings
from tests.conftest import API_KEY
from tests.support import RedisServer, rabbitmq_vhost, wait_for

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
TASK = "crm.tasks.recording_ready"
QUEUE = "crm-hooks"
URL1, URL2 = "https://r.example/one.mp3", "https://r.example/two.mp3"


def ev(session: str, status: str, url: str | None = None, phone: str = "+254712345678") -> Event:
    fields: dict[str, Any] = {"sessionId": session, "status": status, "phoneNumber": phone}
    if url:
        fields["recordingUrl"] = url
    return Event(session, status, phone, url, None, fields)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own as the broker, so the test may stop it."""
    server = RedisServer(tmp_path / "broker").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hook_app(make_app: Any, settings: Settings, broker: RedisServer) -> Flask:
    return make_app(replace(settings, celery_broker_url=broker.url, voice_hook_task=TASK, voice_hook_queue=QUEUE))


def apply(app: Flask, event_: Event, seconds: float) -> None:
    with app.app_context():
        apply_event(db.session, event_, T0 + timedelta(seconds=seconds))


def test_the_relay_after_commit_runs_only_when_the_change_staged_a_hook(hook_app: Flask, broker: RedisServer) -> None:
    """An event that staged no hook costs the task no outbox query; a row an earlier relay left is
    the sweeper's (``relay`` without a recording)."""
    with hook_app.app_context():
        apply_event(db.session, ev("S", "completed", URL1), T0)
        assert db.session.info.get(hooks.STAGED) is True
        broker.stop()
        hooks.relay_after_commit(db.session, "S")  # fails to send: the row stays
        assert hooks.STAGED not in db.session.info
    broker.start()
    with hook_app.app_context():
        apply_event(db.session, ev("S", "completed", None, phone="+254700000002"), T0 + timedelta(seconds=1))
        assert hooks.STAGED not in db.session.info  # no URL change: nothing staged
        hooks.relay_after_commit(db.session, "S")
    assert len(outbox(hook_app)) == 1  # the after-commit relay left it alone
    with hook_app.app_context():
        assert hooks.relay(db.session) == 1  # the sweeper's relay sends it
    assert outbox(hook_app) == []


def outbox(app: Flask) -> list[HookOutbox]:
    with app.app_context():
        rows = list(db.session.scalars(select(HookOutbox).order_by(HookOutbox.id)))
        db.session.expunge_all()
        return rows


def queued(server: RedisServer) -> list[dict]:
    """The task messages waiting on the hook queue, as the broker holds them."""
    client = redis.Redis.from_url(server.url)
    try:
        return [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    finally:
        client.close()


def get(app: Flask, recording_id: str) -> dict:
    answer = app.test_client().get(f"/api/v1/voice/recordings/{recording_id}",
                                   headers={"Authorization": f"Bearer {API_KEY}"})
    return answer.get_json()


def test_the_outbox_row_is_written_with_the_change_that_sets_or_changes_the_url(hook_app: Flask) -> None:
    apply(hook_app, ev("S", "busy"), 0)
    assert outbox(hook_app) == []  # no URL yet
    apply(hook_app, ev("S", "completed", URL1), 1)
    [row] = outbox(hook_app)
    # The task id is uuid5 of the recording id and the change that set the URL (the order key of
    # the event that set it, as stored on the recording), by the documented rule.
    with hook_app.app_context():
        change = db.session.get(VoiceRecording, "S").url_key
        db.session.rollback()
    assert row.task_id == str(uuid.uuid5(hooks.TASK_ID_NAMESPACE, f"S\n{change}"))
    assert row.recording == get(hook_app, "S")  # the recording as the single GET shows it at that commit
    apply(hook_app, ev("S", "completed", URL1, phone="+254787654321"), 2)  # same URL: no new send
    assert len(outbox(hook_app)) == 1
    apply(hook_app, ev("S", "completed", URL2), 3)  # the URL changes
    assert [r.recording["recording_url"] for r in outbox(hook_app)] == [URL1, URL2]
    assert outbox(hook_app)[1].recording == get(hook_app, "S")


def test_an_earlier_url_applied_late_changes_nothing_and_sends_nothing(hook_app: Flask) -> None:
    apply(hook_app, ev("S", "completed", URL2), 5)
    apply(hook_app, ev("S", "completed", URL1), 1)  # arrived earlier, applied later: URL2 stays
    assert [r.recording["recording_url"] for r in outbox(hook_app)] == [URL2]


def test_the_hook_off_writes_nothing(make_app: Any, settings: Settings) -> None:
    app = make_app(settings)
    apply(app, ev("S", "completed", URL1), 0)
    assert outbox(app) == []


def test_relay_hands_the_task_to_the_broker_then_deletes_the_row(hook_app: Flask, broker: RedisServer) -> None:
    apply(hook_app, ev("S", "completed", URL1), 0)
    apply(hook_app, ev("T", "completed", URL2), 0)
    expected = outbox(hook_app)
    with hook_app.app_context():
        assert hooks.relay(db.session, "S") == 1  # only S's row: what this task's commit wrote
        assert hooks.relay(db.session) == 1
    assert outbox(hook_app) == []
    messages = queued(broker)
    assert sorted(m["headers"]["id"] for m in messages) == sorted(r.task_id for r in expected)
    assert {m["headers"]["task"] for m in messages} == {TASK}
    bodies = {m["headers"]["id"]: json.loads(base64.b64decode(m["body"]))[0] for m in messages}
    assert [bodies[r.task_id] for r in expected] == [[r.recording] for r in expected]  # one argument


def test_a_batchs_relay_sends_only_the_rows_of_the_recordings_it_names(hook_app: Flask, broker: RedisServer) -> None:
    """A batch's relay after its commit names the recordings it changed: another's row is the sweeper's."""
    for sid, url in (("S", URL1), ("T", URL2), ("U", URL1)):
        apply(hook_app, ev(sid, "completed", url), 0)
    with hook_app.app_context():
        assert hooks.relay(db.session, {"S", "U"}) == 2
        assert [row.recording_id for row in db.session.scalars(select(HookOutbox))] == ["T"]
        db.session.rollback()
        assert hooks.relay(db.session, []) == 0
        assert hooks.relay(db.session) == 1
    assert outbox(hook_app) == []


def test_a_broker_outage_between_commit_and_relay_keeps_the_row_for_the_sweeper(
    hook_app: Flask, broker: RedisServer
) -> None:
    failed_before = hooks.FAILED._value.get()
    with hook_app.app_context():  # one session, as in a task
        apply_event(db.session, ev("S", "completed", URL1), T0)  # committed
        broker.stop()  # the broker goes away before the relay
        hooks.relay_after_commit(db.session, "S")  # must not raise: the task already succeeded
    [row] = outbox(hook_app)
    assert row.attempts == 1
    assert hooks.FAILED._value.get() == failed_before + 1
    broker.start()

    def swept() -> bool:
        with hook_app.app_context():
            hooks.relay(db.session, path="sweeper")
        return not outbox(hook_app)

    wait_for(swept, timeout=20, interval=0.2)
    assert [m["headers"]["id"] for m in queued(broker)] == [row.task_id]


def test_the_backlog_is_a_metric(hook_app: Flask) -> None:
    apply(hook_app, ev("S", "completed", URL1), 0)
    apply(hook_app, ev("T", "completed", URL2), 0)
    text = hook_app.test_client().get("/metrics").get_data(as_text=True)
    assert "voice_hook_backlog 2.0" in text


def test_relay_on_rabbitmq_lands_on_the_hook_queue(make_app: Any, sqlite_url: str, redis_server: RedisServer) -> None:
    with rabbitmq_vhost() as broker_url:
        app = make_app(Settings(database_url=sqlite_url, redis_url=redis_server.url, celery_broker_url=broker_url,
                                voice_hook_task=TASK, voice_hook_queue=QUEUE, log_format="console"))
        apply(app, ev("S", "completed", URL1), 0)
        [row] = outbox(app)
        with app.app_context():
            assert hooks.relay(db.session) == 1
        assert outbox(app) == []
        with Connection(broker_url) as connection, connection.SimpleQueue(QUEUE) as queue:
            message = queue.get(timeout=10)
            assert (message.headers["id"], message.headers["task"]) == (row.task_id, TASK)
            assert message.payload[0] == [row.recording]
            message.ack()
