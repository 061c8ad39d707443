"""The PostgreSQL primary killed under load and its synchronous standby promoted: every webhook
answered 200 throughout (the acknowledgement needs no database), every event applied once on the
new primary with no process restarted, and a consumer following the change feed across the
failover ends with every recording's latest state."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.pg_failover import AFTER_PROMOTION, BEFORE_KILL, TIME_LIMIT, pg_failover
from tests.faults.scenarios import RETRY_RETURNS_WITHIN

pytestmark = pytest.mark.faults


@pytest.mark.timeout(TIME_LIMIT)
def test_the_primary_killed_and_its_synchronous_standby_promoted_under_load(tmp_path: Path) -> None:
    tally = pg_failover(tmp_path)
    print(tally)
    notes = tally.notes
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent, tally
    assert tally.sent >= BEFORE_KILL + AFTER_PROMOTION, tally
    assert notes["processes_restarted"] == [], tally
    assert notes["answers"] == {"200": tally.sent}, tally  # never a 5xx: the web's answer needs no database
    assert notes["posted_during_failover"] > 0, tally  # the stream went on while no primary took writes
    assert notes["not_200_during_failover"] == 0, tally
    assert notes["committed_before_kill"] > 0, tally
    assert notes["worker_retries"] > 0, tally  # the worker met the outage, and waited it out
    assert notes["first_applied_after_promotion_s"] < RETRY_RETURNS_WITHIN, tally
    assert notes["feed_missing"] == 0, tally
    assert notes["feed_stale"] == 0, tally
