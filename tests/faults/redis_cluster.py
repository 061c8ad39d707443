"""Fault scenario: a master of the Redis Cluster holding the dedup cache dies; RabbitMQ is the broker.

A cluster of three masters with a replica each (``tests.redis_cluster``, node timeout 1 s), a
virtual host of the scenario's own on the machine's RabbitMQ, a stack on a PostgreSQL of its own
whose REDIS_URL names the cluster. Webhooks arrive in a steady stream, and /readyz is asked every
tenth of a second; one master is SIGKILLed and its replica takes over. The webhook's path does not
touch Redis on RabbitMQ, so every webhook is answered 200 throughout; a task whose claim or done
mark falls on the dead master's slots before the takeover lets the database's fingerprint decide.
Nothing is lost, nothing applied twice, and no process is restarted.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.faults.scenarios import (
    Tally,
    fault_stack,
    make_events,
    post_like_at,
    tally,
    wait_until_applied,
    worker_lines,
)
from tests.faults.sentinel import SteadyStream
from tests.redis_cluster import LocalCluster
from tests.support import queued_on_rabbitmq, rabbitmq_vhost, wait_for


class ReadyzWatch:
    """Asks /readyz every ``interval`` seconds in a thread; keeps (when, HTTP status, status, the
    Redis check's error)."""

    def __init__(self, stack: Any, interval: float = 0.1) -> None:
        self.stack = stack
        self.interval = interval
        self.seen: list[tuple[float, int, str | None, str | None]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stopped.is_set():
            at = time.monotonic()
            try:
                status, body = self.stack.get("/readyz")
                body = body if isinstance(body, dict) else {}
                redis_check = body.get("checks", {}).get("redis", {})
                self.seen.append((at, status, body.get("status"), redis_check.get("error")))
            except OSError:
                self.seen.append((at, 0, None, None))
            self.stopped.wait(self.interval)

    def __enter__(self) -> ReadyzWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def between(self, start: float, end: float) -> dict[str, int]:
        """How often each answer came between ``start`` and ``end``: "200 degraded (ConnectionError)"."""
        return dict(Counter(f"{status} {state}" + (f" ({error})" if error else "")
                            for at, status, state, error in self.seen if start <= at < end))

    def ready_again(self, since: float) -> float | None:
        """When /readyz said ready after its last other answer since ``since`` (the first ready
        answer since then when it never said anything else)."""
        after = [(at, state) for at, _status, state, _error in self.seen if at >= since]
        last_other = max((at for at, state in after if state != "ready"), default=since)
        return next((at for at, state in after if state == "ready" and at > last_other), None)


COPY_LAG = 7


def redis_cluster_failover(workdir: Path, seed: int = 12) -> Tally:
    events = make_events(sessions=1500, participants=2, per_session=2, seed=seed, prefix="rcluster")
    # Every fifth event is followed, seven events later, by a copy of an earlier one (AT's retry of
    # a callback it thinks failed): copies arrive also while a master is missing, when the claim
    # cannot be taken and the fingerprint alone turns them away.
    stream_events = []
    for n, fields in enumerate(events):
        stream_events.append(fields)
        if n >= COPY_LAG and n % 5 == 0:
            stream_events.append(events[n - COPY_LAG])
    with LocalCluster(workdir / "redis-cluster") as cluster, rabbitmq_vhost() as broker_url, \
            fault_stack(workdir, redis_url=cluster.url, CELERY_BROKER_URL=broker_url) as (stack, _pg):
        pids = {name: process.pid for name, process in stack.processes.items()}
        with SteadyStream(stack, stream_events, pause=0.05) as stream, ReadyzWatch(stack) as readyz:
            wait_for(lambda: stream.accepted_at_least(0, 60), timeout=60)
            victim = cluster.masters()[0]
            replica = cluster.replicas_of(victim)[0]
            killed_at = time.monotonic()
            victim.kill()
            took_over_at = cluster.wait_for_takeover(victim, replica, timeout=30)
            # The stream goes on well past the takeover, and /readyz has time to say ready again.
            wait_for(lambda: stream.accepted_at_least(took_over_at, 60), timeout=60)
            wait_for(lambda: readyz.ready_again(killed_at) is not None, timeout=30, interval=0.1)
        queued_at_stream_end = queued_on_rabbitmq(broker_url)  # the backlog the worker still had
        posted = stream.posted
        acknowledged = {id(p.fields) for p in posted if p.attempt.status == 200}
        after_kill = [p.attempt for p in posted if p.started >= killed_at]
        # Africa's Talking sends again what was not answered 200 (none expected: the webhook's
        # path does not touch Redis on RabbitMQ).
        retried = [p.fields for p in posted if id(p.fields) not in acknowledged]
        retries = list(itertools.chain.from_iterable(post_like_at(stack, fields, time.monotonic() + 60)
                                                     for fields in retried))
        sent = list({id(p.fields): p.fields for p in posted}.values())  # each event once
        wait_until_applied(stack, sent, timeout=120)
        applied_at = time.monotonic()
        wait_for(lambda: queued_on_rabbitmq(broker_url) == 0, timeout=60, interval=0.5)
        restarted = [name for name, process in stack.processes.items()
                     if process.poll() is not None or process.pid != pids.get(name)]
        ready_at = readyz.ready_again(killed_at)
        return tally(
            stack, "Redis Cluster master SIGKILLed (dedup cache), RabbitMQ broker", sent,
            answered_200=len(acknowledged),
            copies_posted=len(posted) - len(sent),
            after_kill=f"{sum(1 for a in after_kill if a.status == 200)} x 200, "
                       f"{sum(1 for a in after_kill if a.status != 200)} refused",
            slowest_answer_after_kill_ms=round(max((a.seconds for a in after_kill), default=0) * 1000, 1),
            took_over_after_s=round(took_over_at - killed_at, 2),
            readyz_during_failover=readyz.between(killed_at, ready_at or took_over_at),
            readyz_ready_again_after_s=round(ready_at - killed_at, 2) if ready_at else None,
            readyz_after=readyz.between(ready_at or took_over_at, float("inf")),
            cache_unavailable_claims=len(worker_lines(stack, "dedup_cache_unavailable")),
            cache_unavailable_marks=len(worker_lines(stack, "dedup_mark_failed")),
            task_retries=len(worker_lines(stack, "event_retry")),
            dead_lettered=len(worker_lines(stack, "event_dead_lettered")),
            queued_at_stream_end=queued_at_stream_end,
            all_applied_after_kill_s=round(applied_at - killed_at, 1),
            retried_like_at=len(retried),
            retries_answered_200=sum(1 for a in retries if a.status == 200),
            processes_restarted=restarted,
        )
