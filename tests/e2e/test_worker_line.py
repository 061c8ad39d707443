"""The Procfile's worker line as an operator runs it: what each event costs in Redis commands, and
how its processes are supervised (scripts/worker_processes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import create_app
from app.events import Event
from app.extensions import db
from app.pending import PENDING_DUE
from app.publish import enqueue
from app.queues import APPLY_EVENT_TASK
from app.timeutil import utcnow
from config import Settings
from tests.conftest import migrate
from tests.e2e.test_flower import procfile_command
from tests.support import ROOT, RedisServer, spawn, stop_group, wait_for

pytestmark = pytest.mark.e2e

EVENTS = 150
IDLE_TRANSACTIONS = 30


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


def drain_with_worker_line(env: dict[str, str], log: Path) -> dict[str, int]:
    """Start the Procfile's worker line (one process), wait until the pending set is empty, stop
    it; returns the Redis commands it sent meanwhile, by name."""
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.config_resetstat()
    worker = supervisor(env, log, 1)
    try:
        wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=120, interval=0.1)
        wait_for(lambda: client.hlen("unacked") == 0, timeout=30, interval=0.1)
    finally:
        stop_group(worker)
    sent = commands(client)
    client.close()
    return sent


def test_each_event_costs_its_round_trips_and_no_task_events(service: dict[str, str], tmp_path: Path) -> None:
    """New event: BRPOP, the unacknowledged record (MULTI/EXEC), the claim (one script), and the
    acknowledgement carrying the done mark (MULTI/EXEC). Duplicate: BRPOP, the record, the claim,
    which acknowledges it too. No PUBLISH: nobody watches, so no task events."""
    events = [Event(f"line_{i // 3}", "busy", f"+2547{i:08d}", None, None, {}) for i in range(EVENTS)]
    queue(service, events)
    new = drain_with_worker_line(service, tmp_path / "worker.log")
    queue(service, events)
    duplicate = drain_with_worker_line(service, tmp_path / "worker.log")
    for sent in (new, duplicate):
        assert sent.get("publish", 0) <= 4, sorted(sent.items())  # the worker's own startup, never per event
        assert sent.get("eval", 0) == EVENTS, sent  # one claim each, no retry
        assert EVENTS <= sent.get("brpop", 0) <= EVENTS + 20, sent  # plus the idle polls of a second or two
    # The unacknowledged record and the acknowledgement; a separate done mark would make it 3 per
    # event. The few extra (at most IDLE_TRANSACTIONS, whatever the number of events) are the
    # worker's own as it starts and stops, and kombu's periodic look for expired messages.
    assert 2 * EVENTS <= new.get("multi", 0) <= 2 * EVENTS + IDLE_TRANSACTIONS, new
    assert EVENTS <= duplicate.get("multi", 0) <= EVENTS + IDLE_TRANSACTIONS, duplicate
    # Every event stored once, and the duplicates marked done, not applied again.
    app = create_app(Settings(redis_url=service["REDIS_URL"], database_url=service["DATABASE_URL"]))
    with app.app_context():
        assert db.session.execute(db.text("select count(*) from webhook_events")).scalar() == EVENTS
        db.engine.dispose()
    client = redis.Redis.from_url(service["REDIS_URL"])
    assert all(client.get(f"voice:dedup:{e.key}").startswith(b"done:") for e in events)
    outcomes = [line for line in (tmp_path / "worker.log").read_text().splitlines() if '"event_applied"' in line]
    assert sum('"outcome": "duplicate"' in line for line in outcomes) == EVENTS
    # ...each turned away as its message arrived, without a task request (app.fastpath).
    assert sum('"turned_away": "on arrival"' in line for line in outcomes) == EVENTS


def supervisor(env: dict[str, str], log: Path, count: int) -> subprocess.Popen[bytes]:
    return spawn(["bash", "-c", procfile_command("worker")], log=log, cwd=ROOT,
                 env={**env, "WORKER_CONCURRENCY": str(count)})


def ready_children(log: Path) -> set[str]:
    return {line.split("@", 1)[0].rsplit('"', 1)[-1] for line in log.read_text(errors="replace").splitlines()
            if " ready." in line}


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_the_line_replaces_a_killed_process_and_stops_as_one(service: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "line.log"
    line = supervisor(service, log, 2)
    try:
        wait_for(lambda: len(ready_children(log)) == 2, timeout=60, interval=0.2)
        assert ready_children(log) == {"worker-0", "worker-1"}
        first = sorted(children_of(line.pid))
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)  # a worker process lost (out of memory, a crash)
        wait_for(lambda: len(children_of(line.pid)) == 2 and first[0] not in children_of(line.pid), timeout=30)
        assert line.poll() is None
        assert '"worker_process_exited"' in log.read_text()
        # The replacement consumes too: events queued now are all applied.
        queue(service, [Event(f"after_{i}", "busy", f"+2547{i:08d}", None, None, {}) for i in range(10)])
        client = redis.Redis.from_url(service["REDIS_URL"])
        wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=60, interval=0.1)
        wait_for(lambda: log.read_text().count(" ready.") == 3, timeout=60, interval=0.2)  # the replacement too
        line.send_signal(signal.SIGTERM)  # to the supervisor alone: it stops every child
        assert line.wait(timeout=60) == 0
        assert not [pid for pid in children_of(line.pid) if Path(f"/proc/{pid}").exists()]
    finally:
        stop_group(line)


def test_the_line_refuses_a_bad_concurrency_and_stops_on_a_child_failing_at_start(service: dict[str, str],
                                                                                 tmp_path: Path) -> None:
    done = subprocess.run(["bash", "-c", procfile_command("worker")], cwd=ROOT, capture_output=True, text=True,
                          env={**service, "WORKER_CONCURRENCY": "two"}, timeout=30)
    assert done.returncode != 0 and "WORKER_CONCURRENCY must be an integer" in done.stderr
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", procfile_command("worker")], cwd=ROOT, capture_output=True, text=True,
                          env={**service, "WORKER_CONCURRENCY": "2", "DEDUP_TTL_SECONDS": "-5"}, timeout=60)
    assert done.returncode != 0, done.stderr[-2000:]  # no restart loop: the configuration error is seen
    assert "DEDUP_TTL_SECONDS" in done.stderr
    assert time.monotonic() - started < 50


def test_a_message_of_an_unexpected_shape_does_not_stop_the_worker(service: dict[str, str], tmp_path: Path) -> None:
    """The strategy's duplicate check reads the message before Celery does: whatever it finds there,
    it leaves the message to Celery's own path, and the worker goes on."""
    app = create_app(Settings(redis_url=service["REDIS_URL"], database_url=service["DATABASE_URL"]))
    celery = app.extensions["celery"]
    for args in (["not a message", "not a time"], [{"session_id": 5}, "2026-01-01T00:00:00Z"], []):
        celery.send_task(APPLY_EVENT_TASK, args=args, queue="voice-webhooks")
    queue(service, [Event("after_odd", "busy", "+254700000001", None, None, {})])
    log = tmp_path / "line.log"
    line = supervisor(service, log, 1)
    try:
        client = redis.Redis.from_url(service["REDIS_URL"])
        wait_for(lambda: client.zcard(PENDING_DUE) == 0 and client.llen("voice-webhooks") == 0, timeout=60,
                 interval=0.1)
        assert line.poll() is None
        assert '"worker_process_exited"' not in log.read_text()
        assert '"session_id": "after_odd"' in log.read_text()  # the valid event after them was applied
    finally:
        stop_group(line)
