"""Several events applied in one transaction, by set-based statements.

``apply_batch`` does what ``domain.apply_event`` does for each event of a batch, with a fixed
number of statements for the whole batch instead of several per event: one upsert creates or locks
every recording the batch names (in one order, so two batches never wait on each other in a
cycle), one read fetches the existing ones with their participants and the stored copies of the
batch's events, ``domain.merge`` folds each event in memory (the same rules, in the same order of
keys), and the writes go out as one statement per kind of row. Everything commits together or
not at all.

An event this path does not decide is left to the one-by-one path (``domain.apply_event``) after
the batch's commit: one whose stored copy exists (a duplicate, or a copy that arrived earlier and
re-times the event), and one whose fingerprint another event of the same batch already has. Its
outcome is returned as None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from app.applying.domain import (
    APPLIED,
    EVENT_INSERT,
    NO_EFFECT,
    adopt_created,
    merge,
    new_recording_row,
    recording_upsert,
)
from app.applying.hooks import stage as stage_hook
from app.base.timeutil import order_key, utcnow
from app.payload.events import Event
from app.records.changes import next_position
from app.records.models import VoiceRecording, WebhookEvent

LEFT = None  # an event left to the one-by-one path


def apply_batch(
    session: Session,
    items: Sequence[tuple[Event, datetime]],
    *,
    clock: Callable[[], datetime] = utcnow,
) -> list[str | None]:
    """Apply ``items`` (each an event and its arrival time) in one transaction and commit; returns
    each item's outcome (APPLIED or NO_EFFECT), or None for one left to ``domain.apply_event``."""
    try:
        outcomes = stage_batch(session, items, clock=clock)
        session.commit()
        return outcomes
    except BaseException:
        session.rollback()
        raise


def stage_batch(
    session: Session,
    items: Sequence[tuple[Event, datetime]],
    *,
    clock: Callable[[], datetime] = utcnow,
) -> list[str | None]:
    """Everything ``apply_batch`` does but end the transaction."""
    outcomes: list[str | None] = [LEFT] * len(items)
    if not items:
        return outcomes
    now = clock()
    taken: set[str] = set()
    first_arrival: dict[str, datetime] = {}
    for event, received_at in items:
        sid = event.session_id
        first_arrival[sid] = min(received_at, first_arrival.get(sid, received_at))
    recordings = _lock_recordings(session, first_arrival, now)
    existing = [sid for sid, recording in recordings.items() if recording is None]
    # A created recording has no events yet, and an event's fingerprint covers its session id:
    # only a batch that names an existing recording can hold an event stored already.
    stored = _stored_copies(session, [event.fingerprint for event, _ in items]) if existing else set()
    recordings.update(_read_recordings(session, existing))

    order = sorted(range(len(items)), key=lambda i: order_key(items[i][1], items[i][0].fingerprint))
    changed: dict[str, VoiceRecording] = {}
    rows = []
    for i in order:
        event, received_at = items[i]
        fingerprint = event.fingerprint
        if fingerprint in stored or fingerprint in taken:
            continue  # LEFT: the one-by-one path decides, after this commit
        taken.add(fingerprint)
        recording = recordings[event.session_id]
        url_before = recording.recording_url
        if merge(recording, event, received_at, order_key(received_at, fingerprint), now):
            outcomes[i] = APPLIED
            changed[recording.id] = recording
            stage_hook(session, recording, url_before)
        else:
            outcomes[i] = NO_EFFECT
        rows.append({
            "recording_id": event.session_id, "fingerprint": fingerprint, "received_at": received_at,
            "phone_number": event.phone_number, "status": event.status, "duration": event.duration,
            "recording_url": event.recording_url, "outcome": outcomes[i], "payload": event.payload,
        })
    if changed:
        # One transaction, one position for every recording it changes (the feed orders by
        # position, then id): what ``changes.mark_changed`` gives each one-event transaction.
        with session.no_autoflush:  # the changes go out below, each recording's in one UPDATE
            position = session.scalar(select(next_position(session.connection().dialect.name)))
        for recording in changed.values():
            recording.change_position = position
    session.flush()
    if rows:
        session.execute(EVENT_INSERT, rows)
    return outcomes


def _lock_recordings(
    session: Session, first_arrival: dict[str, datetime], now: datetime
) -> dict[str, VoiceRecording | None]:
    """Create or lock every recording named, in id order, by one upsert (see
    ``domain._lock_recording``); returns the created ones as the session's objects and None for
    those that existed."""
    ids = sorted(first_arrival)
    upsert = recording_upsert(session.connection().dialect.name)
    created = set(session.scalars(upsert.values([new_recording_row(sid, first_arrival[sid], now) for sid in ids])))
    return {sid: adopt_created(session, sid, first_arrival[sid], now) if sid in created else None for sid in ids}


def _stored_copies(session: Session, fingerprints: list[str]) -> set[str]:
    """Which of ``fingerprints`` are stored already."""
    return set(session.scalars(select(WebhookEvent.fingerprint).where(WebhookEvent.fingerprint.in_(fingerprints))))


def _read_recordings(session: Session, ids: list[str]) -> dict[str, VoiceRecording]:
    """The existing recordings with their participants, read after the upsert took their locks."""
    if not ids:
        return {}
    query = (
        select(VoiceRecording)
        .where(VoiceRecording.id.in_(ids))
        .options(joinedload(VoiceRecording.participants))
        .execution_options(populate_existing=True)
    )
    return {recording.id: recording for recording in session.scalars(query).unique()}
