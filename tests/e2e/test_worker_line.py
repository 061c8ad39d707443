"""The Procfile's worker line as an operator runs it: what each event costs in Redis commands, and
how a formation of them starts and stops. The line is one process; what runs several of them and
replaces a lost one is the process manager's (honcho in development, systemd's template units,
the platform's formation), never a supervisor of ours."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import create_app
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.payload.events import Event
from app.plumbing.dedup import DEDUP_PREFIX
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from app.plumbing.queues import APPLY_EVENT_TASK
from config import Settings
from tests.conftest import migrate
from tests.e2e.stack import worker_line
from tests.support import ROOT, RedisServer, spawn, stop_group, wait_for

pytestmark = pytest.mark.e2e

EVENTS = 160  # not a multiple of WORKER_BATCH_SIZE: the last batch is applied by the idle timer
IDLE_TRANSACTIONS = 30
HONCHO = Path(sys.executable).parent / "honcho"
# honcho sends SIGKILL to what is still running 5 s after its SIGTERM (honcho.manager.KILL_WAIT):
# a task in flight is given well under that here, and the formation must be gone soon after.
HELD_AFTER_SIGTERM_SECONDS = 2.0
FORMATION_STOPS_WITHIN = 15.0


@pytest.fixture
def service(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Its own Redis (broker and cache) and SQLite database; the environment a worker line runs in."""
    server = RedisServer(tmp_path / "redis").start()
    url = f"sqlite:///{tmp_path / 'voice.db'}"
    migrate(url, server.url)
    env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": url, "LOG_FORMAT": "json",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "WORKER_METRICS_PORT": "0",
           "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    env.pop("CELERY_BROKER_URL", None)
    env.pop("HONCHO_PROCESS_NAME", None)
    try:
        yield env
    finally:
        server.stop()


def queue(env: dict[str, str], events: list[Event]) -> None:
    app = create_app(Settings(redis_url=env["REDIS_URL"], database_url=env["DATABASE_URL"]))
    with app.app_context():
        for event in events:
            enqueue(event, utcnow(), None)
        db.engine.dispose()


def commands(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in client.info("commandstats").items()}


def start_line(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The Procfile's worker line, as a process manager starts one process of it."""
    return spawn(worker_line(), log=log, cwd=ROOT, env=env)


def drain_with_worker_line(env: dict[str, str], log: Path) -> dict[str, int]:
    """Start the Procfile's worker line (one process), wait until the pending set is empty, stop
    it; returns the Redis commands it sent meanwhile, by name."""
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.config_resetstat()
    worker = start_line(env, log)
    try:
        wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=120, interval=0.1)
        wait_for(lambda: client.hlen("unacked") == 0, timeout=30, interval=0.1)
    finally:
        stop_group(worker)
    sent = commands(client)
    client.close()
    return sent


