"""The state rules, on objects in memory: every order of events gives the arrival-order state."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from app.domain import merge, rebuild
from app.events import Event
from app.models import VoiceRecording
from app.timeutil import order_key
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


def apply_in_order(deliveries: list[tuple[Event, datetime]]) -> VoiceRecording:
    """Apply deliveries in the given processing order, as apply_event does without a database:
    a repeated fingerprint changes nothing unless it arrived earlier, which re-times the event."""
    stored: dict[str, tuple[Event, datetime]] = {}
    recording: VoiceRecording | None = None
    for n, (event, received_at) in enumerate(deliveries):
        now = at(1000 + n)
        if event.fingerprint in stored:
            if received_at < stored[event.fingerprint][1]:
                stored[event.fingerprint] = (event, received_at)
                assert recording is not None
                rebuild(recording, list(stored.values()), now)
            continue
        stored[event.fingerprint] = (event, received_at)
        recording = recording or new_recording(received_at)
        merge(recording, event, received_at, order_key(received_at, event.fingerprint), now)
    assert recording is not None
    return recording


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


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(TWO_PARTICIPANTS)))))
def test_completed_no_answer_duplicate_in_every_order(order: tuple[int, ...]) -> None:
    recording = apply_in_order([TWO_PARTICIPANTS[i] for i in order])
    assert state(recording) == {
        "status": "completed",
        "duration": 420,
        "recording_url": URL1,
        "created_at": at(10),
        "participants": sorted([(P1, "completed", 420), (P2, "no-answer", 0)]),
    }


MIXED = [
    (ev("in-progress", P1), at(0)),  # a live request: never overrides a terminal status
    (ev("busy", P1, 0), at(1)),
    (ev("no-answer", P2, 0), at(2)),
    (ev("completed", P1, 300, URL1), at(3)),
    (ev("completed", P2, 500, URL2), at(4)),
    (ev("completed", P1, 300), at(5)),  # a later completed without a URL never clears it
    (ev("no-answer", P2, 0), at(6)),  # identical to the second: a duplicate
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(MIXED)))))
def test_any_order_equals_arrival_order(order: tuple[int, ...]) -> None:
    deliveries = [MIXED[i] for i in order]
    assert state(apply_in_order(deliveries)) == arrival_order_state(deliveries)


LIVE = [
    (ev("in-progress", P1), at(1)),
    (ev("no-answer", P2, 0), at(2)),
    (ev("in-progress", P2), at(3)),  # later than P2's terminal status, and still never overrides it
    (ev("in-progress", P1), at(4)),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(LIVE)))))
def test_in_progress_never_overrides_a_terminal_status(order: tuple[int, ...]) -> None:
    recording = apply_in_order([LIVE[i] for i in order])
    assert recording.status == "no-answer"
    assert sorted((p.phone_number, p.status) for p in recording.participants) == sorted(
        [(P1, "in-progress"), (P2, "no-answer")])


@pytest.mark.parametrize(
    ("deliveries", "status"),
    [
        ([(ev("in-progress", P1), at(1))], "in-progress"),
        ([(ev("in-progress", P1), at(5)), (ev("failed", P1), at(2))], "failed"),
        ([(ev("busy", P1), at(1)), (ev("failed", P1), at(2))], "failed"),
        ([(ev("failed", P1), at(2)), (ev("busy", P1), at(1))], "failed"),  # older event applied late
        ([(ev("completed", P1), at(1)), (ev("no-answer", P2), at(2))], "completed"),
        ([(ev("no-answer", P2), at(2)), (ev("completed", P1), at(1))], "completed"),
        ([(ev("rejected", P2), at(1)), (ev("busy", None), at(2))], "busy"),
    ],
)
def test_recording_status(deliveries: list, status: str) -> None:
    assert apply_in_order(deliveries).status == status


def test_latest_completed_url_wins_and_duration_is_the_largest() -> None:
    recording = apply_in_order(
        [(ev("completed", P2, 500, URL2), at(4)), (ev("completed", P1, 900, URL1), at(3)), (ev("busy", P1, 1), at(5))]
    )
    assert recording.recording_url == URL2
    assert recording.duration == 900


def test_url_of_a_non_completed_event_is_not_kept() -> None:
    assert apply_in_order([(ev("failed", P1, 3, URL1), at(1))]).recording_url is None


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


def test_event_without_a_phone_number_changes_no_participant() -> None:
    recording = apply_in_order([(ev("busy"), at(1))])
    assert recording.participants == []
    assert recording.status == "busy"
