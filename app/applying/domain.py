"""What an event does to a recording.

``merge`` holds the rules and touches only objects in memory; ``apply_event`` runs it in one
transaction under a row lock (``stage_event`` does the same work and leaves the transaction open).
Every rule compares order keys instead of trusting the order in which workers happen to apply
events, so the result equals applying the events in arrival order.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, false, select
from sqlalchemy.orm import Session, joinedload, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from app.applying.hooks import stage as stage_hook
from app.base.timeutil import order_key, utcnow
from app.payload.africastalking import IN_PROGRESS
from app.payload.events import Event
from app.records.changes import mark_changed
from app.records.models import Participant, VoiceRecording, WebhookEvent

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
    if recording.status != COMPLETED and (
        event.status == COMPLETED or _replaces(recording.status, recording.status_key, event.status, key)
    ):
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
    if _replaces(participant.status, participant.status_key, event.status, key):
        participant.status, participant.status_key = event.status, key
    if event.duration is not None and (participant.duration_key is None or key > participant.duration_key):
        participant.duration, participant.duration_key = event.duration, key
    if (participant.status, participant.duration) != before:
        participant.updated_at = now


def rebuild(recording: VoiceRecording, events: list[tuple[Event, datetime]], now: datetime) -> bool:
    """Derive a recording afresh from all its distinct events; True when anything visible changed.

    Needed when an event's arrival time moves earlier (a duplicate that arrived first was applied
    second), which the incremental keys of ``merge`` cannot undo.
    """
    if not events:
        raise ValueError("a recording has at least one event")
    fresh = VoiceRecording(id=recording.id, status="", status_key="", created_at=min(t for _, t in events))
    fresh.participants = []
    for event, received_at in sorted(events, key=lambda item: order_key(item[1], item[0].fingerprint)):
        merge(fresh, event, received_at, order_key(received_at, event.fingerprint), now)

    before = _view(recording)
    for name in ("status", "status_key", "duration", "recording_url", "url_key", "created_at"):
        setattr(recording, name, getattr(fresh, name))
    current = {p.phone_number: p for p in recording.participants}
    for derived in fresh.participants:
        existing = current.get(derived.phone_number)
        if existing is None:
            recording.participants.append(derived)
            continue
        changed = (existing.status, existing.duration) != (derived.status, derived.duration)
        for name in ("status", "status_key", "duration", "duration_key"):
            setattr(existing, name, getattr(derived, name))
        if changed:
            existing.updated_at = now
    changed = _view(recording) != before
    if changed:
        recording.processed_at = now
    return changed


def _replaces(current: str, current_key: str, status: str, key: str) -> bool:
    """Whether an event's status takes the place of the current one: a later event does, but a
    live call's in-progress never takes the place of a terminal status, whatever the order."""
    if not current:
        return True
    if status == IN_PROGRESS:
        return current == IN_PROGRESS and key > current_key
    return current == IN_PROGRESS or key > current_key


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
    try:
        outcome, wrote = stage_event(session, event, received_at, clock=clock)
        if wrote:
            session.commit()
        else:
            session.rollback()
        return outcome
    except BaseException:
        session.rollback()
        raise


def stage_event(
    session: Session,
    event: Event,
    received_at: datetime,
    *,
    clock: Callable[[], datetime] = utcnow,
) -> tuple[str, bool]:
    """Everything ``apply_event`` does but end the transaction: returns the outcome, and whether
    anything was written (a duplicate that arrived no earlier than the stored copy writes nothing).

    The caller commits or rolls back. Several events staged in one transaction keep their
    recordings' row locks (PostgreSQL) until then, and a later event sees the earlier ones' rows.
    """
    fingerprint = event.fingerprint
    key = order_key(received_at, fingerprint)
    recording, stored_at = _lock_recording(session, event, received_at, clock())

    url_before = recording.recording_url
    if stored_at is not None:
        if received_at >= stored_at:
            return DUPLICATE, False
        # The copy that arrived first was applied second: it is the event's arrival time.
        stored = session.scalars(select(WebhookEvent).where(WebhookEvent.fingerprint == fingerprint)).one()
        stored.received_at = received_at
        if _rebuild_from_events(session, recording, clock()):
            _announce(session, recording, url_before)
        return DUPLICATE, True

    changed = merge(recording, event, received_at, key, clock())
    outcome = APPLIED if changed else NO_EFFECT
    if changed:
        _announce(session, recording, url_before)
    # A plain INSERT: nothing in this transaction reads the row back as an object, and the unit of
    # work's bookkeeping for it cost more CPU than the statement.
    session.execute(EVENT_INSERT, {
        "recording_id": event.session_id, "fingerprint": fingerprint, "received_at": received_at,
        "phone_number": event.phone_number, "status": event.status, "duration": event.duration,
        "recording_url": event.recording_url, "outcome": outcome, "payload": event.payload,
    })
    return outcome, True


