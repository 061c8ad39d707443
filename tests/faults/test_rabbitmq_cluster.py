"""The node leading the webhook queue of a three-node RabbitMQ cluster SIGKILLed under load: the
two nodes left elect a new leader, the web answers 200 again within seconds (503 with
Retry-After meanwhile, never another error), no process restarted, nothing lost, nothing applied
twice; and on the two nodes left, a message given back past the delivery limit is dead-lettered
to ``voice-dead-letters``, not dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.plumbing.queues import DEAD_LETTER_QUEUE, DELIVERY_LIMIT, WEBHOOK_QUEUE
from tests.faults.rabbitmq_cluster import rabbitmq_cluster_leader_killed

pytestmark = pytest.mark.faults


def test_rabbitmq_cluster_loses_the_webhook_queue_leader_under_load(tmp_path: Path) -> None:
    tally = rabbitmq_cluster_leader_killed(tmp_path)
    print(tally)
    notes = tally.notes
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent == notes["answered_200_at_last"], tally
    assert notes["queue_members"] == ["follower", "follower", "leader"], tally  # one member on each node
    assert notes["processes_restarted"] == [], tally
    assert set(notes["refused_statuses"]) <= {503}, tally
    assert notes["refused_without_retry_after"] == 0, tally
    assert notes["slowest_refusal_ms"] < 1000, tally
    assert notes["accepted_again_after_s"] < 30, tally
    assert notes["retries_answered_200"] == notes["retried_like_at"], tally
    limit = notes["delivery_limit"]
    assert limit["nodes_running"] == 2, tally
    assert limit["deliveries"] == DELIVERY_LIMIT + 1, tally  # the first delivery and the limit's redeliveries
    assert limit["left_in_queue"] == 0, tally
    assert limit["dead_lettered_intact"], tally
    assert limit["death_queue"] == WEBHOOK_QUEUE, tally
    assert DEAD_LETTER_QUEUE  # where delivery_limit() looked for it
