"""The RabbitMQ broker stopped under load and started again: 503 + Retry-After within a second
while it is down, publishing and consuming again with no process restarted, nothing lost from
classic durable or quorum queues, nothing applied twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.rabbitmq_restart import rabbitmq_restart

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_rabbitmq_stopped_and_started_under_load(tmp_path: Path, queue_type: str) -> None:
    tally = rabbitmq_restart(tmp_path, queue_type=queue_type)
    print(tally)
    notes = tally.notes
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent, tally
    assert notes["queued_when_stopped"] >= 40, tally  # the restart had messages to keep
    assert notes["processes_restarted"] == [], tally
    assert notes["refused_statuses"] == [503], tally
    assert notes["refused_without_retry_after"] == 0, tally
    assert notes["slowest_refusal_ms"] < 1000, tally
    assert notes["retries_answered_200"] == notes["retried_like_at"], tally
