"""A worker that sends task events (started with ``-E``, as Flower turns them on) still applies its
events in batches and turns duplicates away on arrival (app.applying.fastpath), and sends each
task's events as Celery does for a task that succeeds, so that whoever watches sees every task."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app import create_app
from app.base.extensions import db
from app.payload.events import Event
from app.plumbing.pending import PENDING_DUE
from config import Settings
from tests.conftest import migrate
from tests.e2e.test_flower import procfile_command
from tests.e2e.test_worker_line import queue
from tests.support import ROOT, RedisServer, spawn, stop_group, wait_for

pytestmark = pytest.mark.e2e

EVENTS = 40


@pytest.fixture
def service(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Its own Redis (broker and cache) and SQLite database; the environment a worker line runs in."""
    server = RedisServer(tmp_path / "redis").start()
    url = f"sqlite:///{tmp_path / 'voice.db'}"
    migrate(url, server.url)
    env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": url, "LOG_FORMAT": "json",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "WORKER_METRICS_PORT": "0",
           "WORKER_CONCURRENCY": "1", "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    env.pop("CELERY_BROKER_URL", None)
    try:
        yield env
    finally:
        server.stop()


class TaskEvents:
    """Celery's task events as they reach Redis (kombu's fanout: PUBLISHes on the celeryev
    channels, each an event or a list of them, base64 in kombu's message), by type."""

    def __init__(self, url: str) -> None:
        self.pubsub = redis.Redis.from_url(url).pubsub()
        self.seen: dict[str, set[str]] = {}
        self.pubsub.psubscribe(**{"*celeryev*": self.note})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def note(self, item: dict[str, Any]) -> None:
        message = json.loads(item["data"])
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        found = json.loads(body)
        for event in found if isinstance(found, list) else [found]:
            if "uuid" in event:
                self.seen.setdefault(event["type"], set()).add(event["uuid"])

    def stop(self) -> None:
        self.thread.stop()  # the thread closes the subscription itself as it ends
        self.thread.join(timeout=5)


def drain(env: dict[str, str], log: Path, *options: str) -> dict[str, set[str]]:
    """The Procfile's worker line with ``options`` added, until every queued event is applied and
    acknowledged; returns the task ids of each type of task event published meanwhile."""
    client = redis.Redis.from_url(env["REDIS_URL"])
    events = TaskEvents(env["REDIS_URL"])
    worker = spawn(["bash", "-c", " ".join([procfile_command("worker"), *options])], log=log, cwd=ROOT, env=env)
    try:
        wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=120, interval=0.1)
        wait_for(lambda: client.hlen("unacked") == 0 and client.llen("voice-webhooks") == 0, timeout=30,
                 interval=0.1)
    finally:
        stop_group(worker)
        time.sleep(0.5)  # the last events' delivery to the subscriber
        events.stop()
    client.close()
    return events.seen


def outcomes(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if '"event_applied"' in line]


TASK_EVENTS = {"task-received", "task-started", "task-succeeded"}


def test_a_worker_sending_task_events_keeps_its_batches_and_sends_every_tasks_events(service: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    events = [Event(f"events_{i // 2}", "busy", f"+2547{i:08d}", None, None, {}) for i in range(EVENTS)]
    queue(service, events)
    seen = drain(service, tmp_path / "new.log", "-E")
    applied = outcomes(tmp_path / "new.log")
    task_ids = {json.loads(line)["task_id"] for line in applied}
    assert len(task_ids) == EVENTS and sum('"outcome": "applied"' in line for line in applied) == EVENTS
    assert all('"batch": ' in line for line in applied), "with task events on, an event was not applied in a batch"
    assert {kind for kind, ids in seen.items() if ids >= task_ids} >= TASK_EVENTS, (
        sorted((kind, len(ids)) for kind, ids in seen.items()))  # every task's events went out

    queue(service, events)  # every one again: duplicates, to a worker with task events on
    seen = drain(service, tmp_path / "watched.log", "-E")
    watched = outcomes(tmp_path / "watched.log")
    task_ids = {json.loads(line)["task_id"] for line in watched}
    assert len(task_ids) == EVENTS
    assert sum('"turned_away": "on arrival"' in line for line in watched) == EVENTS  # no task request built
    assert {kind for kind, ids in seen.items() if ids >= task_ids} >= TASK_EVENTS, (
        sorted((kind, len(ids)) for kind, ids in seen.items()))

    # The control: the same duplicates to the same line without -E send no task event, so what
    # was seen above is -E's doing.
    queue(service, events)
    assert not {kind for kind in drain(service, tmp_path / "unwatched.log") if kind.startswith("task-")}
    unwatched = outcomes(tmp_path / "unwatched.log")
    assert sum('"turned_away": "on arrival"' in line for line in unwatched) == EVENTS

    app = create_app(Settings(redis_url=service["REDIS_URL"], database_url=service["DATABASE_URL"]))
    with app.app_context():
        assert db.session.execute(db.text("select count(*) from webhook_events")).scalar() == EVENTS  # once each
        db.engine.dispose()
