"""apply_event against real databases (SQLite and PostgreSQL): one transaction, row lock, no lost update."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import Engine, func, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from app.applying.domain import APPLIED, DUPLICATE, NO_EFFECT, apply_event, stage_event
from app.base.extensions import db
from app.payload.events import Event
from app.records.models import Participant, VoiceRecording, WebhookEvent
from tests.support import wait_for

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
P1, P2 = "+254712345678", "+254787654321"
URL = "https://voice.africastalking.com/recordings/a1b2c3d4e5f6.mp3"


def ev(session: str, status: str, phone: str | None = None, duration: int | None = None,
       url: str | None = None) -> Event:
    fields = {"sessionId": session, "status": status}
    if phone:
        fields["phoneNumber"] = phone
    if duration is not None:
        fields["duration"] = duration
    if url:
        fields["recordingUrl"] = url
    return Event(session, status, phone, url, duration, fields)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def counts() -> tuple[int, int, int]:
    return (
        db.session.scalar(select(func.count()).select_from(VoiceRecording)),
        db.session.scalar(select(func.count()).select_from(Participant)),
        db.session.scalar(select(func.count()).select_from(WebhookEvent)),
    )


def test_first_event_creates_the_recording(app: Flask) -> None:
    with app.app_context():
        assert apply_event(db.session, ev("S", "completed", P1, 420, URL), at(0), clock=lambda: at(7)) == APPLIED
        recording = db.session.get(VoiceRecording, "S")
        assert (recording.status, recording.duration, recording.recording_url) == ("completed", 420, URL)
        assert recording.created_at == at(0)
        assert recording.processed_at == at(7)
        assert recording.created_at.tzinfo is not None
        assert [(p.phone_number, p.status, p.duration) for p in recording.participants] == [(P1, "completed", 420)]
        assert counts() == (1, 1, 1)


def test_same_event_twice_is_stored_once(app: Flask) -> None:
    with app.app_context():
        event = ev("S", "completed", P1, 420, URL)
        assert apply_event(db.session, event, at(0)) == APPLIED
        assert apply_event(db.session, event, at(5)) == DUPLICATE
        assert counts() == (1, 1, 1)
        assert db.session.scalar(select(WebhookEvent.received_at)) == at(0)


def test_duplicate_that_arrived_first_re_times_the_event(app: Flask) -> None:
    with app.app_context():
        apply_event(db.session, ev("S", "no-answer", P2, 0), at(20))
        apply_event(db.session, ev("S", "busy", P1, 0), at(30))  # the later copy applied first
        assert apply_event(db.session, ev("S", "busy", P1, 0), at(10)) == DUPLICATE
        recording = db.session.get(VoiceRecording, "S")
        assert recording.created_at == at(10)
        assert recording.status == "no-answer"  # P2's event is now the latest
        assert counts() == (1, 2, 2)


def test_completed_is_never_downgraded_and_url_never_cleared(app: Flask) -> None:
    with app.app_context():
        apply_event(db.session, ev("S", "completed", P1, 420, URL), at(0))
        assert apply_event(db.session, ev("S", "no-answer", P2, 0), at(10)) == APPLIED  # a new participant
        assert apply_event(db.session, ev("S", "completed", P1, 421), at(20)) == APPLIED
        recording = db.session.get(VoiceRecording, "S")
        assert (recording.status, recording.recording_url, recording.duration) == ("completed", URL, 421)
        participants = {p.phone_number: (p.status, p.duration) for p in recording.participants}
        assert participants == {P1: ("completed", 421), P2: ("no-answer", 0)}


def test_an_event_that_changes_nothing_is_kept_with_its_outcome(app: Flask) -> None:
    with app.app_context():
        apply_event(db.session, ev("S", "completed", P1, 420, URL), at(10), clock=lambda: at(11))
        assert apply_event(db.session, ev("S", "busy", P1), at(5), clock=lambda: at(12)) == APPLIED  # created_at
        assert apply_event(db.session, ev("S", "failed", P1), at(6), clock=lambda: at(13)) == NO_EFFECT
        assert db.session.get(VoiceRecording, "S").processed_at == at(12)
        outcomes = db.session.scalars(select(WebhookEvent.outcome).order_by(WebhookEvent.received_at)).all()
        assert outcomes == [APPLIED, NO_EFFECT, APPLIED]


def test_failed_transaction_leaves_nothing(app: Flask) -> None:
    """A failure after the recording row was inserted rolls the insert back too."""
    calls = []

    def failing_clock() -> datetime:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("fails mid-transaction")
        return at(0)

    with app.app_context():
        with pytest.raises(RuntimeError):
            apply_event(db.session, ev("S", "busy", P1), at(0), clock=failing_clock)
        assert len(calls) == 2
        assert counts() == (0, 0, 0)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_every_order_gives_the_same_state(app: Flask, order: tuple[int, ...]) -> None:
    deliveries = [
        (ev("S", "completed", P1, 420, URL), at(10)),
        (ev("S", "no-answer", P2, 0), at(20)),
        (ev("S", "completed", P1, 420, URL), at(30)),
    ]
    with app.app_context():
        for i in order:
            apply_event(db.session, *deliveries[i])
        recording = db.session.get(VoiceRecording, "S")
        assert (recording.status, recording.duration, recording.recording_url) == ("completed", 420, URL)
        assert recording.created_at == at(10)
        assert sorted((p.phone_number, p.status) for p in recording.participants) == sorted(
            [(P1, "completed"), (P2, "no-answer")]
        )
        assert counts() == (1, 2, 2)


def test_concurrent_participants_on_one_session_lose_no_update(app: Flask) -> None:
    """Many threads, each its own connection, racing events of one new session."""
    phones = [f"+2547000000{i:02d}" for i in range(12)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(phones))

    def send(n: int, phone: str) -> None:
        with app.app_context():
            try:
                barrier.wait()
                status = "completed" if n == 3 else "no-answer"
                apply_event(db.session, ev("RACE", status, phone, n), at(n))
                apply_event(db.session, ev("RACE", status, phone, n), at(n + 100))  # a duplicate too
            except BaseException as exc:
                errors.append(exc)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=send, args=(n, phone)) for n, phone in enumerate(phones)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with app.app_context():
        recording = db.session.get(VoiceRecording, "RACE")
        assert recording.status == "completed"
        assert recording.duration == len(phones) - 1
        assert recording.created_at == at(0)
        assert sorted(p.phone_number for p in recording.participants) == phones
        assert counts() == (1, len(phones), len(phones))


def test_earlier_copies_waiting_on_the_recording_lock_still_re_time_their_events(app: Flask) -> None:
    """Three events of one participant, each applied first from its later copy; then the earlier
    copies come at once: one holds the recording's lock (PostgreSQL row lock, SQLite's writer lock)
    while the other two wait for it. Each one that waited must still re-time its own event, and
    the recording must end as applying the events in arrival order gives, which only holds when
    each rebuild saw every re-timing committed before it (the held one moves its event from the
    latest to the first)."""
    long_call = ev("S", "failed", P1, 1529)
    short_call = ev("S", "failed", P1, 1094)
    unanswered = ev("S", "no-answer", P1, 567)
    first = {unanswered.fingerprint: at(9), long_call.fingerprint: at(10), short_call.fingerprint: at(11)}
    with app.app_context():
        for event, received_at in ((unanswered, at(42)), (short_call, at(41)), (long_call, at(40))):
            apply_event(db.session, event, received_at)
        db.session.remove()
        engine = db.engine
    postgresql = engine.dialect.name == "postgresql"

    outcomes: list[str] = []
    errors: list[BaseException] = []
    beginning = threading.Semaphore(0)

    def about_to_begin(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement == "BEGIN IMMEDIATE":
            beginning.release()

    def apply_earlier(event: Event) -> None:
        with app.app_context():
            try:
                outcomes.append(apply_event(db.session, event, first[event.fingerprint]))
            except BaseException as exc:
                errors.append(exc)
            finally:
                db.session.remove()

    holder = Session(engine)
    try:
        assert stage_event(holder, unanswered, at(9)) == (DUPLICATE, True)  # re-timed, lock kept
        if not postgresql:  # SQLite: the waiters block at BEGIN IMMEDIATE, which comes right after this
            sa_event.listen(engine, "before_cursor_execute", about_to_begin)
        waiters = [threading.Thread(target=apply_earlier, args=(e,)) for e in (short_call, long_call)]
        try:
            for waiter in waiters:
                waiter.start()
            if postgresql:
                wait_for(lambda: _lock_waiters(engine) == len(waiters), timeout=10)
            else:
                for _ in waiters:
                    assert beginning.acquire(timeout=10)
                time.sleep(0.2)  # let both reach the busy wait of BEGIN IMMEDIATE
            assert all(waiter.is_alive() for waiter in waiters)  # neither could go on past the lock
            holder.commit()
        finally:
            if not postgresql:
                sa_event.remove(engine, "before_cursor_execute", about_to_begin)
            for waiter in waiters:
                waiter.join(timeout=30)
    finally:
        holder.close()

    assert errors == []
    assert outcomes == [DUPLICATE, DUPLICATE]
    with app.app_context():
        stored = {row.fingerprint: row.received_at for row in db.session.scalars(select(WebhookEvent))}
        assert stored == first
        recording = db.session.get(VoiceRecording, "S")
        assert (recording.status, recording.duration, recording.created_at) == ("failed", 1529, at(9))
        assert [(p.phone_number, p.status, p.duration) for p in recording.participants] == [(P1, "failed", 1094)]
        assert counts() == (1, 1, 3)


def _lock_waiters(engine: Engine) -> int:
    """Sessions of this database waiting for a lock right now (PostgreSQL)."""
    with engine.connect() as connection:
        return connection.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ))
