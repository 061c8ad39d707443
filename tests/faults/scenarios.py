"""Fault scenarios on real processes: each runs a stack, breaks something, and tallies the outcome.

Every scenario uses a redis-server and a PostgreSQL server of its own on free ports (never the
machine's shared ones), real gunicorn and Celery workers, and returns a :class:`Tally`: distinct
events sent, applied, applied twice, lost. ``tests/faults/test_faults.py`` asserts on the tallies;
``python -m tests.faults.run`` repeats scenarios and prints them as a table.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis
from sqlalchemy import create_engine, text

from app.applying.tasks import BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, CLAIM_BUSY_MAX_SECONDS
from app.celery_app import UNACKED_RESTORE_INTERVAL, VISIBILITY_TIMEOUT, celery_config
from app.payload.events import FORM, Event
from app.plumbing.dedup import CLAIM_TTL_SECONDS, DEDUP_PREFIX
from app.plumbing.pending import PENDING_DATA
from config import Settings
from tests.e2e.stack import Stack
from tests.oracle import arrival_order_state
from tests.support import PostgresServer, wait_for

STATUSES = ("completed", "failed", "busy", "no-answer", "rejected")
WEBHOOK = "/api/v1/voice/webhook"


# --- how long recovery may take, from the settings it depends on -----------------------------

# The scenarios that depend on the pending-set sweeper run it with a short redelivery age (the
# stack's PENDING_REDELIVERY_SECONDS), so that they wait seconds rather than production's minute.
REDELIVERY_SECONDS = 10
# How often beat runs the sweeper with that age, as the service schedules it.
SWEEP_INTERVAL = celery_config(Settings(pending_redelivery_seconds=REDELIVERY_SECONDS))[
    "beat_schedule"]["sweep-pending"]["schedule"]
# An accepted event the broker lost is sent again by the first sweep after it is due.
SWEEPER_RESENDS_WITHIN = REDELIVERY_SECONDS + SWEEP_INTERVAL
# A message a dead worker had taken comes back once its visibility timeout has passed, at the
# next scan for such messages.
UNACKED_RETURNS_WITHIN = VISIBILITY_TIMEOUT + UNACKED_RESTORE_INTERVAL
# A task waiting out a transient failure tries again at most this long after the failure ended.
RETRY_RETURNS_WITHIN = BACKOFF_MAX_SECONDS
# An event whose claim a dead task left behind (killed at its hard time limit, or its host cut
# off: nothing released the claim) is applied once the claim has expired and a copy's next busy
# retry comes round.
STALE_CLAIM_RETURNS_WITHIN = CLAIM_TTL_SECONDS + CLAIM_BUSY_MAX_SECONDS
# Applying a backlog of a few hundred events on a machine whose cores other work keeps busy.
BACKLOG_SECONDS = 60
# Missing events with nothing queued, unacknowledged or pending for this long: none will come.
NOTHING_LEFT_SECONDS = 5
# Starting a stack: PostgreSQL's initdb and start, migrations, every process ready.
STACK_START_SECONDS = 120 + Stack.READY_TIMEOUT


@dataclass
class Tally:
    fault: str
    sent: int  # distinct events
    applied: int  # distinct events stored in the database
    applied_twice: int  # events a worker applied more than once, or stored twice (must be 0)
    lost: int  # events sent and answered 200 at last, never stored (must be 0)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.applied_twice == 0 and self.lost == 0 and self.applied == self.sent


# --- events ----------------------------------------------------------------------------------

# The fields that make an event: two deliveries are one event exactly when these are equal.
FIELDS = ("sessionId", "phoneNumber", "status", "duration", "recordingUrl")
# Each session holds a pair of events that differ in one of these alone (by turns), so that a
# fingerprint that wrongly ignored that field would merge them, and the tally would show a loss.
TWIN_FIELDS = ("duration", "phoneNumber", "status", "recordingUrl")

Ident = tuple[str, ...]


def ident(fields: dict[str, Any]) -> Ident:
    """An event's identity by construction: its fields as sent (a stored row's payload holds them)."""
    return tuple(str(fields.get(name, "")) for name in FIELDS)


def make_events(sessions: int, participants: int, per_session: int, seed: int, prefix: str) -> list[dict[str, str]]:
    """Distinct callbacks: ``per_session`` per session, spread over its participants; every one
    different from every other by construction (each session's durations are distinct), and in
    each session two that differ in one field only."""
    rng = random.Random(seed)
    events = []
    for s in range(sessions):
        session_id = f"{prefix}_{seed}_{s}"
        phones = [f"+2547{rng.randrange(10**7, 10**8)}" for _ in range(participants)]
        durations = rng.sample(range(3600), per_session)
        mine = []
        for n in range(per_session):
            status = rng.choice(STATUSES)
            fields = {"sessionId": session_id, "phoneNumber": phones[n % participants], "status": status,
                      "duration": str(durations[n])}
            if status == "completed" and rng.random() < 0.8:
                fields["recordingUrl"] = f"https://voice.africastalking.com/recordings/{session_id}-{n}.mp3"
            mine.append(fields)
        if per_session >= 2:
            mine[1] = twin(mine[0], TWIN_FIELDS[s % len(TWIN_FIELDS)], mine[1]["duration"], session_id)
        events += mine
    assert len({ident(fields) for fields in events}) == len(events)  # distinct, by construction
    return events


def twin(first: dict[str, str], differ: str, duration: str, session_id: str) -> dict[str, str]:
    """A copy of ``first`` that differs in the field ``differ`` only."""
    fields = dict(first)
    if differ == "duration":
        fields["duration"] = duration
    elif differ == "phoneNumber":
        fields["phoneNumber"] = first["phoneNumber"][:-1] + ("1" if first["phoneNumber"][-1] == "0" else "0")
    elif differ == "status":
        fields["status"] = "busy" if first["status"] != "busy" else "failed"
    else:
        fields["recordingUrl"] = f"https://voice.africastalking.com/recordings/{session_id}-twin.mp3"
    return fields


# --- posting like Africa's Talking -----------------------------------------------------------


@dataclass
class Attempt:
    status: int  # 0: no HTTP answer (connection refused or dropped)
    seconds: float
    retry_after: str | None = None
    # The wall clock (the one the web stamps received_at with, on this machine) just before the
    # request was sent and just after its answer came: the web received it in between.
    sent_at: float = 0.0
    answered_at: float = 0.0


def post_once(stack: Stack, fields: dict[str, str]) -> Attempt:
    started, sent_at = time.monotonic(), time.time()
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        conn.request("POST", WEBHOOK, urlencode(fields), {"Content-Type": FORM})
        response = conn.getresponse()
        response.read()
        return Attempt(response.status, time.monotonic() - started, response.getheader("Retry-After"), sent_at,
                       time.time())
    except (OSError, http.client.HTTPException):
        return Attempt(0, time.monotonic() - started, None, sent_at, time.time())
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
             pace: float = 0.0, answered: list[int] | None = None) -> list[list[Attempt]]:
    """Post every event (retrying like AT) from a pool of threads; ``pace`` spaces the starts;
    ``answered`` gets an item for each event answered 200, so a scenario can time a fault by it."""
    deadline = time.monotonic() + timeout

    def one(item: tuple[int, dict[str, str]]) -> list[Attempt]:
        if pace:
            time.sleep(max(0.0, start + item[0] * pace - time.monotonic()))
        attempts = post_like_at(stack, item[1], deadline)
        if answered is not None and attempts[-1].status == 200:
            answered.append(item[0])
        return attempts

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


def stored_events(stack: Stack) -> list[dict[str, Any]]:
    """Every stored event row, with its payload (the fields as the web received them) decoded."""
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT recording_id, received_at, status, phone_number, duration, recording_url, payload "
                "FROM webhook_events"
            )).mappings().all()
    finally:
        engine.dispose()
    found = []
    for row in rows:
        payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
        found.append({**row, "payload": payload, "received_at": _utc(row["received_at"])})
    return found


def _utc(moment: datetime | str) -> datetime:
    if isinstance(moment, str):  # SQLite hands back text
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stored_idents(stack: Stack) -> Counter[Ident]:
    """How many rows hold each event, told apart by the fields they carry."""
    return Counter(ident(row["payload"]) for row in stored_events(stack))


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


def worker_lines(stack: Stack, event: str) -> list[dict[str, Any]]:
    """The workers' JSON log entries of one kind, from every worker log of the stack."""
    marker = f'"event": "{event}"'
    return [json.loads(line) for log in sorted(stack.workdir.glob("worker*.log"))
            for line in log.read_text(errors="replace").splitlines() if marker in line and line.startswith("{")]


def applications(stack: Stack) -> Counter[str]:
    """How many times workers applied each event (outcome applied or no_effect), from their logs."""
    return Counter(entry["event_key"] for entry in worker_lines(stack, "event_applied")
                   if entry.get("outcome") in {"applied", "no_effect"})


def wait_until_tasks_ended(stack: Stack, tasks: int, timeout: float) -> int:
    """Until the workers have logged the end of ``tasks`` event tasks (``event_applied``, written
    after the task's transaction committed, whatever its outcome), or ``timeout``; returns how many."""
    deadline = time.monotonic() + timeout
    while (ended := len(worker_lines(stack, "event_applied"))) < tasks and time.monotonic() < deadline:
        time.sleep(0.1)
    return ended


def sweeper_resent(stack: Stack) -> int:
    """Events the pending-set sweeper sent again (what the broker alone would have lost or delayed)."""
    return sum(entry["count"] for entry in worker_lines(stack, "pending_redelivered"))


def tally(stack: Stack, fault: str, events: list[dict[str, str]], **notes: Any) -> Tally:
    """Sent is counted by construction (each generated event is distinct); stored rows are matched
    to them by the fields their payload holds, never by the service's own fingerprint."""
    sent = {ident(fields) for fields in events}
    assert len(sent) == len(events)
    stored = stored_idents(stack)
    applied_counts = applications(stack)
    notes.setdefault("sweeper_resent", sweeper_resent(stack))
    return Tally(
        fault=fault,
        sent=len(sent),
        applied=len(sent & stored.keys()),
        applied_twice=(sum(1 for n in applied_counts.values() if n > 1) + sum(1 for n in stored.values() if n > 1)
                       + len(stored.keys() - sent)),
        lost=len(sent - stored.keys()),
        notes=notes,
    )


def wait_until_applied(stack: Stack, events: list[dict[str, str]], timeout: float) -> float:
    """Until every event is stored; returns how long that took. Gives up early when events are
    missing and the Redis broker has held nothing that could still bring them (no message queued
    or unacknowledged, nothing pending for the sweeper) for NOTHING_LEFT_SECONDS."""
    started = time.monotonic()
    wanted = {ident(fields) for fields in events}
    client = stack.redis_client()
    redis_broker = "CELERY_BROKER_URL" not in stack.extra_env

    def holds_nothing() -> bool:
        try:
            return redis_broker and not (client.llen("voice-webhooks") or client.hlen("unacked")
                                         or client.zcard("voice:pending:due"))
        except redis.RedisError:
            return False

    def stored() -> set[Ident]:
        try:
            return set(stored_idents(stack))
        except Exception:  # the database is coming back
            return set()

    idle_since: float | None = None
    try:
        while not wanted <= stored():
            now = time.monotonic()
            if now - started > timeout:
                raise TimeoutError
            idle_since = (idle_since or now) if holds_nothing() else None
            if idle_since is not None and now - idle_since >= NOTHING_LEFT_SECONDS and not wanted <= stored():
                raise LookupError("nothing left that could bring the missing events")
            time.sleep(0.5)
    except (TimeoutError, LookupError) as stopped:
        missing = wanted - stored_idents(stack).keys()
        where = {
            "missing": len(missing),
            "queued": client.llen("voice-webhooks"),
            "unacked": client.hlen("unacked"),
            "pending": client.zcard("voice:pending:due"),
            "dead_lettered": len(worker_lines(stack, "event_dead_lettered")),  # gave up: kept, not applied
            "examples": [dict(zip(FIELDS, missed, strict=True)) for missed in list(missing)[:3]],
        }
        why = stopped.args[0] if stopped.args else f"not in {timeout}s"
        raise AssertionError(f"events not applied ({why}): {where}") from None
    finally:
        client.close()
    return time.monotonic() - started


def status_counts(attempts: list[list[Attempt]]) -> dict[str, int]:
    return dict(Counter(str(a.status) for tries in attempts for a in tries))


# --- stacks ----------------------------------------------------------------------------------


@contextmanager
def fault_stack(workdir: Path, **options: Any) -> Iterator[tuple[Stack, PostgresServer]]:
    """A stack on PostgreSQL and Redis servers of its own, both of which the scenario may stop.
    Whatever fails on the way up, every server started so far is stopped."""
    postgres = PostgresServer()
    stack: Stack | None = None
    try:
        postgres.init().start()
        stack = Stack(workdir, postgres.url, **options)
        yield stack.start(), postgres
    finally:
        try:
            if stack is not None:
                stack.stop()
        finally:
            postgres.remove()


def budget(*waits: float) -> float:
    """A scenario's time limit: starting its stack, then each of its waits in turn."""
    return STACK_START_SECONDS + sum(waits)


SWEEPER = {"beat": True, "PENDING_REDELIVERY_SECONDS": str(REDELIVERY_SECONDS)}  # as production runs it


# --- the scenarios ---------------------------------------------------------------------------

KILL_RECOVERY = max(UNACKED_RETURNS_WITHIN, SWEEPER_RESENDS_WITHIN) + BACKLOG_SECONDS


def worker_killed(workdir: Path, seed: int = 1) -> Tally:
    """SIGKILL the worker's process group while tasks are in flight, then start it again."""
    events = make_events(sessions=60, participants=3, per_session=5, seed=seed, prefix="kill")
    with fault_stack(workdir, **SWEEPER) as (stack, _pg):
        client = stack.redis_client()
        with in_background(lambda: post_all(stack, events, threads=4, pace=0.01)) as load:
            # The worker is busy and holds a message right now (it keeps up with the stream, so
            # the queue itself is often empty).
            wait_for(lambda: len(applications(stack)) >= 40 and client.hlen("unacked") > 0,
                     timeout=BACKLOG_SECONDS, interval=0.005)
            stack.kill("worker")
            killed_at = time.monotonic()
            # What the dead worker took and never acknowledged, or what waits for a worker.
            held = client.hlen("unacked") + client.llen("voice-webhooks")
            stack.start_worker()
        wait_until_applied(stack, events, timeout=KILL_RECOVERY)
        recovered = round(time.monotonic() - killed_at, 1)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        return tally(stack, "worker SIGKILLed mid-stream", events, answers=status_counts(load["result"]),
                     held_at_kill=held, all_applied_after_s=recovered)


GAP_RECOVERY = SWEEPER_RESENDS_WITHIN + BACKLOG_SECONDS


def taken_but_never_recorded(workdir: Path, seed: int = 2) -> Tally:
    """The Redis transport's gap: messages taken off the queue by a worker that died before it
    recorded them as unacknowledged. Only the pending set and its sweeper can bring them back."""
    events = make_events(sessions=20, participants=2, per_session=2, seed=seed, prefix="gap")
    with fault_stack(workdir, **SWEEPER) as (stack, _pg):
        stack.stop_process("worker")
        answers = post_all(stack, events)
        client = stack.redis_client()
        vanished = [client.rpop("voice-webhooks") for _ in range(10)]  # oldest ten, gone
        assert all(vanished) and client.hlen("unacked") == 0  # nowhere for kombu to restore them from
        started = time.monotonic()
        stack.start_worker()
        wait_until_applied(stack, events, timeout=GAP_RECOVERY)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        return tally(stack, "message taken, worker died before unacked record", events,
                     answers=status_counts(answers), messages_vanished=sum(1 for m in vanished if m),
                     all_applied_after_s=round(time.monotonic() - started, 1))


# Redis stopped under a worker: what it held comes back by the visibility timeout; what fell in
# the transport's window when Redis stopped (taken, not yet recorded as unacknowledged) only by
# the sweeper. AT's retries of what got 503 need Redis back and the web reconnected.
REDIS_DOWN_RETRIES = 60
REDIS_DOWN_RECOVERY = max(UNACKED_RETURNS_WITHIN, SWEEPER_RESENDS_WITHIN) + BACKLOG_SECONDS


def redis_down_at_ingress(workdir: Path, seed: int = 3) -> Tally:
    """Stop Redis while the web takes traffic; bring it back; nothing is restarted but Redis.
    Beat runs the sweeper as in production."""
    events = make_events(sessions=40, participants=2, per_session=3, seed=seed, prefix="redis")
    with fault_stack(workdir, persistent_redis=True, **SWEEPER) as (stack, _pg):
        during: list[Attempt] = []
        first, outage, rest = events[:60], events[60:90], events[90:]
        early = post_all(stack, first)
        client = stack.redis_client()
        pending_at_outage = client.zcard("voice:pending:due")
        client.close()
        stack.redis.stop()
        for fields in outage:  # every answer while Redis is down: 503, Retry-After, within 1 s
            during.append(post_once(stack, fields))
        stack.redis.start()
        later = post_all(stack, outage + rest, timeout=REDIS_DOWN_RETRIES)  # AT retries what got 503
        took = wait_until_applied(stack, events, timeout=REDIS_DOWN_RECOVERY)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        refused = [a for a in during if a.status == 503]
        return tally(stack, "Redis down at ingress", events,
                     answers=status_counts([*early, [*during], *later]),
                     during_outage_503=f"{len(refused)}/{len(during)}",
                     during_outage_200=sum(1 for a in during if a.status == 200),
                     slowest_503_ms=round(max(a.seconds for a in refused) * 1000, 1) if refused else None,
                     retry_after=all(a.retry_after for a in refused), pending_at_outage=pending_at_outage,
                     all_applied_after_s=round(took, 1))


DB_DOWN_RECOVERY = RETRY_RETURNS_WITHIN + BACKLOG_SECONDS


def database_down(workdir: Path, seed: int = 4) -> Tally:
    """Stop PostgreSQL while events are processed: tasks retry with backoff and apply once it is back."""
    events = make_events(sessions=30, participants=3, per_session=3, seed=seed, prefix="db")
    with fault_stack(workdir) as (stack, postgres):
        half = len(events) // 2
        answers = post_all(stack, events[:half])
        postgres.stop("immediate")
        answers += post_all(stack, events[half:])  # the web does not need the database
        # The outage lasts until tasks have met it: a few retries logged.
        wait_for(lambda: len(worker_lines(stack, "event_retry")) >= 3, timeout=BACKLOG_SECONDS, interval=0.2)
        postgres.start()
        wait_until_applied(stack, events, timeout=DB_DOWN_RECOVERY)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        return tally(stack, "PostgreSQL down during processing", events, answers=status_counts(answers),
                     retries=len(worker_lines(stack, "event_retry")))


# Retries run out: EVENT_MAX_RETRIES backoffs, each at most twice the one before.
DEAD_LETTER_RETRIES = 2
DEAD_LETTER_WAIT = sum(min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**n) for n in range(DEAD_LETTER_RETRIES + 1)) \
    + BACKLOG_SECONDS


