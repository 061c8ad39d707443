"""The delivery guarantees under faults, on servers of the suite's own. Each scenario's tally must
show every distinct event applied, none twice, none lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import rabbitmq, scenarios

pytestmark = pytest.mark.faults


def check(tally: scenarios.Tally) -> None:
    print(tally)
    assert tally.applied_twice == 0, tally
    assert tally.lost == 0, tally
    assert tally.applied == tally.sent, tally


def test_worker_killed_mid_stream(tmp_path: Path) -> None:
    tally = scenarios.worker_killed(tmp_path)
    check(tally)
    assert tally.notes["answers"] == {"200": tally.sent}


def test_message_taken_by_a_worker_that_died_before_recording_it(tmp_path: Path) -> None:
    tally = scenarios.taken_but_never_recorded(tmp_path)
    check(tally)
    assert tally.notes["messages_vanished"] == 10


def test_redis_down_at_ingress(tmp_path: Path) -> None:
    tally = scenarios.redis_down_at_ingress(tmp_path)
    check(tally)
    assert tally.notes["during_outage_200"] == 0  # no 200 for a task that was not queued
    assert tally.notes["during_outage_503"] == "30/30"
    assert tally.notes["slowest_503_ms"] < 1000
    assert tally.notes["retry_after"] is True


def test_database_down_during_processing(tmp_path: Path) -> None:
    tally = scenarios.database_down(tmp_path)
    check(tally)
    assert tally.notes["retries"] > 0


def test_dead_letters_are_listed_and_replayed_once(tmp_path: Path) -> None:
    tally = scenarios.dead_letters(tmp_path)
    check(tally)
    assert tally.notes["listed"] == f"{tally.sent} dead letter(s)"
    assert tally.notes["replayed"] == f"replayed {tally.sent} dead letter(s)"
    assert tally.notes["second_replay"] == "replayed 0 dead letter(s)"


def test_redis_forgot_between_delivery_and_duplicate(tmp_path: Path) -> None:
    tally = scenarios.redis_forgot(tmp_path)
    check(tally)
    assert tally.notes["duplicates_seen"] >= tally.sent


def test_storm_ends_in_the_arrival_order_state(tmp_path: Path) -> None:
    tally = scenarios.storm(tmp_path)
    check(tally)
    assert tally.notes["recordings_not_in_arrival_state"] == 0, tally.notes["mismatched_examples"]
    assert tally.notes["deliveries"] == 5000


def test_rolling_restart_of_web_and_worker(tmp_path: Path) -> None:
    tally = scenarios.rolling_restart(tmp_path)
    check(tally)
    assert tally.notes["answered_5xx"] == 0


def test_redis_down_with_rabbitmq_as_the_broker(tmp_path: Path) -> None:
    tally = rabbitmq.redis_down_on_rabbitmq(tmp_path)
    check(tally)
    accepted, posted = map(int, tally.notes["during_outage_200"].split("/"))
    assert accepted == posted == 80  # 40 new events, 20 of them twice, 20 applied before: all answered 200
    assert tally.notes["readyz_during_outage"] == (200, "degraded", ["redis"])
