"""What an event does to a recording.

``merge`` holds the rules and touches only objects in memory; ``apply_event`` runs it in one
transaction under a row lock. Every rule compares order keys instead of trusting the order in
which workers happen to apply events, so the result equals applying the events in arrival order.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from app.events import Event
from app.models import Participant, VoiceRecording, WebhookEvent
from app.timeutil import order_key, utcnow

COMPLETED = "completed"

APPLIED = "applied"  # a new event that changed the recording
NO_EFFECT = "no_effect"  # a new event, stored, that changed nothing visible (older, or same state)
DUPLICATE = "duplicate"  # an event already stored: nothing written


def _view(recording: VoiceRecording) -> tuple[Any, ...]:
    return (
        recording.status,
        recording.duration,
        recording.recording_url,
        recording.created_at,
        tuple((p.phone_number, p.status, p.duration) for p in recording.participants),
    )


def merge(recording: VoiceRecording, event: Event, received_at: datetime, key: str, now: datetime) -> bool:
    """Fold one event into a recording; True when anything a client can see changed."""
    before = _view(recording)

    if received_at < recording.created_at:
        recording.created_at = received_at
    # completed is final; otherwise the latest event by arrival decides.
    if recording.status != COMPLETED and (event.status == COMPLETED or key > recording.status_key):
        recording.status, recording.status_key = event.status, key
    if event.duration is not None and (recording.duration is None or event.duration > recording.duration):
        recording.duration = event.duration
    if event.status == COMPLETED and event.recording_url and (recording.url_key is None or key > recording.url_key):
        recording.recording_url, recording.url_key = event.recording_url, key

    if event.phone_number is not None:
        _merge_participant(recording, event, key, now)

    changed = _view(recording) != before
    if changed:
        recording.processed_at = now
    return changed


def _merge_participant(recording: VoiceRecording, event: Event, key: str, now: datetime) -> None:
    participant = next((p for p in recording.participants if p.phone_number == event.phone_number), None)
    if participant is None:
        recording.participants.append(
            Participant(
                phone_number=event.phone_number,
                status=event.status,
                status_key=key,
                duration=event.duration,
                duration_key=key if event.duration is not None else None,
                updated_at=now,
            )
        )
        return
    before = (participant.status, participant.duration)
    if key > participant.status_key:
        participant.status, participant.status_key = event.status, key
    if event.duration is not None and (participant.duration_key is None or key > participant.duration_key):
        participant.duration, participant.duration_key = event.duration, key
    if (participant.status, participant.duration) != before:
        participant.updated_at = now


def apply_event(
    session: Session,
    event: Event,
    received_at: datetime,
    *,
    clock: Callable[[], datetime] = utcnow,
) -> str:
    """Apply one event in one transaction and commit; returns APPLIED, NO_EFFECT or DUPLICATE.

    Concurrent calls for one session serialize on the recording's row lock (PostgreSQL) or on
    SQLite's single writer, and the event fingerprint is checked under that lock, so neither an
    update nor a duplicate slips through.
    """
    fingerprint = event.fingerprint
    key = order_key(received_at, fingerprint)
    try:
        _ensure_recording(session, event.session_id, received_at, clock())
        recording = session.execute(
            select(VoiceRecording)
            .where(VoiceRecording.id == event.session_id)
            .options(selectinload(VoiceRecording.participants))
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()

        if session.scalar(select(WebhookEvent.id).where(WebhookEvent.fingerprint == fingerprint)) is not None:
            session.rollback()
            return DUPLICATE

        changed = merge(recording, event, received_at, key, clock())
        outcome = APPLIED if changed else NO_EFFECT
        session.add(
            WebhookEvent(
                recording_id=event.session_id,
                fingerprint=fingerprint,
                received_at=received_at,
                phone_number=event.phone_number,
                status=event.status,
                duration=event.duration,
                recording_url=event.recording_url,
                outcome=outcome,
                payload=event.payload,
            )
        )
        session.commit()
        return outcome
    except BaseException:
        session.rollback()
        raise


def _ensure_recording(session: Session, session_id: str, received_at: datetime, now: datetime) -> None:
    """Create the recording if no event made it yet; a concurrent creator wins silently."""
    values = {
        "id": session_id,
        "status": "",
        "status_key": "",
        "created_at": received_at,
        "processed_at": now,
    }
    dialect = session.get_bind().dialect.name
    statement = _INSERTS[dialect](VoiceRecording).values(values).on_conflict_do_nothing(index_elements=["id"])
    session.execute(statement)


# The supported databases; both have INSERT ... ON CONFLICT DO NOTHING.
_INSERTS = {"postgresql": pg_insert, "sqlite": sqlite_insert}