def dead_letters(workdir: Path, seed: int = 5) -> Tally:
    """Retries run out while the database is down: dead letters wait in Redis, are filed in the
    database once it is back, listed, and replayed, each applying once."""
    events = make_events(sessions=4, participants=1, per_session=2, seed=seed, prefix="dead")
    with fault_stack(workdir, EVENT_MAX_RETRIES=str(DEAD_LETTER_RETRIES)) as (stack, postgres):
        postgres.stop("immediate")
        answers = post_all(stack, events)
        client = stack.redis_client()
        wait_for(lambda: client.llen("voice:dead-letters") == len(events), timeout=DEAD_LETTER_WAIT)
        postgres.start()
        listed = stack.flask("voice", "dead-letters")
        replayed = stack.flask("voice", "replay", "--all")
        wait_until_applied(stack, events, timeout=BACKLOG_SECONDS)
        again = stack.flask("voice", "replay", "--all")  # nothing left to replay
        first_id = re.search(r"^\s*(\d+)\s", listed, re.MULTILINE)
        assert first_id is not None, listed
        stack.flask("voice", "replay", first_id.group(1))  # replaying one again: a duplicate
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        return tally(stack, "retries exhausted -> dead letters -> replay", events, answers=status_counts(answers),
                     listed=listed.strip().splitlines()[-1], replayed=replayed.strip(),
                     second_replay=again.strip())


