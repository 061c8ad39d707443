"""The delivery guarantees under faults, on servers of the suite's own. Each scenario's tally must
show every distinct event applied, none twice, none lost, and that the fault struck work in flight
(a fault that missed the load proves nothing). Each test's time limit comes from its scenario's
waits, which come from the settings recovery depends on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import rabbitmq, scenarios
from tests.faults.scenarios import TIME_LIMITS

pytestmark = pytest.mark.faults


def check(tally: scenarios.Tally) -> None:
    print(tally)
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent, tally


@pytest.mark.timeout(TIME_LIMITS["kill"])
def test_worker_killed_mid_stream(tmp_path: Path) -> None:
    tally = scenarios.worker_killed(tmp_path)
    check(tally)
    assert tally.notes["answers"] == {"200": tally.sent}
    assert tally.notes["held_at_kill"] > 0, tally  # the kill struck messages taken or waiting


@pytest.mark.timeout(TIME_LIMITS["gap"])
def test_message_taken_by_a_worker_that_died_before_recording_it(tmp_path: Path) -> None:
    tally = scenarios.taken_but_never_recorded(tmp_path)
    check(tally)
    assert tally.notes["messages_vanished"] == 10
    assert tally.notes["sweeper_resent"] >= 10, tally  # only the sweeper can have brought them back


@pytest.mark.timeout(TIME_LIMITS["redis-down"])
def test_redis_down_at_ingress(tmp_path: Path) -> None:
    tally = scenarios.redis_down_at_ingress(tmp_path)
    check(tally)
    assert tally.notes["during_outage_200"] == 0  # no 200 for a task that was not queued
    assert tally.notes["during_outage_503"] == "30/30"
    assert tally.notes["slowest_503_ms"] < 1000
    assert tally.notes["retry_after"] is True


@pytest.mark.timeout(TIME_LIMITS["db-down"])
def test_database_down_during_processing(tmp_path: Path) -> None:
    tally = scenarios.database_down(tmp_path)
    check(tally)
    assert tally.notes["retries"] > 0


@pytest.mark.timeout(TIME_LIMITS["dead-letters"])
def test_dead_letters_are_listed_and_replayed_once(tmp_path: Path) -> None:
    tally = scenarios.dead_letters(tmp_path)
    check(tally)
    assert tally.notes["listed"] == f"{tally.sent} dead letter(s)"
    assert tally.notes["replayed"] == f"replayed {tally.sent} dead letter(s)"
    assert tally.notes["second_replay"] == "replayed 0 dead letter(s)"


@pytest.mark.timeout(TIME_LIMITS["redis-forgot"])
def test_redis_forgot_between_delivery_and_duplicate(tmp_path: Path) -> None:
    tally = scenarios.redis_forgot(tmp_path)
    check(tally)
    assert tally.notes["second_answers"] == {"200": tally.sent}
    assert tally.notes["duplicates_seen"] >= tally.sent, tally  # each second copy met the database's guard


@pytest.mark.timeout(TIME_LIMITS["storm"])
def test_storm_ends_in_the_arrival_order_state(tmp_path: Path) -> None:
    tally = scenarios.storm(tmp_path)
    check(tally)
    notes = tally.notes
    assert notes["answers"] == {"200": notes["deliveries"]}
    assert notes["duplicate_outcomes"] >= notes["duplicate_deliveries"], notes  # every extra copy was dropped
    assert notes["events_not_at_first_arrival"] == 0, notes["mistimed_examples"]
    assert notes["recordings_not_in_arrival_state"] == 0, notes["mismatched_examples"]
    # All but a few, whose requests were too tangled in time to try every order of.
    assert notes["recordings_checked"] >= 0.98 * notes["recordings"], notes


@pytest.mark.timeout(TIME_LIMITS["rolling-restart"])
def test_rolling_restart_of_web_and_worker(tmp_path: Path) -> None:
    tally = scenarios.rolling_restart(tmp_path)
    check(tally)
    assert tally.notes["answered_5xx"] == 0
    assert tally.notes["refused_while_web_restarted"] > 0, tally  # the web went away under load
    assert tally.notes["accepted_while_worker_restarted"] > 0, tally  # events came while no worker ran


@pytest.mark.timeout(TIME_LIMITS["out-of-order"])
def test_a_later_copy_applied_first_keeps_the_first_arrival(tmp_path: Path) -> None:
    tally = scenarios.copies_out_of_order(tmp_path)
    check(tally)
    notes = tally.notes
    assert notes["answers"] == {"200": 2 * tally.sent}
    assert notes["messages_reversed"] == 2 * tally.sent  # every copy was waiting, in reverse order
    assert notes["copies_finished"] == 2 * tally.sent  # checked once every copy's task had ended
    assert notes["events_not_at_first_arrival"] == 0, notes["mistimed_examples"]
    assert notes["recordings_not_in_arrival_state"] == 0, notes["mismatched_examples"]
    assert notes["recordings_checked"] == notes["recordings"]
    assert notes["recordings_order_unsure"] == 0  # posted one at a time: every order is known


@pytest.mark.timeout(TIME_LIMITS["stale-claim"])
def test_claims_left_by_dead_tasks_are_waited_for(tmp_path: Path) -> None:
    tally = scenarios.claim_left_by_a_dead_task(tmp_path)
    check(tally)
    notes = tally.notes
    assert notes["events_met_busy"] == notes["stale_claims"], tally  # the copies found the claims standing
    assert notes["dead_lettered"] == 0, tally  # waited for the claims instead of giving up
    assert notes["sweeper_resent"] >= notes["stale_claims"], tally  # only the pending set held them


def test_redis_down_with_rabbitmq_as_the_broker(tmp_path: Path) -> None:
    tally = rabbitmq.redis_down_on_rabbitmq(tmp_path)
    check(tally)
    accepted, posted = map(int, tally.notes["during_outage_200"].split("/"))
    assert accepted == posted == 80  # 40 new events, 20 of them twice, 20 applied before: all answered 200
    assert tally.notes["readyz_during_outage"] == (200, "degraded", ["redis"])
