"""The state rules through the real ``apply_event``, on SQLite and PostgreSQL: whatever order the
events are applied in, the recording ends in the state the contract gives for their arrival order."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

from flask import Flask
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.applying.domain import apply_event, merge
from app.base.extensions import db
from app.base.timeutil import order_key
from app.payload.events import Event
from app.records.models import VoiceRecording
from tests.oracle import arrival_order_state

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
P1, P2 = "+254712345678", "+254787654321"
URL1 = "https://voice.africastalking.com/recordings/one.mp3"
URL2 = "https://voice.africastalking.com/recordings/two.mp3"


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(status: str, phone: str | None = None, duration: int | None = None, url: str | None = None) -> Event:
    fields = {"sessionId": "S", "status": status}
    if phone:
        fields["phoneNumber"] = phone
    if duration is not None:
        fields["duration"] = str(duration)
    if url:
        fields["recordingUrl"] = url
    return Event("S", status, phone, url, duration, fields)


def new_recording(received_at: datetime) -> VoiceRecording:
    """What apply_event inserts before merging the first event."""
    recording = VoiceRecording(id="S", status="", status_key="", created_at=received_at, processed_at=received_at)
    recording.participants = []
    return recording


def in_session(event: Event, session: str) -> Event:
    """The same event for another call session."""
    return Event(session, event.status, event.phone_number, event.recording_url, event.duration,
                 {**event.payload, "sessionId": session})


def apply_in_order(app: Flask, deliveries: list[tuple[Event, datetime]]) -> dict:
    """Apply deliveries with the service's apply_event, in the given processing order, to a call
    session of their own (so examples need no cleanup between them); returns the recording's state."""
    session = f"S_{uuid.uuid4().hex[:12]}"
    with app.app_context():
        for n, (event, received_at) in enumerate(deliveries):
            apply_event(db.session, in_session(event, session), received_at, clock=lambda n=n: at(1000 + n))
        recording = db.session.scalars(
            select(VoiceRecording).where(VoiceRecording.id == session)
            .options(selectinload(VoiceRecording.participants)).execution_options(populate_existing=True)
        ).one()
        found = state(recording)
        db.session.rollback()
    return found


def state(recording: VoiceRecording) -> dict:
    return {
        "status": recording.status,
        "duration": recording.duration,
        "recording_url": recording.recording_url,
        "created_at": recording.created_at,
        "participants": sorted((p.phone_number, p.status, p.duration) for p in recording.participants),
    }


# Two participants: P1 completes with a recording, P2 does not answer (later), and AT delivers
# P1's callback twice (the second delivery arrives last).
TWO_PARTICIPANTS = [
    (ev("completed", P1, 420, URL1), at(10)),
    (ev("no-answer", P2, 0), at(20)),
    (ev("completed", P1, 420, URL1), at(30)),
]


def test_completed_no_answer_duplicate_in_every_order(app: Flask) -> None:
    for order in itertools.permutations(TWO_PARTICIPANTS):  # all 6
        assert apply_in_order(app, list(order)) == {
            "status": "completed",
            "duration": 420,
            "recording_url": URL1,
            "created_at": at(10),
            "participants": sorted([(P1, "completed", 420), (P2, "no-answer", 0)]),
        }, order


MIXED = [
    (ev("in-progress", P1), at(0)),  # a live request: never overrides a terminal status
    (ev("busy", P1, 0), at(1)),
    (ev("no-answer", P2, 0), at(2)),
    (ev("completed", P1, 300, URL1), at(3)),
    (ev("completed", P2, 500, URL2), at(4)),
    (ev("completed", P1, 300), at(5)),  # a later completed without a URL never clears it
    (ev("no-answer", P2, 0), at(6)),  # identical to the second: a duplicate
]


# 5,040 orders; any few dozen reach every transition (first event, older and newer status,
# duplicate arriving first or last, re-timing, URL and duration rules). Hypothesis draws them
# anew on each run and keeps any failing one in its database to try first next time.
@given(order=st.permutations(range(len(MIXED))))
@example(order=list(range(len(MIXED))))
@example(order=list(reversed(range(len(MIXED)))))
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_order_equals_arrival_order(app: Flask, order: list[int]) -> None:
    deliveries = [MIXED[i] for i in order]
    assert apply_in_order(app, deliveries) == arrival_order_state(deliveries)


LIVE = [
    (ev("in-progress", P1), at(1)),
    (ev("no-answer", P2, 0), at(2)),
    (ev("in-progress", P2), at(3)),  # later than P2's terminal status, and still never overrides it
    (ev("in-progress", P1), at(4)),
]


def test_in_progress_never_overrides_a_terminal_status(app: Flask) -> None:
    for order in itertools.permutations(LIVE):  # all 24
        found = apply_in_order(app, list(order))
        assert found["status"] == "no-answer", order
        assert [(phone, status) for phone, status, _ in found["participants"]] == sorted(
            [(P1, "in-progress"), (P2, "no-answer")]), order


RECORDING_STATUS = [
    ([(ev("in-progress", P1), at(1))], "in-progress"),
    ([(ev("in-progress", P1), at(5)), (ev("failed", P1), at(2))], "failed"),
    ([(ev("busy", P1), at(1)), (ev("failed", P1), at(2))], "failed"),
    ([(ev("failed", P1), at(2)), (ev("busy", P1), at(1))], "failed"),  # older event applied late
    ([(ev("completed", P1), at(1)), (ev("no-answer", P2), at(2))], "completed"),
    ([(ev("no-answer", P2), at(2)), (ev("completed", P1), at(1))], "completed"),
    ([(ev("rejected", P2), at(1)), (ev("busy", None), at(2))], "busy"),
]


def test_recording_status(app: Flask) -> None:
    for deliveries, status in RECORDING_STATUS:
        assert apply_in_order(app, deliveries)["status"] == status, deliveries


def test_latest_completed_url_wins_and_duration_is_the_largest(app: Flask) -> None:
    found = apply_in_order(
        app, [(ev("completed", P2, 500, URL2), at(4)), (ev("completed", P1, 900, URL1), at(3)),
              (ev("busy", P1, 1), at(5))]
    )
    assert found["recording_url"] == URL2
    assert found["duration"] == 900


def test_url_of_a_non_completed_event_is_not_kept(app: Flask) -> None:
    assert apply_in_order(app, [(ev("failed", P1, 3, URL1), at(1))])["recording_url"] is None


def test_processed_at_moves_only_when_something_visible_changes() -> None:
    recording = new_recording(at(1))

    def apply(event: Event, received: datetime, now: datetime) -> bool:
        return merge(recording, event, received, order_key(received, event.fingerprint), now)

    assert apply(ev("completed", P1, 420, URL1), at(1), at(100))
    assert recording.processed_at == at(100)
    assert apply(ev("busy", P1), at(3), at(200))  # P1's latest status changes
    assert recording.processed_at == at(200)
    assert not apply(ev("failed", P1), at(2), at(300))  # older than P1's latest: nothing visible moves
    assert recording.processed_at == at(200)
    assert recording.status == "completed"
    assert [(p.status, p.duration) for p in recording.participants] == [("busy", 420)]


def test_event_without_a_phone_number_changes_no_participant(app: Flask) -> None:
    found = apply_in_order(app, [(ev("busy"), at(1))])
    assert found["participants"] == []
    assert found["status"] == "busy"