def redis_forgot(workdir: Path, seed: int = 6) -> Tally:
    """Redis loses every key between a delivery and its duplicate: the database fingerprint holds."""
    events = make_events(sessions=10, participants=2, per_session=2, seed=seed, prefix="forgot")
    with fault_stack(workdir) as (stack, _pg):
        post_all(stack, events)
        wait_until_applied(stack, events, timeout=BACKLOG_SECONDS)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        stack.redis_client().flushall()
        answers = post_all(stack, events)  # every event again

        def duplicates() -> int:
            return sum(1 for entry in worker_lines(stack, "event_applied") if entry.get("outcome") == "duplicate")

        # An event leaves the pending set before its worker logs it: wait for the log lines.
        with suppress(TimeoutError):  # the tally and the test's assertion tell how many were seen
            wait_for(lambda: duplicates() >= len(events), timeout=BACKLOG_SECONDS, interval=0.2)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        return tally(stack, "Redis flushed before the duplicates", events, duplicates_seen=duplicates(),
                     second_answers=status_counts(answers))


# The storm's budget: posting 5,000 deliveries, applying them, then draining what is left.
STORM_POST_SECONDS = 240
STORM_APPLY_SECONDS = 240
# Client and web read one clock; the database keeps microseconds. Leeway for the rounding.
CLOCK_LEEWAY = timedelta(milliseconds=2)


