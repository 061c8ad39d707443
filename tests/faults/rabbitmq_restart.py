"""Fault scenario: the RabbitMQ broker stops under load and starts again.

A RabbitMQ node of the scenario's own (``tests.rabbitmq_node``), a stack on PostgreSQL and Redis
servers of its own, a steady stream of webhooks. The node is stopped: webhooks are answered 503
with Retry-After within a second. It is started again on the same folders: the web publishes and
the worker consumes again with no process restarted, and the durable queues (classic or quorum)
lose nothing: every event answered 200 is applied, once, also those that were waiting in the
queue when the node stopped (the worker is paused meanwhile, so that some are).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

from tests.faults.scenarios import Tally, fault_stack, make_events, post_like_at, tally, wait_until_applied
from tests.faults.sentinel import SteadyStream
from tests.rabbitmq_node import RabbitNode
from tests.support import wait_for


def rabbitmq_restart(workdir: Path, seed: int = 11, queue_type: str = "classic") -> Tally:
    events = make_events(sessions=1000, participants=2, per_session=2, seed=seed, prefix=f"rmq-{queue_type}")
    node = RabbitNode()
    try:
        node.start()
        with fault_stack(workdir, CELERY_BROKER_URL=node.url, CELERY_QUEUE_TYPE=queue_type) as (stack, _pg):
            pids = {name: process.pid for name, process in stack.processes.items()}
            with SteadyStream(stack, events, pause=0.1) as stream:
                wait_for(lambda: stream.accepted_since(0) >= 60, timeout=60)
                # The worker paused (not restarted), so that the broker stops with messages in its
                # queue: the restart must keep them.
                worker_group = stack.processes["worker"].pid
                os.killpg(worker_group, signal.SIGSTOP)
                paused_at = time.monotonic()
                try:
                    wait_for(lambda: stream.accepted_since(paused_at) >= 40, timeout=60)
                    queued_at_stop = stream.accepted_since(paused_at)
                    stopped_at = time.monotonic()
                    node.stop()
                finally:
                    os.killpg(worker_group, signal.SIGCONT)
                stop_took = time.monotonic() - stopped_at
                # While the node shuts down it may still confirm a publish (and keep it: nothing
                # is lost); "while down" starts once the stop returned.
                down_at = stopped_at + stop_took
                # Refused while it is down: a few seconds of stream against a stopped broker.
                wait_for(lambda: sum(1 for p in stream.posted if p.started > stopped_at + stop_took) >= 30,
                         timeout=30)
                restarted_at = time.monotonic()
                boot_s = node.start()
                wait_for(lambda: stream.accepted_since(restarted_at) > 0, timeout=60, interval=0.02)
                with stream.lock:
                    first_200 = min(p.started + p.attempt.seconds for p in stream.posted
                                    if p.started >= down_at and p.attempt.status == 200)
                wait_for(lambda: stream.accepted_since(first_200) >= 60, timeout=60)
            posted = stream.posted
            acknowledged = {id(p.fields) for p in posted if p.attempt.status == 200}
            while_down = [p.attempt for p in posted if down_at <= p.started < first_200]
            refused = [a for a in while_down if a.status != 200]
            retried = [p.fields for p in posted if id(p.fields) not in acknowledged]
            retries = list(itertools.chain.from_iterable(post_like_at(stack, fields, time.monotonic() + 60)
                                                         for fields in retried))
            sent = [p.fields for p in posted]
            wait_until_applied(stack, sent, timeout=120)
            applied_at = time.monotonic()
            restarted = [name for name, process in stack.processes.items()
                         if process.poll() is not None or process.pid != pids.get(name)]
            return tally(
                stack, f"RabbitMQ node stopped and started under load ({queue_type} queues)", sent,
                answered_200=len(acknowledged),
                queued_when_stopped=queued_at_stop,
                while_down=f"{len(while_down) - len(refused)} x 200, {len(refused)} refused",
                refused_statuses=sorted({a.status for a in refused}),
                refused_without_retry_after=sum(1 for a in refused if a.status == 503 and not a.retry_after),
                slowest_refusal_ms=round(max((a.seconds for a in refused), default=0) * 1000, 1),
                node_boot_s=round(boot_s, 1),
                accepted_again_after_start_s=round(first_200 - restarted_at, 2),
                all_applied_after_stop_s=round(applied_at - stopped_at, 1),
                retried_like_at=len(retried),
                retries_answered_200=sum(1 for a in retries if a.status == 200),
                processes_restarted=restarted,
            )
    finally:
        node.remove()
