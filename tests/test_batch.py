"""apply_batch against real databases (SQLite and PostgreSQL): several events in one transaction
give what applying them one by one gives, and a failure leaves nothing."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.applying.batch import apply_batch
from app.applying.domain import APPLIED, NO_EFFECT, apply_event
from app.base.extensions import db
from app.payload.events import Event
from app.records.models import HookOutbox, VoiceRecording, WebhookEvent
from tests.test_domain import P1, P2, URL, at, counts, ev

URL2 = "https://voice.africastalking.com/recordings/f6e5d4c3b2a1.mp3"
_runs = itertools.count()


def state(prefix: str) -> dict[str, Any]:
    """Every recording under ``prefix`` as a client sees it, with its stored events' arrival
    times; session ids without the prefix, so two worlds compare."""
    found = {}
    query = select(VoiceRecording).where(VoiceRecording.id.startswith(prefix))
    for recording in db.session.scalars(query):
        events = db.session.execute(select(WebhookEvent.status, WebhookEvent.phone_number, WebhookEvent.duration,
                                           WebhookEvent.recording_url, WebhookEvent.received_at)
                                    .where(WebhookEvent.recording_id == recording.id)).all()
        found[recording.id.removeprefix(prefix)] = (
            recording.status, recording.duration, recording.recording_url, recording.created_at,
            recording.status_key.split(":")[0] if recording.status_key else None,
            sorted((p.phone_number, p.status, p.duration) for p in recording.participants),
            sorted(tuple(map(str, row)) for row in events),
        )
    db.session.rollback()
    return found


def renamed(event: Event, prefix: str) -> Event:
    payload = {**event.payload, "sessionId": prefix + event.session_id}
    return Event(prefix + event.session_id, event.status, event.phone_number, event.recording_url, event.duration,
                 payload)


deliveries = st.lists(
    st.tuples(
        st.sampled_from(["A", "B", "C"]),
        st.sampled_from(["in-progress", "busy", "no-answer", "completed"]),
        st.sampled_from([P1, P2, None]),
        st.sampled_from([None, 0, 30, 420]),
        st.sampled_from([None, URL, URL2]),
        st.integers(0, 40),  # arrival, seconds
    ),
    min_size=1, max_size=24,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(made=deliveries, cuts=st.lists(st.integers(1, 24), max_size=4), copies=st.lists(st.integers(0, 23), max_size=6))
def test_a_batch_gives_what_one_by_one_gives(app: Flask, made: list[tuple], cuts: list[int],
                                             copies: list[int]) -> None:
    """Any events, copies of them (arriving earlier or later), cut into batches anyhow: the
    batches, with what they leave to ``apply_event`` applied after each commit, end where
    ``apply_event`` one event at a time ends."""
    # Arrival times distinct (within a second of each other at most): two events arriving at once
    # are ordered by fingerprint, which covers the session id, and the two worlds' ids differ.
    items = [(ev(s, status, phone, duration, url if status == "completed" else None), at(t + i / 1000))
             for i, (s, status, phone, duration, url, t) in enumerate(made)]
    items += [(items[i % len(items)][0], at(41 + n)) for n, i in enumerate(copies)]  # later copies
    items += [(items[i % len(items)][0], at(-1 - n)) for n, i in enumerate(copies[:2])]  # earlier ones
    run = next(_runs)
    one, many = f"o{run}_", f"m{run}_"
    bounds = sorted({0, len(items), *[c for c in cuts if c < len(items)]})
    with app.app_context():
        for event, received_at in items:
            apply_event(db.session, renamed(event, one), received_at)
        for start, end in itertools.pairwise(bounds):
            batch = [(renamed(event, many), received_at) for event, received_at in items[start:end]]
            outcomes = apply_batch(db.session, batch)
            assert set(outcomes) <= {APPLIED, NO_EFFECT, None}
            for (event, received_at), outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    apply_event(db.session, event, received_at)
        assert state(many) == state(one)


def test_what_a_batch_leaves_is_a_stored_copy_or_a_second_one_of_the_batch(app: Flask) -> None:
    first = (ev("S", "busy", P1), at(10))
    with app.app_context():
        assert apply_batch(db.session, [first]) == [APPLIED]
        outcomes = apply_batch(db.session, [(first[0], at(5)), (ev("S", "completed", P2, 30, URL), at(20)),
                                            (ev("T", "busy", P1), at(21)), (ev("T", "busy", P1), at(22))])
        assert outcomes == [None, APPLIED, APPLIED, None]
        assert counts() == (2, 3, 3)


def test_a_failed_batch_leaves_nothing(app: Flask) -> None:
    """A failure at the batch's last statement (an event row that cannot be written), after the
    upsert created a recording and the flush wrote the others' changes, rolls all of it back."""
    unwritable = ev("S", "busy", P2)
    unwritable.payload["extra"] = object()  # no JSON for it: the events' INSERT raises
    with app.app_context():
        apply_batch(db.session, [(ev("R", "busy", P1), at(1))])
        with pytest.raises(Exception, match="JSON serializable"):
            apply_batch(db.session, [(ev("R", "completed", P1, 30, URL), at(2)), (unwritable, at(3))])
        assert counts() == (1, 1, 1)
        assert db.session.get(VoiceRecording, "R").status == "busy"


def test_a_batch_changes_its_recordings_in_one_position_past_every_earlier_one(app: Flask) -> None:
    with app.app_context():
        apply_event(db.session, ev("Q", "busy", P1), at(0))
        before = db.session.scalar(select(VoiceRecording.change_position).where(VoiceRecording.id == "Q"))
        apply_batch(db.session, [(ev("R", "busy", P1), at(1)), (ev("S", "busy", P1), at(2)),
                                 (ev("Q", "completed", P1), at(3))])
        positions = dict(db.session.execute(select(VoiceRecording.id, VoiceRecording.change_position)).all())
        db.session.rollback()
        assert positions["R"] == positions["S"] == positions["Q"] > before


def test_a_batch_queues_a_ready_hook_for_each_url_it_sets(make_app: Any, settings: Any) -> None:
    from dataclasses import replace
    app = make_app(replace(settings, voice_hook_task="hooks.recording_ready"))
    with app.app_context():
        apply_batch(db.session, [(ev("R", "completed", P1, 30, URL), at(1)), (ev("S", "completed", P1, 30, URL), at(2)),
                                 (ev("T", "busy", P1), at(3))])
        rows = sorted(db.session.scalars(select(HookOutbox.recording_id)))
        db.session.rollback()
        assert rows == ["R", "S"]


@pytest.mark.postgres
def test_batches_naming_the_same_recordings_in_any_order_do_not_deadlock(make_app: Any, settings: Any,
                                                                        postgresql_url: str) -> None:
    """Two workers' batches over the same recordings, given in opposite orders: each takes its
    row locks in id order, so one waits for the other and neither is chosen as a deadlock's victim."""
    from dataclasses import replace
    app = make_app(replace(settings, database_url=postgresql_url))
    ids = [f"D{i}" for i in range(20)]
    with app.app_context():
        apply_batch(db.session, [(ev(sid, "busy", P1), at(0)) for sid in ids])
    errors: list[BaseException] = []

    def work(order: list[str], base: int) -> None:
        try:
            with app.app_context():
                for round_ in range(10):
                    apply_batch(db.session, [(ev(sid, "no-answer", P2, base + round_), at(base + round_))
                                             for sid in order])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids, 100)), threading.Thread(target=work, args=(ids[::-1], 200))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with app.app_context():
        assert counts() == (20, 40, 20 * 21)
