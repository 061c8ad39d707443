"""Fault scenario: the node leading the webhook queue of a three-node RabbitMQ cluster dies.

Three clustered RabbitMQ nodes of the scenario's own (``tests.rabbitmq_cluster``), quorum queues
(one member on each node), a stack on PostgreSQL and Redis servers of its own whose broker URL
names all three nodes as kombu's failover list, and a steady stream of webhooks. The node that
leads the webhook queue is SIGKILLed (its VM only: the other two see it vanish, as a crashed host
would leave them). The two left hold a majority: they elect a new leader, the web's and the
worker's connections move to a live node, and nothing is lost: every event answered 200 was
confirmed by a majority before the answer went out. Webhooks answered otherwise meanwhile must be
503 with Retry-After (Africa's Talking sends them again), never an error of another kind.

Then the delivery limit, on the two nodes left: a message given back to the webhook queue more
often than the limit allows (as a worker that dies on it every time would) ends in the dead-letter
queue, not dropped.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kombu import Connection, Producer

from app.celery_app import celery_config
from app.plumbing.queues import WEBHOOK_QUEUE, dead_letter_queue
from config import Settings
from tests.e2e.stack import Stack
from tests.faults.scenarios import Tally, fault_stack, make_events, post_like_at, tally, wait_until_applied
from tests.faults.sentinel import SteadyStream
from tests.rabbitmq_cluster import RabbitCluster
from tests.support import wait_for


def rabbitmq_cluster_leader_killed(workdir: Path, seed: int = 12) -> Tally:
    # More events than the stream needs: it stops once the web has accepted enough after the kill.
    events = make_events(sessions=1000, participants=2, per_session=2, seed=seed, prefix="rmq-cluster")
    with RabbitCluster() as cluster:
        with fault_stack(workdir, CELERY_BROKER_URL=cluster.url, CELERY_QUEUE_TYPE="quorum") as (stack, _pg):
            result = _leader_killed(stack, cluster, events)
        # The stack is stopped from here: no worker consumes the queue the test gives a message back to.
        result.notes["delivery_limit"] = delivery_limit(cluster)
        return result


def _leader_killed(stack: Stack, cluster: RabbitCluster, events: list[dict[str, str]]) -> Tally:
    pids = {name: process.pid for name, process in stack.processes.items()}
    members = cluster.members(WEBHOOK_QUEUE)
    with SteadyStream(stack, events, pause=0.1) as stream:
        wait_for(lambda: stream.accepted_at_least(0, 60), timeout=60)
        leader = cluster.leader(WEBHOOK_QUEUE)
        killed_at = time.monotonic()
        leader.kill()
        gone_at = time.monotonic()  # its VM no longer exists: nothing posted from here can be confirmed by it
        # A new leader, as the nodes left report it (each look is a CLI call of about a
        # second: the figure is an upper bound).
        new_leader = wait_for(lambda: _other_leader(cluster, leader.name), timeout=60, interval=0.1)
        elected_at = time.monotonic()
        wait_for(lambda: stream.accepted_at_least(gone_at, 1), timeout=60, interval=0.02)
        with stream.lock:
            first_200 = min(p.started + p.attempt.seconds for p in stream.posted
                            if p.started >= gone_at and p.attempt.status == 200)
        wait_for(lambda: stream.accepted_at_least(first_200, 60), timeout=60)  # and it stays so
    posted = stream.posted
    acknowledged = {id(p.fields) for p in posted if p.attempt.status == 200}
    after_kill = [p for p in posted if p.started >= killed_at]
    refused = [p.attempt for p in after_kill if p.attempt.status != 200]
    # The election, as far as the CLI can tell: from the kill until a new leader was reported.
    during = [p.attempt for p in after_kill if p.started <= elected_at]
    accepted_during = [a for a in during if a.status == 200]
    last_refused = max((p.started + p.attempt.seconds for p in after_kill if p.attempt.status != 200),
                       default=killed_at)
    # Africa's Talking sends again what was not answered 200.
    retried = [p.fields for p in posted if id(p.fields) not in acknowledged]
    retries = list(itertools.chain.from_iterable(post_like_at(stack, fields, time.monotonic() + 60)
                                                 for fields in retried))
    sent = [p.fields for p in posted]
    wait_until_applied(stack, sent, timeout=90)
    applied_at = time.monotonic()
    restarted = [name for name, process in stack.processes.items()
                 if process.poll() is not None or process.pid != pids.get(name)]
    publish_failures = _publish_failures(stack)
    return tally(
        stack, "RabbitMQ cluster: the webhook queue's leader node SIGKILLed under load (quorum queues)", sent,
        answered_200=len(acknowledged),
        answered_200_at_last=len(acknowledged) + sum(1 for a in retries if a.status == 200),
        queue_members=sorted(members.values()),
        leader_was_first_in_url=leader is cluster.nodes[0],
        after_kill=f"{len(after_kill) - len(refused)} x 200, {len(refused)} refused",
        refused_statuses=sorted({a.status for a in refused}),
        refused_without_retry_after=sum(1 for a in refused if a.status == 503 and not a.retry_after),
        slowest_refusal_ms=round(max((a.seconds for a in refused), default=0) * 1000, 1),
        during_election=f"{len(accepted_during)} x 200, {len(during) - len(accepted_during)} refused",
        slowest_200_during_election_ms=round(max((a.seconds for a in accepted_during), default=0) * 1000, 1),
        web_publish_failures=publish_failures,
        worker_connections_lost=stack.log("worker").count("Connection to broker lost"),
        node_gone_after_s=round(gone_at - killed_at, 3),
        new_leader_seen_after_s=round(elected_at - killed_at, 2),
        new_leader_was_follower=new_leader.name in members,
        accepted_again_after_s=round(first_200 - killed_at, 2),
        last_refusal_after_s=round(last_refused - killed_at, 2),
        all_applied_after_kill_s=round(applied_at - killed_at, 1),
        retried_like_at=len(retried),
        retries_answered_200=sum(1 for a in retries if a.status == 200),
        processes_restarted=restarted,
    )


def _other_leader(cluster: RabbitCluster, old: str) -> Any:
    leader = cluster.leader(WEBHOOK_QUEUE)
    return leader if leader.name != old else None


def _publish_failures(stack: Stack) -> dict[str, int]:
    """What the web's publisher raised when it did not get a confirm (each one a 503), by kind."""
    marker = '"event": "enqueue_failed"'
    return dict(Counter(json.loads(line).get("error_type") for line in stack.log("web").splitlines()
                        if marker in line and line.startswith("{")))