def storm(workdir: Path, seed: int = 7, deliveries: int = 5000) -> Tally:
    """5,000 deliveries over 500 sessions of three participants, 30% exact duplicates, shuffled,
    through several worker processes; every recording must equal the state the contract gives for
    the order in which the client's requests got their first 200."""
    rng = random.Random(seed)
    distinct = make_events(sessions=500, participants=3, per_session=7, seed=seed, prefix="storm")
    duplicates = [rng.choice(distinct) for _ in range(deliveries - len(distinct))]
    stream = distinct + duplicates
    rng.shuffle(stream)
    with fault_stack(workdir, workers=2, worker_concurrency=2) as (stack, _pg):
        started = time.monotonic()
        answers = post_all(stack, stream, threads=16, timeout=STORM_POST_SECONDS)
        posted = time.monotonic() - started
        wait_until_applied(stack, distinct, timeout=STORM_APPLY_SECONDS)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        # ...and no message still reserved by a worker: an earlier copy of an event applied from a
        # later one re-times it in its own task, which may be waiting out a retry's countdown (its
        # claim was busy) after the queue and the pending set are empty.
        client = stack.redis_client()
        wait_for(lambda: client.hlen("unacked") == 0, timeout=BACKLOG_SECONDS, interval=0.2)
        client.close()
        elapsed = time.monotonic() - started
        check = arrival_check(stack, distinct, arrival_bounds(stream, answers))
        duplicate_outcomes = sum(1 for entry in worker_lines(stack, "event_applied")
                                 if entry.get("outcome") == "duplicate")
        result = tally(stack, "storm: 5,000 deliveries, 30% duplicates, 4 worker processes", distinct,
                       deliveries=len(stream), duplicate_deliveries=len(duplicates),
                       duplicate_outcomes=duplicate_outcomes, answers=status_counts(answers),
                       post_s=round(posted, 1), total_s=round(elapsed, 1), **check)
        return result


