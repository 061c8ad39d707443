"""Fault scenarios on real processes: each runs a stack, breaks something, and tallies the outcome.

Every scenario uses a redis-server and a PostgreSQL server of its own on free ports (never the
machine's shared ones), real gunicorn and Celery workers, and returns a :class:`Tally`: distinct
events sent, applied, applied twice, lost. ``tests/faults/test_faults.py`` asserts on the tallies;
``python -m tests.faults.run`` repeats scenarios and prints them as a table.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis
from sqlalchemy import create_engine, text

from app.events import FORM, Event, decode_body, parse_event
from tests.e2e.stack import Stack
from tests.oracle import arrival_order_state
from tests.support import PostgresServer, wait_for

STATUSES = ("completed", "failed", "busy", "no-answer", "rejected")
WEBHOOK = "/api/v1/voice/webhook"


@dataclass
class Tally:
    fault: str
    sent: int  # distinct events
    applied: int  # distinct events stored in the database
    applied_twice: int  # events a worker applied more than once (must be 0)
    lost: int  # events sent and answered 200 at last, never stored (must be 0)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.applied_twice == 0 and self.lost == 0 and self.applied == self.sent


# --- events ----------------------------------------------------------------------------------


def make_events(sessions: int, participants: int, per_session: int, seed: int, prefix: str) -> list[dict[str, str]]:
    """Distinct callbacks: ``per_session`` per session, spread over its participants."""
    rng = random.Random(seed)
    events = []
    for s in range(sessions):
        session_id = f"{prefix}_{seed}_{s}"
        phones = [f"+2547{rng.randrange(10**7, 10**8)}" for _ in range(participants)]
        for n in range(per_session):
            status = rng.choice(STATUSES)
            fields = {"sessionId": session_id, "phoneNumber": phones[n % participants], "status": status,
                      "duration": str(rng.randrange(0, 3600) if status == "completed" else 0), "seq": str(n)}
            if status == "completed" and rng.random() < 0.8:
                fields["recordingUrl"] = f"https://voice.africastalking.com/recordings/{session_id}-{n}.mp3"
            events.append(fields)
    return events


def fingerprint(fields: dict[str, str]) -> str:
    return parse_event(decode_body(FORM, urlencode(fields).encode())).fingerprint


# --- posting like Africa's Talking -----------------------------------------------------------


@dataclass
class Attempt:
    status: int  # 0: no HTTP answer (connection refused or dropped)
    seconds: float
    retry_after: str | None = None


def post_once(stack: Stack, fields: dict[str, str]) -> Attempt:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        conn.request("POST", WEBHOOK, urlencode(fields), {"Content-Type": FORM})
        response = conn.getresponse()
        response.read()
        return Attempt(response.status, time.monotonic() - started, response.getheader("Retry-After"))
    except (OSError, http.client.HTTPException):
        return Attempt(0, time.monotonic() - started)
    finally:
        conn.close()


def post_like_at(stack: Stack, fields: dict[str, str], deadline: float, pause: float = 0.2) -> list[Attempt]:
    """Post until answered 200, as AT retries a callback that failed; every attempt is kept."""
    attempts = []
    while True:
        attempt = post_once(stack, fields)
        attempts.append(attempt)
        if attempt.status == 200 or time.monotonic() > deadline:
            return attempts
        time.sleep(pause)


def post_all(stack: Stack, events: list[dict[str, str]], threads: int = 8, timeout: float = 120,
             pace: float = 0.0) -> list[list[Attempt]]:
    """Post every event (retrying like AT) from a pool of threads; ``pace`` spaces the starts."""
    deadline = time.monotonic() + timeout

    def one(item: tuple[int, dict[str, str]]) -> list[Attempt]:
        if pace:
            time.sleep(max(0.0, start + item[0] * pace - time.monotonic()))
        return post_like_at(stack, item[1], deadline)

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(events)))


@contextmanager
def in_background(work: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Run ``work`` in a thread while the block breaks things; its result is in ``box["result"]``."""
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = work()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield box
    finally:
        thread.join()


# --- reading what happened -------------------------------------------------------------------


def stored_events(stack: Stack) -> dict[str, dict[str, Any]]:
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT fingerprint, recording_id, received_at, status, phone_number, duration, recording_url, "
                "payload FROM webhook_events"
            )).mappings().all()
    finally:
        engine.dispose()
    return {row["fingerprint"]: dict(row) for row in rows}


