"""A Redis broker that refuses writes for a while (out of memory under noeviction; READONLY is the
same kind of refusal) is a lost connection to the worker: it logs the acknowledgement or requeue it
could not make and goes on, instead of stopping with "Unrecoverable error", and the event is
applied once Redis takes writes again (by the sweeper, when the worker had popped its message
before the refusal)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e


def test_a_worker_outlives_a_redis_that_refuses_writes(tmp_path: Path) -> None:
    # Beat runs: a message the worker popped and could not record as unacknowledged is the pending
    # set's to send again.
    stack = Stack(tmp_path, f"sqlite:///{tmp_path / 'voice.db'}", worker_concurrency=1, beat=True,
                  PENDING_REDELIVERY_SECONDS="5")
    try:
        stack.start()
        worker = stack.processes["worker"]
        client = redis.Redis.from_url(stack.redis.url)
        session = f"oom_{uuid.uuid4().hex[:8]}"
        os.killpg(worker.pid, signal.SIGSTOP)  # the event waits in the queue
        try:
            assert stack.post_form({"sessionId": session, "status": "busy"})[0] == 200
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1")  # from now on every write is refused as out of memory
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        try:
            time.sleep(8)  # the worker takes the message and meets OOM on its claim, retry and requeue
            assert worker.poll() is None, stack.log("worker")[-3000:]  # still running
        finally:
            client.config_set("maxmemory", "0")
        stack.wait_for_events(session, 1, timeout=90)
        assert worker.poll() is None
        log = stack.log("worker")
        assert "Unrecoverable error" not in log
        assert "OutOfMemoryError" in log  # the refusal did reach the worker
        client.close()
    finally:
        stack.stop()