def delivery_limit(cluster: RabbitCluster) -> dict[str, Any]:
    """A message given back to the webhook queue with requeue more often than the delivery limit
    allows, with no worker consuming: the broker dead-letters it (at least once: confirmed by the
    dead-letter queue before it leaves the webhook queue) to ``voice-dead-letters``. Uses the
    service's own declarations of both queues, on whichever nodes are left."""
    url = cluster.live()[0].url
    declared = {queue.name: queue for queue in celery_config(
        Settings(celery_broker_url=url, celery_queue_type="quorum"))["task_queues"]}
    body = {"poison": True, "sent": time.time()}
    with Connection(url) as connection:
        channel = connection.default_channel
        queue = declared[WEBHOOK_QUEUE].bind(channel)
        queue.declare()
        dead = dead_letter_queue().bind(channel)
        dead.declare()  # as the worker does once ready; it is there already
        already_dead = dead.queue_declare(passive=True).message_count
        Producer(channel).publish(body, exchange=queue.exchange, routing_key=WEBHOOK_QUEUE, serializer="json",
                                  delivery_mode=2)
        deliveries = 0
        while (message := _get(queue)) is not None:
            deliveries += 1
            message.reject(requeue=True)  # as a worker dying on it every time gives it back
        left = queue.queue_declare(passive=True).message_count
        letter = wait_for(lambda: dead.get(no_ack=False), timeout=10, interval=0.05)
        letter.ack()
        death = (letter.headers.get("x-death") or [{}])[0]
        return {"deliveries": deliveries, "left_in_queue": left, "dead_letters_before": already_dead,
                "dead_lettered_intact": letter.payload == body, "death_reason": death.get("reason"),
                "death_queue": death.get("queue"), "nodes_running": len(cluster.live())}


def _get(queue: Any, wait: float = 3.0) -> Any:
    """The queue's next message, or None once none has come for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = queue.get(no_ack=False)
        if message is not None:
            return message
        time.sleep(0.05)
    return None