EVENT_INSERT = WebhookEvent.__table__.insert()


def _rebuild_from_events(session: Session, recording: VoiceRecording, now: datetime) -> bool:
    session.flush()
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.recording_id == recording.id))
    return rebuild(recording, [(stored_event(row), row.received_at) for row in rows], now)


def _announce(session: Session, recording: VoiceRecording, url_before: str | None) -> None:
    """In the changing transaction: move the recording to the change feed's end, and queue the
    ready hook when its URL was set or changed; both commit with the change or not at all."""
    mark_changed(session, recording)
    stage_hook(session, recording, url_before)


def stored_event(row: WebhookEvent) -> Event:
    return Event(row.recording_id, row.status, row.phone_number, row.recording_url, row.duration, dict(row.payload))


def _lock_recording(
    session: Session, event: Event, received_at: datetime, now: datetime
) -> tuple[VoiceRecording, datetime | None]:
    """The event's recording, created or locked by one statement, and the arrival time of the
    event's stored copy (None when there is none).

    An upsert whose update never applies (``WHERE false``) either inserts the row, or takes the
    existing row's lock without writing a new version of it: PostgreSQL locks a conflicting row
    (FOR UPDATE) before it tests the update's condition, and keeps the lock; SQLite's writer holds
    its lock from BEGIN IMMEDIATE. A row this transaction created has no participants and no
    events yet (their foreign keys name it; an event's fingerprint covers its session id), so
    nothing more is read. An existing one is read afresh with its participants and the stored
    copy's arrival time, in one statement that starts after the lock is held: under READ
    COMMITTED its snapshot then holds whatever the lock's previous holder committed.
    """
    dialect = session.connection().dialect.name
    upsert, read = recording_upsert(dialect), _read_statement(dialect)
    created = session.execute(upsert, new_recording_row(event.session_id, received_at, now)).first()
    if created is not None and identity_key(VoiceRecording, event.session_id) not in session.identity_map:
        return adopt_created(session, event.session_id, received_at, now), None
    recording, received = session.execute(read, {"rid": event.session_id, "fp": event.fingerprint}).unique().one()
    return recording, received


def new_recording_row(recording_id: str, created_at: datetime, now: datetime) -> dict[str, Any]:
    """A recording's row as the upsert creates it: no status, duration or URL yet."""
    return {"id": recording_id, "status": "", "status_key": "", "created_at": created_at, "processed_at": now,
            "change_position": 0}


def adopt_created(session: Session, recording_id: str, created_at: datetime, now: datetime) -> VoiceRecording:
    """The row the upsert just created (``new_recording_row``), made the session's without reading
    it back: it has no participants and no events yet."""
    recording = VoiceRecording(**new_recording_row(recording_id, created_at, now), duration=None,
                               recording_url=None, url_key=None)
    recording.participants = []
    make_transient_to_detached(recording)
    session.add(recording)
    return recording


@functools.cache
def recording_upsert(dialect: str) -> Any:
    """Create a recording, or take the existing row's lock without writing (see
    ``_lock_recording``); returns the id of a row it created. Its values are the parameters it is
    executed with (one ``new_recording_row``), or ``.values([...])`` for several rows at once.
    Built once per dialect: building it, the ``excluded`` alias above all, cost more CPU than
    running it."""
    table = VoiceRecording.__table__
    insert = dialect_insert(dialect)(table)
    return (insert.on_conflict_do_update(index_elements=["id"], set_={"id": insert.excluded.id}, where=false())
            .returning(table.c.id))


@functools.cache
def _read_statement(dialect: str) -> Any:
    """``_lock_recording``'s read, built once per dialect: the recording with its participants and
    the arrival time of the event's stored copy."""
    stored_at = select(WebhookEvent.received_at).where(WebhookEvent.fingerprint == bindparam("fp"))
    return (
        select(VoiceRecording, stored_at.scalar_subquery())
        .where(VoiceRecording.id == bindparam("rid"))
        .options(joinedload(VoiceRecording.participants))
        .execution_options(populate_existing=True)
    )


# The supported databases; both have INSERT ... ON CONFLICT DO NOTHING.
_DIALECTS = ("postgresql", "sqlite")


def dialect_insert(dialect: str) -> Any:
    """The dialect's own INSERT. Its module came with the engine, so a worker on SQLite does not
    load PostgreSQL's dialect (about 2.5 MB) and one on PostgreSQL does not load SQLite's."""
    if dialect not in _DIALECTS:
        raise KeyError(dialect)
    return importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