def recordings(stack: Stack) -> dict[str, dict[str, Any]]:
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            found = {r["id"]: dict(r, participants=[]) for r in conn.execute(text(
                "SELECT id, status, duration, recording_url, created_at FROM voice_recordings")).mappings()}
            for p in conn.execute(text("SELECT recording_id, phone_number, status, duration FROM participants")):
                found[p.recording_id]["participants"].append((p.phone_number, p.status, p.duration))
    finally:
        engine.dispose()
    return found


_APPLIED = re.compile(r'"event": "event_applied"')


def applications(stack: Stack) -> Counter[str]:
    """How many times workers applied each event (outcome applied or no_effect), from their logs."""
    counts: Counter[str] = Counter()
    for log in stack.workdir.glob("worker*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not _APPLIED.search(line):
                continue
            entry = json.loads(line)
            if entry.get("outcome") in {"applied", "no_effect"}:
                counts[entry["event_key"]] += 1
    return counts


def sweeper_resent(stack: Stack) -> int:
    """Events the pending-set sweeper sent again (what the broker alone would have lost or delayed)."""
    total = 0
    for log in stack.workdir.glob("worker*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"event": "pending_redelivered"' in line:
                total += json.loads(line)["count"]
    return total


def tally(stack: Stack, fault: str, events: list[dict[str, str]], **notes: Any) -> Tally:
    sent = {fingerprint(fields) for fields in events}
    stored = stored_events(stack)
    applied_counts = applications(stack)
    notes.setdefault("sweeper_resent", sweeper_resent(stack))
    return Tally(
        fault=fault,
        sent=len(sent),
        applied=len(sent & stored.keys()),
        applied_twice=sum(1 for key, n in applied_counts.items() if n > 1) + len(stored.keys() - sent),
        lost=len(sent - stored.keys()),
        notes=notes,
    )


def wait_until_applied(stack: Stack, events: list[dict[str, str]], timeout: float) -> None:
    wanted = {fingerprint(fields): fields for fields in events}
    try:
        wait_for(lambda: wanted.keys() <= stored_events(stack).keys(), timeout=timeout, interval=0.5)
    except TimeoutError:
        missing = wanted.keys() - stored_events(stack).keys()
        client = redis.Redis.from_url(stack.redis.url)
        where = {
            "missing": len(missing),
            "queued": client.llen("voice-webhooks"),
            "unacked": client.hlen("unacked"),
            "pending": client.zcard("voice:pending:due"),
            "dedup_states": Counter((client.get(f"voice:dedup:{key}") or b"none").decode()[:5] for key in missing),
            "examples": [wanted[key]["sessionId"] for key in list(missing)[:3]],
        }
        raise AssertionError(f"events not applied in {timeout}s: {where}") from None


def status_counts(attempts: list[list[Attempt]]) -> dict[str, int]:
    return dict(Counter(str(a.status) for tries in attempts for a in tries))


# --- stacks ----------------------------------------------------------------------------------


@contextmanager
def fault_stack(workdir: Path, **options: Any) -> Iterator[tuple[Stack, PostgresServer]]:
    """A stack on PostgreSQL and Redis servers of its own, both of which the scenario may stop."""
    postgres = PostgresServer().init().start()
    stack = Stack(workdir, postgres.url, **options)
    try:
        yield stack.start(), postgres
    finally:
        stack.stop()
        postgres.remove()


# --- the scenarios ---------------------------------------------------------------------------


def worker_killed(workdir: Path, seed: int = 1) -> Tally:
    """SIGKILL the worker's process group while tasks are in flight, then start it again."""
    events = make_events(sessions=60, participants=3, per_session=5, seed=seed, prefix="kill")
    with fault_stack(workdir, beat=True) as (stack, _pg):
        with in_background(lambda: post_all(stack, events, threads=4, pace=0.01)) as load:
            wait_for(lambda: len(applications(stack)) >= 40, timeout=30)  # the worker is busy
            stack.kill("worker")
            killed_at = time.monotonic()
            time.sleep(1)
            stack.start_worker()
        wait_until_applied(stack, events, timeout=120)
        recovered = round(time.monotonic() - killed_at, 1)
        stack.wait_until_idle()
        return tally(stack, "worker SIGKILLed mid-stream", events, answers=status_counts(load["result"]),
                     all_applied_after_s=recovered)


def taken_but_never_recorded(workdir: Path, seed: int = 2) -> Tally:
    """The Redis transport's gap: messages taken off the queue by a worker that died before it
    recorded them as unacknowledged. Only the pending set and its sweeper can bring them back."""
    events = make_events(sessions=20, participants=2, per_session=2, seed=seed, prefix="gap")
    with fault_stack(workdir, beat=True, PENDING_REDELIVERY_SECONDS="10") as (stack, _pg):
        stack.stop_process("worker")
        answers = post_all(stack, events)
        client = redis.Redis.from_url(stack.redis.url)
        vanished = [client.rpop("voice-webhooks") for _ in range(10)]  # oldest ten, gone
        assert all(vanished) and client.hlen("unacked") == 0  # nowhere for kombu to restore them from
        started = time.monotonic()
        stack.start_worker()
        wait_until_applied(stack, events, timeout=90)
        stack.wait_until_idle()
        return tally(stack, "message taken, worker died before unacked record", events,
                     answers=status_counts(answers), messages_vanished=len(vanished),
                     all_applied_after_s=round(time.monotonic() - started, 1))


def redis_down_at_ingress(workdir: Path, seed: int = 3) -> Tally:
    """Stop Redis while the web takes traffic; bring it back; nothing is restarted but Redis."""
    events = make_events(sessions=40, participants=2, per_session=3, seed=seed, prefix="redis")
    with fault_stack(workdir, persistent_redis=True) as (stack, _pg):
        during: list[Attempt] = []
        first, outage, rest = events[:60], events[60:90], events[90:]
        early = post_all(stack, first)
        stack.redis.stop()
        for fields in outage:  # every answer while Redis is down: 503, Retry-After, within 1 s
            during.append(post_once(stack, fields))
        stack.redis.start()
        later = post_all(stack, outage + rest, timeout=60)  # AT retries what got 503
        wait_until_applied(stack, events, timeout=60)
        stack.wait_until_idle()
        refused = [a for a in during if a.status == 503]
        return tally(stack, "Redis down at ingress", events,
                     answers=status_counts([*early, [*during], *later]),
                     during_outage_503=f"{len(refused)}/{len(during)}",
                     during_outage_200=sum(1 for a in during if a.status == 200),
                     slowest_503_ms=round(max(a.seconds for a in refused) * 1000, 1) if refused else None,
                     retry_after=all(a.retry_after for a in refused))


def database_down(workdir: Path, seed: int = 4) -> Tally:
    """Stop PostgreSQL while events are processed: tasks retry with backoff and apply once it is back."""
    events = make_events(sessions=30, participants=3, per_session=3, seed=seed, prefix="db")
    with fault_stack(workdir) as (stack, postgres):
        half = len(events) // 2
        answers = post_all(stack, events[:half])
        postgres.stop("immediate")
        answers += post_all(stack, events[half:])  # the web does not need the database
        time.sleep(6)  # a few retries' worth of outage
        postgres.start()
        wait_until_applied(stack, events, timeout=90)
        stack.wait_until_idle()
        retries = sum(log.read_text().count('"event": "event_retry"') for log in stack.workdir.glob("worker*.log"))
        return tally(stack, "PostgreSQL down during processing", events, answers=status_counts(answers),
                     retries=retries)


def dead_letters(workdir: Path, seed: int = 5) -> Tally:
    """Retries run out while the database is down: dead letters wait in Redis, are filed in the
    database once it is back, listed, and replayed, each applying once."""
    events = make_events(sessions=4, participants=1, per_session=2, seed=seed, prefix="dead")
    with fault_stack(workdir, EVENT_MAX_RETRIES="2") as (stack, postgres):
        postgres.stop("immediate")
        answers = post_all(stack, events)
        client = redis.Redis.from_url(stack.redis.url)
        wait_for(lambda: client.llen("voice:dead-letters") == len(events), timeout=60)
        postgres.start()
        listed = stack.flask("voice", "dead-letters")
        replayed = stack.flask("voice", "replay", "--all")
        wait_until_applied(stack, events, timeout=60)
        again = stack.flask("voice", "replay", "--all")  # nothing left to replay
        first_id = re.search(r"^\s*(\d+)\s", listed, re.MULTILINE)
        assert first_id is not None, listed
        stack.flask("voice", "replay", first_id.group(1))  # replaying one again: a duplicate
        stack.wait_until_idle()
        return tally(stack, "retries exhausted -> dead letters -> replay", events, answers=status_counts(answers),
                     listed=listed.strip().splitlines()[-1], replayed=replayed.strip(),
                     second_replay=again.strip())


def redis_forgot(workdir: Path, seed: int = 6) -> Tally:
    """Redis loses every key between a delivery and its duplicate: the database fingerprint holds."""
    events = make_events(sessions=10, participants=2, per_session=2, seed=seed, prefix="forgot")
    with fault_stack(workdir) as (stack, _pg):
        post_all(stack, events)
        wait_until_applied(stack, events, timeout=30)
        stack.wait_until_idle()
        redis.Redis.from_url(stack.redis.url).flushall()
        post_all(stack, events)  # every event again
        stack.wait_until_idle()
        duplicates = sum(log.read_text().count('"outcome": "duplicate"') for log in stack.workdir.glob("worker*.log"))
        return tally(stack, "Redis flushed before the duplicates", events, duplicates_seen=duplicates,
                     deliveries=2 * len(events))


def storm(workdir: Path, seed: int = 7, deliveries: int = 5000) -> Tally:
    """5,000 deliveries over 500 sessions of three participants, 30% exact duplicates, shuffled,
    through several worker processes; every recording must equal the arrival-order state."""
    rng = random.Random(seed)
    distinct = make_events(sessions=500, participants=3, per_session=7, seed=seed, prefix="storm")
    duplicates = [rng.choice(distinct) for _ in range(deliveries - len(distinct))]
    stream = distinct + duplicates
    rng.shuffle(stream)
    with fault_stack(workdir, workers=2, worker_concurrency=2) as (stack, _pg):
        started = time.monotonic()
        answers = post_all(stack, stream, threads=16, timeout=300)
        posted = time.monotonic() - started
        wait_until_applied(stack, distinct, timeout=300)
        stack.wait_until_idle(timeout=120)
        elapsed = time.monotonic() - started
        mismatched = mismatched_recordings(stack)
        result = tally(stack, "storm: 5,000 deliveries, 30% duplicates, 4 worker processes", distinct,
                       deliveries=len(stream), answers=status_counts(answers), post_s=round(posted, 1),
                       total_s=round(elapsed, 1), recordings_not_in_arrival_state=len(mismatched))
        result.notes["mismatched_examples"] = mismatched[:3]
        return result


def mismatched_recordings(stack: Stack) -> list[str]:
    """Recordings whose stored state differs from the contract's rules over their stored events."""
    by_recording: dict[str, list[tuple[Event, datetime]]] = {}
    for row in stored_events(stack).values():
        payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
        event = Event(row["recording_id"], row["status"], row["phone_number"], row["recording_url"], row["duration"],
                      payload)
        by_recording.setdefault(row["recording_id"], []).append((event, row["received_at"]))
    found = recordings(stack)
    wrong = []
    for recording_id, deliveries in by_recording.items():
        expected = arrival_order_state(deliveries)
        actual = found[recording_id]
        got = {"status": actual["status"], "duration": actual["duration"], "recording_url": actual["recording_url"],
               "created_at": actual["created_at"], "participants": sorted(actual["participants"])}
        if got != expected:
            wrong.append(recording_id)
    return wrong


def rolling_restart(workdir: Path, seed: int = 8) -> Tally:
    """SIGTERM gunicorn, then the worker, under load, starting each again: nothing lost."""
    events = make_events(sessions=80, participants=3, per_session=3, seed=seed, prefix="roll")
    with fault_stack(workdir) as (stack, _pg):
        with in_background(lambda: post_all(stack, events, threads=4, pace=0.012, timeout=120)) as load:
            time.sleep(0.8)
            stack.stop_process("web", signal.SIGTERM)  # graceful: answers what is in flight, then exits
            stack.start_web()
            wait_for(lambda: stack.get("/healthz")[0] == 200, timeout=30)
            time.sleep(0.8)
            stack.stop_process("worker", signal.SIGTERM)  # warm shutdown: running tasks finish
            stack.start_worker()
        wait_until_applied(stack, events, timeout=120)
        stack.wait_until_idle()
        attempts = load["result"]
        return tally(stack, "rolling restart: SIGTERM web, then worker", events, answers=status_counts(attempts),
                     refused_while_web_restarted=sum(1 for tries in attempts for a in tries if a.status == 0),
                     answered_5xx=sum(1 for tries in attempts for a in tries if a.status >= 500))


SCENARIOS: dict[str, Callable[..., Tally]] = {
    "kill": worker_killed,
    "gap": taken_but_never_recorded,
    "redis-down": redis_down_at_ingress,
    "db-down": database_down,
    "dead-letters": dead_letters,
    "redis-forgot": redis_forgot,
    "storm": storm,
    "rolling-restart": rolling_restart,
}
