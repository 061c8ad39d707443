"""The Redis master dies behind Sentinel: refused (503 + Retry-After) while there is no master,
accepted again after the promotion with no process restarted, nothing applied twice; with
REDIS_MIN_REPLICAS=1 nothing acknowledged is lost, even when the replicas lag behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import netns
from tests.faults.sentinel import sentinel_failover

pytestmark = pytest.mark.faults

# Replication on one machine lags by milliseconds: an event the old master answered 200 longer
# than this before it died had reached a replica, and must not be lost, WAIT or not.
REPLICATION_LAG_S = 2.0


@pytest.mark.parametrize(("min_replicas", "lagging"), [
    pytest.param(0, False, id="no-wait"),
    # The replicas are cut off (network namespaces) before the master dies, so that asynchronous
    # replication loses the last events: without WAIT they are lost (the control, "no-wait-lagging")...
    pytest.param(0, True, id="no-wait-lagging"),
    # ...and with it none is: the assertion that none is lost means something.
    pytest.param(1, True, id="wait-lagging"),
])
def test_redis_master_killed_behind_sentinel(tmp_path: Path, min_replicas: int, lagging: bool) -> None:
    if lagging:  # never run without the lag, where the outcome is the same with or without WAIT
        netns.require("cutting the Redis replicas off before the master dies")
    tally = sentinel_failover(tmp_path, min_replicas=min_replicas, lagging=lagging)
    print(tally)
    notes = tally.notes
    assert tally.applied_twice == 0, tally
    assert notes["processes_restarted"] == [], tally
    assert notes["refused_statuses"] == [503], tally  # nothing but 503 while there was no master
    assert notes["refused_without_retry_after"] == 0, tally
    assert notes["slowest_refusal_ms"] < 1000, tally
    # A failover after cut-off replicas may be aborted once (no replica was reachable yet) and
    # retried after twice the failover timeout (tests.redis_ha.FAILOVER_TIMEOUT_MS).
    assert notes["accepted_again_after_s"] < 30, tally
    assert notes["retries_answered_200"] == notes["retried_like_at"], tally  # every refused event got in
    assert notes["answered_200_at_last"] == tally.sent, tally  # so every event sent was acknowledged
    # What a master acknowledged after the kill (the promoted one: the stream, the retries) it
    # holds: never lost, WAIT or not.
    assert notes["lost_acknowledged_after_kill"] == 0, tally
    assert notes["lost_acknowledged_before_kill"] == tally.lost, tally  # every loss: the old master's
    oldest_loss = notes["oldest_lost_posted_s_before_kill"] or 0.0
    if lagging:
        cut_off_for = notes["replicas_cut_off_for_s"]
        # The cut held: the link stayed down long enough for both ends to give replication up.
        assert cut_off_for >= 4 - 0.5, tally
        assert notes["posted_while_replicas_cut_off"] >= 20, tally
    if min_replicas:
        assert tally.lost == 0, tally
        assert tally.applied == tally.sent, tally
        # WAIT did it: while no replica could acknowledge, no event was answered 200.
        assert notes["answered_200_while_replicas_cut_off"] == 0, tally
        assert notes["refused_while_replicas_cut_off"] >= 20, tally
    elif lagging:
        # Without WAIT the events answered 200 while the replicas were cut off had no copy but the
        # old master's (the worker was paused): they are lost, the loss REDIS_MIN_REPLICAS=1 prevents.
        assert notes["answered_200_while_replicas_cut_off"] >= 20, tally
        assert tally.lost > 0, tally
        assert oldest_loss <= cut_off_for + REPLICATION_LAG_S, tally
    else:
        # A loss may happen or not (async replication); any event lost was answered 200 by the
        # old master just before it died, within the replication lag.
        assert oldest_loss <= REPLICATION_LAG_S, tally
