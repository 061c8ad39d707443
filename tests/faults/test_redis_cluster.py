"""A master of the Redis Cluster holding the dedup cache is SIGKILLed (RabbitMQ is the broker): its
replica takes over, every webhook is answered 200, nothing is lost or applied twice, no process is
restarted, and /readyz says degraded (200), never unavailable, until the client has the new layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.redis_cluster import redis_cluster_failover

pytestmark = pytest.mark.faults


def test_a_cluster_master_killed_under_a_steady_stream(tmp_path: Path) -> None:
    tally = redis_cluster_failover(tmp_path)
    print(tally)
    notes = tally.notes
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent, tally
    assert notes["answered_200"] == tally.sent, tally  # the webhook's path never touches Redis here
    assert notes["processes_restarted"] == [], tally
    assert notes["dead_lettered"] == 0, tally
    assert notes["took_over_after_s"] < 10, tally
    # The cache is optional on RabbitMQ: /readyz says degraded while a master is missing, and
    # never unavailable.
    assert all(answer.startswith("200 degraded") for answer in notes["readyz_during_failover"]), tally
    assert notes["readyz_during_failover"], tally
    assert notes["readyz_ready_again_after_s"] is not None, tally