Bounds = dict[Ident, tuple[datetime, datetime]]


def arrival_bounds(stream: list[dict[str, str]], answers: list[list[Attempt]]) -> Bounds:
    """For each event, when the web received its first copy, as the client saw it: no earlier than
    the first attempt of any copy was sent, no later than the first 200 of any copy came back."""
    bounds: dict[Ident, tuple[float, float]] = {}
    for fields, attempts in zip(stream, answers, strict=True):
        answered = [a.answered_at for a in attempts if a.status == 200]
        if not answered:
            continue
        low, high = min(a.sent_at for a in attempts), answered[0]
        key = ident(fields)
        if key in bounds:
            low, high = min(low, bounds[key][0]), min(high, bounds[key][1])
        bounds[key] = (low, high)
    return {key: (datetime.fromtimestamp(low, UTC), datetime.fromtimestamp(high, UTC))
            for key, (low, high) in bounds.items()}


def arrival_check(stack: Stack, distinct: list[dict[str, str]], bounds: Bounds) -> dict[str, Any]:
    """Compare what the database holds with the client's own account of arrivals.

    - every stored event's received_at lies within its first copy's bounds (a duplicate that
      arrived first re-times the event; a later copy must not);
    - every recording equals the contract's rules applied to its events in an order the client's
      bounds allow: where two requests were in flight at once, which the web took first is
      unknown, so every order of such a cluster is tried; its created_at lies within the bounds
      of its first event.
    """
    mistimed = [{"recording": row["recording_id"], "status": row["payload"].get("status"),
                 "stored": row["received_at"].isoformat(),
                 "first_copy": [bound.isoformat() for bound in bounds[ident(row["payload"])]]}
                for row in stored_events(stack)
                if ident(row["payload"]) in bounds
                and not (bounds[ident(row["payload"])][0] - CLOCK_LEEWAY <= row["received_at"]
                         <= bounds[ident(row["payload"])][1] + CLOCK_LEEWAY)]
    by_session: dict[str, list[dict[str, str]]] = {}
    for fields in distinct:
        by_session.setdefault(fields["sessionId"], []).append(fields)
    found = recordings(stack)
    wrong, unsure, too_tangled = [], 0, 0
    for session, events in by_session.items():
        clusters = overlapping([(fields, *bounds[ident(fields)]) for fields in events])
        if max(len(cluster) for cluster in clusters) > MAX_CLUSTER:
            too_tangled += 1
            continue
        possible = []
        for order in itertools.product(*(itertools.permutations(cluster) for cluster in clusters)):
            arrivals = [fields for cluster in order for fields in cluster]
            # The rules need only the order: give each event a time by its place in it.
            expected = arrival_order_state([(as_event(fields), EPOCH + timedelta(seconds=n))
                                            for n, fields in enumerate(arrivals)])
            expected.pop("created_at")
            if expected not in possible:
                possible.append(expected)
        unsure += len(possible) > 1
        actual = found[session]
        got = {"status": actual["status"], "duration": actual["duration"], "recording_url": actual["recording_url"],
               "participants": sorted(actual["participants"])}
        first_low = min(bounds[ident(fields)][0] for fields in events)
        first_high = min(bounds[ident(fields)][1] for fields in events)
        created_at = _utc(actual["created_at"])
        if got not in possible or not first_low - CLOCK_LEEWAY <= created_at <= first_high + CLOCK_LEEWAY:
            wrong.append(session)
    return {"events_not_at_first_arrival": len(mistimed), "mistimed_examples": mistimed[:3],
            "recordings": len(by_session), "recordings_checked": len(by_session) - too_tangled,
            "recordings_order_unsure": unsure,
            "recordings_not_in_arrival_state": len(wrong), "mismatched_examples": wrong[:3]}


