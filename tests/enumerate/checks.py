"""Settling and the invariants a fault run must leave true, read from the service's stores.

Everything is scoped to the run's own session id (the marker), so a run that broke something does
not make the lane's later runs look broken too.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.enumerate.lane import Lane

PENDING_DATA = "voice:pending:data"
PENDING_DUE = "voice:pending:due"
DEAD_LETTER_LIST = "voice:dead-letters"
# Nothing busy this long (no pending entry, no dead letter in Redis, no outbox row, no task in
# the broker): nothing is left that could still change the outcome.
QUIET_SECONDS = 3.0


@dataclass
class Expect:
    """What a run's events must come to."""

    marker: str
    applied: list[int] = field(default_factory=list)  # durations of events answered 200: one row each
    gone: list[int] = field(default_factory=list)  # durations of events pruned on purpose: no row
    dead_letters_ok: bool = False  # a dead letter is a right outcome of this path (then it is replayed)
    hooks: bool = False  # check the ready-hook messages of the recording


def first_sent(plans: Path, marker: str) -> dict[int, datetime]:
    """For each event of the session, the earliest received_at the web gave a copy it published."""
    found: dict[int, datetime] = {}
    path = plans / f"{marker}.sent"
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("received_at") is None or record.get("duration") is None:
            continue
        moment = datetime.fromisoformat(record["received_at"])
        duration = int(record["duration"])
        if duration not in found or moment < found[duration]:
            found[duration] = moment
    return found


def marked(values: list[bytes], marker: str) -> int:
    return sum(1 for value in values if marker.encode() in value)


def busy(lane: Lane, marker: str) -> list[str]:
    """What could still change the run's outcome: the sweeper's work and tasks in the broker."""
    found = []
    if marked(lane.client.hvals(PENDING_DATA), marker):
        found.append("pending entry")
    if marked(lane.client.lrange(DEAD_LETTER_LIST, 0, -1), marker):
        found.append("dead letter held in Redis")
    if lane.query("SELECT count(*) FROM hook_outbox WHERE recording_id = %s", marker)[0][0]:
        found.append("hook outbox row")
    if not found and not lane.broker_idle():
        found.append("task in the broker")
    return found


def broken_invariants(lane: Lane, expect: Expect, final: bool = True) -> list[str]:
    """The invariants that do not hold, each with what was seen."""
    marker = expect.marker
    broken = []
    rows = lane.query("SELECT duration, received_at FROM webhook_events WHERE recording_id = %s", marker)
    counts = Counter(duration for duration, _ in rows)
    arrivals = first_sent(lane.plans, marker)
    for duration in expect.applied:
        if counts[duration] == 0:
            broken.append(f"applied exactly once (event {duration} lost)")
        elif counts[duration] > 1:
            broken.append(f"applied exactly once (event {duration} stored {counts[duration]} times)")
        else:
            stored = next(moment for d, moment in rows if d == duration)
            if duration not in arrivals:
                broken.append(f"first arrival (no publish of event {duration} was seen)")
            elif stored != arrivals[duration]:
                broken.append(f"first arrival (event {duration} stored at {stored.isoformat()}, "
                              f"first published at {arrivals[duration].isoformat()})")
    for duration in expect.gone:
        if counts[duration]:
            broken.append(f"pruned (event {duration} still stored)")
    unexpected = set(counts) - set(expect.applied) - set(expect.gone)
    if unexpected:
        broken.append(f"applied exactly once (events never answered 200 stored: {sorted(unexpected)})")
    letters = Counter(int(message["message"]["duration"]) for (message,) in lane.query(
        "SELECT message FROM dead_letters WHERE session_id = %s", marker))
    for duration, count in letters.items():
        if count > 1:
            broken.append(f"dead letter listed exactly once (event {duration} listed {count} times)")
        if not expect.dead_letters_ok:
            broken.append(f"not dead-lettered (event {duration} gave up after one fault)")
    if marked(lane.client.lrange(DEAD_LETTER_LIST, 0, -1), marker):
        broken.append("dead letter listed (still held in Redis, not in the table)")
    if marked(lane.client.hvals(PENDING_DATA), marker):
        broken.append("pending set empty")
    if lane.query("SELECT count(*) FROM hook_outbox WHERE recording_id = %s", marker)[0][0]:
        broken.append("hook outbox empty")
    if final and expect.hooks:
        broken += hook_invariants(lane, marker)
    return broken


def _hook_view(recording: dict[str, Any]) -> dict[str, Any]:
    """What a ready hook announces: the recording's state, not its timestamps."""
    return {"recording_id": recording.get("recording_id"), "status": recording.get("status"),
            "duration": recording.get("duration"), "recording_url": recording.get("recording_url"),
            "participants": sorted((p.get("phone_number"), p.get("status"), p.get("duration"))
                                   for p in recording.get("participants", []))}


def hook_invariants(lane: Lane, marker: str) -> list[str]:
    """A recording that became ready had its hook task sent, the latest state last: as the queue
    holds them, and as a consumer that ignores a task id it has seen (what the ids are for) sees
    them."""
    recording = lane.recording(marker)
    if recording is None or not recording.get("recording_url"):
        return []
    latest = _hook_view(recording)
    mine = [m for m in lane.hook_messages() if m["recording"].get("recording_id") == marker]
    if not mine:
        return ["hook sent (no hook task for a ready recording)"]
    broken = []
    if _hook_view(mine[-1]["recording"]) != latest:
        broken.append(f"hook latest last (last of {len(mine)} sent holds "
                      f"{mine[-1]['recording'].get('recording_url')}, the recording {latest['recording_url']})")
    seen: set[str] = set()
    consumed = []
    for message in mine:
        if message["id"] not in seen:
            seen.add(message["id"])
            consumed.append(message)
    if _hook_view(consumed[-1]["recording"]) != latest:
        broken.append(f"hook latest last as a consumer sees it (a repeated task id hides "
                      f"{latest['recording_url']}; ids {[m['id'][:8] for m in mine]})")
    return broken


def settle(lane: Lane, expect: Expect, timeout: float) -> float:
    """Until nothing that could change the outcome is left and the invariants hold, or nothing
    has been left for QUIET_SECONDS, or ``timeout``; returns how long it took."""
    started = time.monotonic()
    quiet_since: float | None = None
    while time.monotonic() - started < timeout:
        if lane.restart_worker_if_dead():  # restart what died, also while the service settles
            quiet_since = None
        if busy(lane, expect.marker):
            quiet_since = None
        else:
            if not broken_invariants(lane, expect, final=False):
                break
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET_SECONDS:
                break
        time.sleep(0.5)
    return time.monotonic() - started


def unreplayed_dead_letters(lane: Lane, marker: str) -> list[int]:
    return [letter_id for (letter_id,) in lane.query(
        "SELECT id FROM dead_letters WHERE session_id = %s AND replayed_at IS NULL ORDER BY id", marker)]