def test_each_event_costs_its_round_trips_and_no_task_events(service: dict[str, str], tmp_path: Path) -> None:
    """Queued events are taken a batch at a time: BRPOP gives one message and kombu records it
    as unacknowledged (MULTI/EXEC); one script takes the messages waiting behind it and records
    them the same way. One script claims every event of a batch (``dedup.claim_many``);
    one MULTI/EXEC per batch marks its new events done and acknowledges their messages; a
    duplicate's claim acknowledges it. No PUBLISH: nobody watches, so no task events."""
    events = [Event(f"line_{i // 3}", "busy", f"+2547{i:08d}", None, None, {}) for i in range(EVENTS)]
    queue(service, events)
    new = drain_with_worker_line(service, tmp_path / "worker-new.log")
    queue(service, events)
    duplicate = drain_with_worker_line(service, tmp_path / "worker.log")
    for sent in (new, duplicate):
        assert sent.get("publish", 0) <= 4, sorted(sent.items())  # the worker's own startup, never per event
        # One script claims a batch's events: a script for each event would make EVENTS of them.
        assert 1 <= sent.get("eval", 0) <= EVENTS / 10, sent
        # Every message recorded as unacknowledged once, by kombu or by the take-ahead script...
        assert sent.get("hset", 0) == EVENTS, sent
        # ...and most of them taken ahead: a BRPOP for each batch or so, plus the idle polls of a
        # second or two.
        assert sent.get("brpop", 0) <= EVENTS / 10, sent
    # kombu's record of each message BRPOP gave, and one acknowledgement of each batch carrying
    # its done marks; an acknowledgement per event would make it at least one per event. The few
    # extra (at most IDLE_TRANSACTIONS, whatever the number of events) are the worker's own as it
    # starts and stops, and kombu's periodic look for expired messages.
    applied = [json.loads(line) for line in (tmp_path / "worker-new.log").read_text().splitlines()
               if '"event_applied"' in line]
    assert len(applied) == EVENTS and all(line["outcome"] == "applied" for line in applied)
    batches = round(sum(1 / line["batch"] for line in applied))
    assert batches <= EVENTS / 10, "the queued events were applied a few at a time"
    assert new.get("multi", 0) <= new["brpop"] + batches + IDLE_TRANSACTIONS, (batches, new)
    assert duplicate.get("multi", 0) <= duplicate["brpop"] + IDLE_TRANSACTIONS, duplicate
    # Every event stored once, and the duplicates marked done, not applied again.
    app = create_app(Settings(redis_url=service["REDIS_URL"], database_url=service["DATABASE_URL"]))
    with app.app_context():
        assert db.session.execute(db.text("select count(*) from webhook_events")).scalar() == EVENTS
        db.engine.dispose()
    client = redis.Redis.from_url(service["REDIS_URL"])
    assert all(client.get(f"voice:dedup:{e.key}").startswith(b"done:") for e in events)
    outcomes = [line for line in (tmp_path / "worker.log").read_text().splitlines() if '"event_applied"' in line]
    assert sum('"outcome": "duplicate"' in line for line in outcomes) == EVENTS
    # ...each turned away as its message arrived, without a task request (app.applying.fastpath).
    assert sum('"turned_away": "on arrival"' in line for line in outcomes) == EVENTS


def ready_nodes(log: Path) -> set[str]:
    """The node names (before the @) that said they are ready, in honcho's output."""
    return set(re.findall(r"\"(\S+)@\S+ ready\.\"", log.read_text(errors="replace")))


def stored_events(env: dict[str, str]) -> int:
    app = create_app(Settings(redis_url=env["REDIS_URL"], database_url=env["DATABASE_URL"]))
    with app.app_context():
        count = db.session.execute(db.text("select count(*) from webhook_events")).scalar()
        db.engine.dispose()
    return int(count or 0)