# More requests of one session in flight at once than this: too many orders to try.
MAX_CLUSTER = 5
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def overlapping(timed: list[tuple[dict[str, str], datetime, datetime]]) -> list[list[dict[str, str]]]:
    """Events grouped into clusters whose bounds overlap, clusters in the order they arrived. One
    clock: a request sent after another was answered was received after it."""
    clusters: list[list[dict[str, str]]] = []
    end: datetime | None = None
    for fields, low, high in sorted(timed, key=lambda item: item[1]):
        if end is None or low >= end:
            clusters.append([fields])
            end = high
        else:
            clusters[-1].append(fields)
            end = max(end, high)
    return clusters


def as_event(fields: dict[str, str]) -> Event:
    """An event as the contract reads the generated fields (built here, not by the service's parser)."""
    return Event(fields["sessionId"], fields["status"], fields.get("phoneNumber"), fields.get("recordingUrl"),
                 int(fields["duration"]), dict(fields))


def copies_out_of_order(workdir: Path, seed: int = 9) -> Tally:
    """Every event delivered twice, the second round after the first was answered, and then the
    queue reversed while no worker runs, so each later copy is applied before the earlier one:
    every event must end with its first copy's arrival time (the client's bounds), and every
    recording in the state of the first copies' order."""
    events = make_events(sessions=20, participants=2, per_session=3, seed=seed, prefix="order")
    with fault_stack(workdir) as (stack, _pg):
        stack.stop_process("worker")
        # One at a time: no two requests in flight at once, so the client knows the order of arrival.
        first = post_all(stack, events, threads=1)
        second = post_all(stack, events, threads=1)  # starts once every first copy was answered
        client = stack.redis_client()
        queued = client.lrange("voice-webhooks", 0, -1)  # newest first; workers take from the end
        pipe = client.pipeline(transaction=True)
        pipe.delete("voice-webhooks")
        pipe.rpush("voice-webhooks", *reversed(queued))  # now the newest is taken first
        pipe.execute()
        client.close()
        stack.start_worker()
        wait_until_applied(stack, events, timeout=BACKLOG_SECONDS)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        # Idle is not enough here: the queue is empty once the last copies are taken, and the pending
        # set no longer holds an event whose later copy was applied, so an earlier copy still being
        # applied shows in neither. Its re-timing commits before its task logs the end.
        finished = wait_until_tasks_ended(stack, len(queued), timeout=BACKLOG_SECONDS)
        check = arrival_check(stack, events, arrival_bounds(events + events, first + second))
        return tally(stack, "every event twice, the later copy applied first", events,
                     answers=status_counts(first + second), messages_reversed=len(queued),
                     copies_finished=finished, **check)


