"""A duplicate that arrived earlier than the stored copy (the copy AT sent first, applied second)
re-times its event, and the recording is derived afresh (app.applying.domain.stage_event): when that
changes what a client sees, the change is announced like any other change, in the same
transaction: the recording moves to the change feed's end, and the ready hook is queued when its
URL changed. A re-timing that changes nothing visible announces nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from app.applying.domain import DUPLICATE, apply_event
from app.base.extensions import db
from app.payload.events import Event
from app.records.models import HookOutbox, VoiceRecording, WebhookEvent
from config import Settings
from tests.conftest import API_KEY
from tests.test_changes import Consumer

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
P1, P2 = "+254712345678", "+254787654321"
URL_A, URL_B = "https://r.example/a.mp3", "https://r.example/b.mp3"
TASK = "crm.tasks.recording_ready"


def ev(phone: str, url: str) -> Event:
    fields: dict[str, Any] = {"sessionId": "S", "status": "completed", "phoneNumber": phone, "recordingUrl": url}
    return Event("S", "completed", phone, url, None, fields)


A, B = ev(P1, URL_A), ev(P2, URL_B)  # two completed events of one session, each with its own URL


def apply(app: Flask, event_: Event, seconds: float) -> str:
    with app.app_context():
        return apply_event(db.session, event_, T0 + timedelta(seconds=seconds))


def position(app: Flask, recording_id: str) -> int:
    with app.app_context():
        value = db.session.scalar(select(VoiceRecording.change_position).where(VoiceRecording.id == recording_id))
        db.session.rollback()
        return value


def received_at(app: Flask, event_: Event) -> datetime:
    with app.app_context():
        value = db.session.scalar(select(WebhookEvent.received_at)
                                  .where(WebhookEvent.fingerprint == event_.fingerprint))
        db.session.rollback()
        return value


def outbox(app: Flask) -> list[tuple[str, dict]]:
    with app.app_context():
        rows = [(row.task_id, row.recording) for row in db.session.scalars(select(HookOutbox).order_by(HookOutbox.id))]
        db.session.rollback()
        return rows


def get(app: Flask, recording_id: str) -> dict:
    return app.test_client().get(f"/api/v1/voice/recordings/{recording_id}",
                                 headers={"Authorization": f"Bearer {API_KEY}"}).get_json()


@pytest.fixture
def hook_app(make_app: Any, settings: Settings) -> Flask:
    """The ready hook on (the outbox is written; nothing here relays it to a broker)."""
    return make_app(replace(settings, voice_hook_task=TASK))


def before_the_copy(app: Flask) -> None:
    """A applied first, as AT's later copy (t=10); then B (t=5): B arrived before A, so A's URL is
    the recording's. Then another recording, T, changes after S."""
    apply(app, A, 10)
    apply(app, B, 5)
    with app.app_context():
        apply_event(db.session, Event("T", "busy", P1, None, None, {"sessionId": "T", "status": "busy"}),
                    T0 + timedelta(seconds=6))
    assert get(app, "S")["recording_url"] == URL_A


def test_a_re_timing_that_changes_the_recording_moves_it_past_the_feeds_cursor(app: Flask) -> None:
    before_the_copy(app)
    consumer = Consumer(app.test_client())
    consumer.follow_until(lambda: set(consumer.taken) == {"S", "T"})
    assert consumer.taken == ["S", "T"]
    moved_from = position(app, "S")
    # A's first copy (t=1) arrives now: A is re-timed to t=1, so B (t=5) is now the later
    # completed event, and its URL the recording's.
    assert apply(app, A, 1) == DUPLICATE
    assert received_at(app, A) == T0 + timedelta(seconds=1)
    assert get(app, "S")["recording_url"] == URL_B
    assert position(app, "S") > max(moved_from, position(app, "T"))
    consumer.follow_until(lambda: len(consumer.taken) == 3)
    assert consumer.taken[2:] == ["S"]  # behind the cursor the consumer held: it sees the change
    assert consumer.state["S"] == get(app, "S")
    assert consumer.state["S"]["recording_url"] == URL_B
    # B's own earlier copy (t=4): re-timed, but B stays the later event; nothing a client sees
    # changes, and the feed is left alone.
    assert apply(app, B, 4) == DUPLICATE
    assert received_at(app, B) == T0 + timedelta(seconds=4)
    assert consumer.catch_up() == 0


def test_a_re_timing_that_changes_the_url_queues_the_ready_hook(hook_app: Flask) -> None:
    before_the_copy(hook_app)
    assert [recording["recording_url"] for _, recording in outbox(hook_app)] == [URL_A]
    assert apply(hook_app, A, 1) == DUPLICATE  # the re-timing makes B's URL the recording's
    rows = outbox(hook_app)
    assert [recording["recording_url"] for _, recording in rows] == [URL_A, URL_B]
    assert rows[1][1] == get(hook_app, "S")  # the recording as the single GET shows it at that commit
    assert rows[0][0] != rows[1][0]  # a task of its own, not a repeat of the first send
    assert apply(hook_app, B, 4) == DUPLICATE  # re-timed, URL unchanged: nothing more to send
    assert len(outbox(hook_app)) == 2
