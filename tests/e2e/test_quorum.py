"""RabbitMQ with CELERY_QUEUE_TYPE=quorum: replicated queues, and a retry's countdown waiting in
the broker (Celery's native delayed delivery) rather than in a worker's memory."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis

from app.payload.events import FORM, decode_body, parse_event
from app.plumbing.dedup import DEDUP_PREFIX
from app.plumbing.queues import ALL_QUEUES
from tests.e2e.stack import Stack
from tests.support import rabbitmq_vhost, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quorum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("quorum"))
    with rabbitmq_vhost() as broker_url:
        stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}", CELERY_BROKER_URL=broker_url,
                      CELERY_QUEUE_TYPE="quorum")
        try:
            yield stack.start()
        finally:
            stack.stop()


def queue_types(stack: Stack) -> dict[str, str]:
    vhost = stack.extra_env["CELERY_BROKER_URL"].rsplit("/", 1)[1]
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run([ctl, "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "type"],
                          capture_output=True, text=True, check=True, timeout=60)
    return dict(line.split()[:2] for line in done.stdout.splitlines() if line.strip())


def test_the_service_queues_are_quorum_queues(quorum: Stack) -> None:
    session = f"quorum_{uuid.uuid4().hex[:10]}"
    assert quorum.post_form({"sessionId": session, "status": "busy"})[0] == 200
    quorum.wait_for_events(session, 1)
    types = wait_for(lambda: (t := queue_types(quorum)) and all(q in t for q in ALL_QUEUES) and t)
    assert {queue: types[queue] for queue in ALL_QUEUES} == {queue: "quorum" for queue in ALL_QUEUES}


def test_a_retry_waits_in_the_broker_and_then_applies(quorum: Stack) -> None:
    """Another task seems to hold the event's claim for 3 s: the task retries with a countdown,
    which RabbitMQ holds in its delayed-delivery queues, and the event is applied after it."""
    session = f"retry_{uuid.uuid4().hex[:10]}"
    fields = {"sessionId": session, "phoneNumber": "+254712345678", "status": "completed", "duration": "30"}
    key = parse_event(decode_body(FORM, urlencode(fields).encode())).key
    cache = redis.Redis.from_url(quorum.redis.url)
    cache.set(DEDUP_PREFIX + key, "claim:another-task", ex=3)
    started = time.monotonic()
    assert quorum.post_form(fields)[0] == 200
    [event] = quorum.wait_for_events(session, 1, timeout=60)
    assert time.monotonic() - started >= 2.5  # not before the claim expired
    assert event["status"] == "completed"
    worker_log = quorum.log("worker")
    assert f'"session_id": "{session}"' in worker_log and '"event": "event_retry"' in worker_log
    assert "Direct exchanges are not supported" not in worker_log
    assert any(name.startswith("celery_delayed_") for name in queue_types(quorum))
    cache.close()


def test_a_retry_the_broker_refuses_leaves_the_message_in_the_broker(tmp_path: Path) -> None:
    """The retry's publish fails (the delayed-delivery exchange is gone): Celery's own answer is a
    reject without requeue, which discards the message. The task puts it back in its queue
    instead; once the cause is gone, the event is applied."""
    from kombu import Connection

    with rabbitmq_vhost() as broker_url:
        stack = Stack(tmp_path, f"sqlite:///{tmp_path / 'voice.db'}", worker_concurrency=1,
                      CELERY_BROKER_URL=broker_url, CELERY_QUEUE_TYPE="quorum")
        try:
            stack.start()
            with Connection(broker_url) as connection:
                connection.default_channel.exchange_delete("celery_delayed_27")  # where a countdown goes first
            session = f"refused_{uuid.uuid4().hex[:10]}"
            fields = {"sessionId": session, "phoneNumber": "+254712345678", "status": "completed"}
            key = parse_event(decode_body(FORM, urlencode(fields).encode())).key
            cache = redis.Redis.from_url(stack.redis.url)
            cache.set(DEDUP_PREFIX + key, "claim:another-task", ex=120)  # the task must retry
            assert stack.post_form(fields)[0] == 200
            wait_for(lambda: '"event": "event_retry"' in stack.log("worker"), timeout=60, interval=0.1)
            cache.delete(DEDUP_PREFIX + key)  # the claim is gone: the message, if still in the broker, applies
            [event] = stack.wait_for_events(session, 1, timeout=60)
            assert event["status"] == "completed"
            assert '"event": "retry_refused"' in stack.log("worker")  # the retry's publish did fail
            cache.close()
        finally:
            stack.stop()