def rolling_restart(workdir: Path, seed: int = 8) -> Tally:
    """SIGTERM gunicorn, then the worker, under load, starting each again: nothing lost. Each
    restart is timed by the load's progress, so that both strike while events are still coming."""
    events = make_events(sessions=80, participants=3, per_session=3, seed=seed, prefix="roll")
    answered: list[int] = []
    with fault_stack(workdir) as (stack, _pg):
        with in_background(lambda: post_all(stack, events, threads=4, pace=0.02, timeout=BACKLOG_SECONDS,
                                            answered=answered)) as load:
            wait_for(lambda: len(answered) >= len(events) // 4, timeout=BACKLOG_SECONDS)
            stack.stop_process("web", signal.SIGTERM)  # graceful: answers what is in flight, then exits
            stack.start_web()
            wait_for(lambda: len(answered) >= len(events) // 2, timeout=BACKLOG_SECONDS)
            worker_stopped = time.time()
            stack.stop_process("worker", signal.SIGTERM)  # warm shutdown: running tasks finish
            stack.start_worker()
            worker_ready = time.time()
        wait_until_applied(stack, events, timeout=BACKLOG_SECONDS)
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        attempts = load["result"]
        return tally(stack, "rolling restart: SIGTERM web, then worker", events, answers=status_counts(attempts),
                     refused_while_web_restarted=sum(1 for tries in attempts for a in tries if a.status == 0),
                     accepted_while_worker_restarted=sum(1 for tries in attempts for a in tries
                                                         if a.status == 200 and worker_stopped <= a.sent_at
                                                         and a.answered_at <= worker_ready),
                     answered_5xx=sum(1 for tries in attempts for a in tries if a.status >= 500))


STALE_CLAIM_RECOVERY = STALE_CLAIM_RETURNS_WITHIN + BACKLOG_SECONDS
STALE_CLAIMS = 3


def claim_left_by_a_dead_task(workdir: Path, seed: int = 10) -> Tally:
    """Tasks that died holding their events' claims, as a task killed at its hard time limit leaves
    things: its message acknowledged (gone from the broker), its claim standing until it expires,
    nothing else but the pending entry. The copies the sweeper sends find those events busy for
    as long as the claims last, and must wait for them rather than give up: each event is applied
    once, none dead-lettered."""
    events = make_events(sessions=4, participants=2, per_session=2, seed=seed, prefix="stale")
    with fault_stack(workdir, **SWEEPER) as (stack, _pg):
        stack.stop_process("worker")
        answers = post_all(stack, events)
        client = stack.redis_client()
        keys = sorted(k.decode() for k in client.hkeys(PENDING_DATA))
        assert len(keys) == len(events), keys
        stale = keys[:STALE_CLAIMS]
        pipe = client.pipeline(transaction=True)
        pipe.delete("voice-webhooks")  # every message acknowledged: only the pending set holds the events
        for key in stale:  # the claims the dead tasks took, with all of their time to run
            pipe.set(DEDUP_PREFIX + key, "claim:a-task-that-died", ex=CLAIM_TTL_SECONDS)
        pipe.execute()
        started = time.monotonic()
        stack.start_worker()
        wait_until_applied(stack, events, timeout=STALE_CLAIM_RECOVERY)
        took = time.monotonic() - started
        stack.wait_until_idle(timeout=BACKLOG_SECONDS)
        busy = [entry for entry in worker_lines(stack, "event_retry") if entry.get("error_type") == "ClaimBusy"]
        return tally(stack, "claims left behind by tasks that died", events, answers=status_counts(answers),
                     stale_claims=len(stale), events_met_busy=len({entry["event_key"] for entry in busy}),
                     busy_retries=len(busy), dead_lettered=len(worker_lines(stack, "event_dead_lettered")),
                     all_applied_after_s=round(took, 1))


SCENARIOS: dict[str, Callable[..., Tally]] = {
    "kill": worker_killed,
    "gap": taken_but_never_recorded,
    "redis-down": redis_down_at_ingress,
    "db-down": database_down,
    "dead-letters": dead_letters,
    "redis-forgot": redis_forgot,
    "storm": storm,
    "rolling-restart": rolling_restart,
    "out-of-order": copies_out_of_order,
    "stale-claim": claim_left_by_a_dead_task,
}

# Each scenario's time limit, from its waits (test_faults gives pytest these).
TIME_LIMITS: dict[str, float] = {
    "kill": budget(BACKLOG_SECONDS, KILL_RECOVERY, BACKLOG_SECONDS),
    "gap": budget(BACKLOG_SECONDS, GAP_RECOVERY, BACKLOG_SECONDS),
    "redis-down": budget(BACKLOG_SECONDS, REDIS_DOWN_RETRIES, REDIS_DOWN_RECOVERY, BACKLOG_SECONDS),
    "db-down": budget(BACKLOG_SECONDS, BACKLOG_SECONDS, DB_DOWN_RECOVERY, BACKLOG_SECONDS),
    "dead-letters": budget(DEAD_LETTER_WAIT, 3 * BACKLOG_SECONDS),
    "redis-forgot": budget(4 * BACKLOG_SECONDS),
    "storm": budget(STORM_POST_SECONDS, STORM_APPLY_SECONDS, BACKLOG_SECONDS),
    "rolling-restart": budget(3 * BACKLOG_SECONDS),
    "out-of-order": budget(5 * BACKLOG_SECONDS),
    "stale-claim": budget(BACKLOG_SECONDS, STALE_CLAIM_RECOVERY, BACKLOG_SECONDS),
}
