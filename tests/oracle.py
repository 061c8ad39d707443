"""The contract's rules stated directly, as a reference to compare the service's state against."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from app.payload.events import Event


def identity(event: Event) -> str:
    """What makes two deliveries one event, as the contract says: equal decoded fields. Stated
    here on the fields as sent, not with the service's fingerprint, which is what is under test."""
    return json.dumps(event.payload, sort_keys=True, default=str)


def arrival_order_state(deliveries: Iterable[tuple[Event, datetime]]) -> dict[str, Any]:
    """The recording that distinct events give in arrival order (first copy of each counts):
    completed once any event says so; else the latest terminal status; else the latest
    in-progress."""
    first: dict[str, tuple[Event, datetime]] = {}
    for event, received_at in deliveries:
        key = identity(event)
        if key not in first or received_at < first[key][1]:
            first[key] = (event, received_at)
    events = sorted(first.values(), key=lambda item: item[1])  # the callers' arrival times are distinct
    terminal = [e for e, _ in events if e.status != "in-progress"]
    completed = [e for e, _ in events if e.status == "completed"]
    with_url = [e for e in completed if e.recording_url]
    durations = [e.duration for e, _ in events if e.duration is not None]
    participants = {}
    for phone in {e.phone_number for e, _ in events if e.phone_number}:
        mine = [e for e, _ in events if e.phone_number == phone]
        mine_terminal = [e for e in mine if e.status != "in-progress"]  # in-progress never overrides
        timed = [e.duration for e in mine if e.duration is not None]
        participants[phone] = (phone, (mine_terminal or mine)[-1].status, timed[-1] if timed else None)
    return {
        "status": "completed" if completed else (terminal or [e for e, _ in events])[-1].status,
        "duration": max(durations) if durations else None,
        "recording_url": with_url[-1].recording_url if with_url else None,
        "created_at": events[0][1],
        "participants": sorted(participants.values()),
    }