def test_honcho_stops_the_formation_warm_on_sigterm(service: dict[str, str], tmp_path: Path) -> None:
    """``honcho start -c worker=2 worker`` on the real Procfile: two worker processes, each its own
    node. SIGTERM to honcho reaches both as Celery's warm shutdown: the one running a task finishes
    it (its event is stored and marked done) before it exits, both exit 0, and honcho ends with
    them, with no SIGKILL."""
    log = tmp_path / "honcho.log"
    honcho = spawn([str(HONCHO), "start", "-c", "worker=2", "worker"], log=log, cwd=ROOT, env=service)
    database = sqlite3.connect(service["DATABASE_URL"].removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    client = redis.Redis.from_url(service["REDIS_URL"])
    try:
        wait_for(lambda: ready_nodes(log) == {"worker.1", "worker.2"}, timeout=60, interval=0.2)  # a name each
        # The database's write lock held here: the task that takes the event waits for it.
        database.execute("BEGIN IMMEDIATE")
        event = Event("warm_stop", "busy", "+254700000001", None, None, {})
        queue(service, [event])
        wait_for(lambda: client.get(DEDUP_PREFIX + event.key), timeout=30, interval=0.05)  # claimed: in flight
        honcho.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(HELD_AFTER_SIGTERM_SECONDS)
        assert honcho.poll() is None, log.read_text()[-3000:]  # still waiting for the task in flight
        assert not client.get(DEDUP_PREFIX + event.key).startswith(b"done:")
        database.execute("ROLLBACK")  # the task goes on
        returncode = honcho.wait(timeout=FORMATION_STOPS_WITHIN)
        took = time.monotonic() - signalled
    finally:
        database.close()
        stop_group(honcho, tree=True)
    output = log.read_text()
    assert returncode == 143, output[-3000:]  # honcho's own status after a SIGTERM (128 + 15)
    assert sorted(re.findall(r"(worker\.\d) stopped \(rc=0\)", output)) == ["worker.1", "worker.2"], output[-3000:]
    assert "SIGKILL" not in output
    assert took < FORMATION_STOPS_WITHIN
    assert client.get(DEDUP_PREFIX + event.key).startswith(b"done:")
    assert stored_events(service) == 1
    client.close()


def test_a_bad_setting_stops_the_worker_at_once(service: dict[str, str], tmp_path: Path) -> None:
    """A malformed setting ends ``python -m worker`` with a message naming it, not a traceback; under
    honcho the whole formation stops with it. Nothing starts it again in a loop."""
    env = {**service, "DEDUP_TTL_SECONDS": "abc"}
    started = time.monotonic()
    done = subprocess.run(worker_line(), cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "DEDUP_TTL_SECONDS must be an integer, got 'abc'" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30

    log = tmp_path / "honcho.log"
    started = time.monotonic()
    honcho = spawn([str(HONCHO), "start", "-c", "worker=2", "worker"], log=log, cwd=ROOT, env=env)
    try:
        returncode = honcho.wait(timeout=60)
    finally:
        stop_group(honcho, tree=True)
    output = log.read_text()
    assert returncode != 0, output
    assert time.monotonic() - started < 45
    assert output.count("DEDUP_TTL_SECONDS must be an integer") == 2  # each process once: no restarts
    assert re.search(r"worker\.\d stopped \(rc=1\)", output), output


@pytest.mark.parametrize("value", ["two", "0", "65", "-1", "2.5"])
def test_the_run_command_refuses_a_bad_worker_concurrency(value: str, tmp_path: Path) -> None:
    """scripts/run.sh checks WORKER_CONCURRENCY (honcho's ``-c worker=N``) before it starts anything."""
    log = tmp_path / "run.log"
    run = spawn(["bash", str(ROOT / "scripts" / "run.sh")], log=log, cwd=ROOT,
                env={**os.environ, "WORKER_CONCURRENCY": value, "REDIS_URL": "redis://192.0.2.1:6379/0"})
    try:
        returncode = run.wait(timeout=30)
    finally:
        stop_group(run, tree=True)
    assert returncode == 1
    assert log.read_text().strip() == f"WORKER_CONCURRENCY must be an integer between 1 and 64, got '{value}'"


def test_a_message_of_an_unexpected_shape_does_not_stop_the_worker(service: dict[str, str], tmp_path: Path) -> None:
    """The strategy's duplicate check reads the message before Celery does: whatever it finds there,
    it leaves the message to Celery's own path, and the worker goes on."""
    app = create_app(Settings(redis_url=service["REDIS_URL"], database_url=service["DATABASE_URL"]))
    celery = app.extensions["celery"]
    for args in (["not a message", "not a time"], [{"session_id": 5}, "2026-01-01T00:00:00Z"], []):
        celery.send_task(APPLY_EVENT_TASK, args=args, queue="voice-webhooks")
    queue(service, [Event("after_odd", "busy", "+254700000001", None, None, {})])
    log = tmp_path / "line.log"
    line = start_line(service, log)
    try:
        client = redis.Redis.from_url(service["REDIS_URL"])
        wait_for(lambda: client.zcard(PENDING_DUE) == 0 and client.llen("voice-webhooks") == 0, timeout=60,
                 interval=0.1)
        assert line.poll() is None
        assert '"session_id": "after_odd"' in log.read_text()  # the valid event after them was applied
    finally:
        stop_group(line)
