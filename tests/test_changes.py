"""The change feed on real databases: shape, paging, errors, and the promise that a consumer
following ``next_cursor`` misses no committed change, even one that committed out of order."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.applying.domain import apply_event
from app.base.extensions import db
from app.payload.events import Event
from config import Settings
from tests.conftest import API_KEY
from tests.support import PG_ADMIN_DSN, wait_for

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
P1, P2 = "+254712345678", "+254787654321"
FEED = "/api/v1/voice/changes"


def ev(session: str, status: str, phone: str | None = None, duration: int | None = None,
       url: str | None = None) -> Event:
    fields: dict[str, Any] = {"sessionId": session, "status": status}
    for name, value in (("phoneNumber", phone), ("duration", duration), ("recordingUrl", url)):
        if value is not None:
            fields[name] = value
    return Event(session, status, phone, url, duration, fields)


def apply(app: Flask, event_: Event, seconds: float) -> None:
    with app.app_context():
        apply_event(db.session, event_, T0 + timedelta(seconds=seconds))


class Consumer:
    """What a downstream system does: follow next_cursor, keep the latest state of each recording."""

    def __init__(self, client: FlaskClient, limit: int = 3) -> None:
        self.client = client
        self.limit = limit
        self.cursor: str | None = None
        self.state: dict[str, dict] = {}
        self.taken: list[str] = []  # recording ids in the order the feed gave them
        self.pages = 0

    def page(self) -> dict:
        query = {"limit": str(self.limit)} | ({"after": self.cursor} if self.cursor else {})
        answer = self.client.get(FEED, query_string=query, headers={"Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()

    def catch_up(self) -> int:
        """Read pages until one is empty; returns how many items it took in."""
        taken = 0
        while True:
            body = self.page()
            self.pages += 1
            for item in body["changes"]:
                self.state[item["recording"]["recording_id"]] = item["recording"]
                self.taken.append(item["recording"]["recording_id"])
            taken += len(body["changes"])
            self.cursor = body["next_cursor"]
            if not body["changes"]:
                return taken

    def follow_until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        """Keep polling until ``done`` or the timeout (the caller's assertion then says what is
        missing): on PostgreSQL any long transaction on the server (another test's, another
        database's) holds the feed back for as long as it runs."""
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: self.catch_up() is not None and done(), timeout=timeout, interval=0.1)


def get(client: FlaskClient, recording_id: str) -> dict:
    return client.get(f"/api/v1/voice/recordings/{recording_id}", headers={"Authorization": f"Bearer {API_KEY}"}
                      ).get_json()


def test_empty_feed_returns_a_cursor_to_poll_with(client: FlaskClient, auth: dict) -> None:
    body = client.get(FEED, headers=auth).get_json()
    assert body["changes"] == []
    assert body["next_cursor"]
    again = client.get(FEED, query_string={"after": body["next_cursor"]}, headers=auth).get_json()
    assert again == {"changes": [], "next_cursor": body["next_cursor"]}


def test_items_are_the_single_get_and_a_recording_changed_twice_shows_once_at_its_latest(
    app: Flask, client: FlaskClient
) -> None:
    apply(app, ev("A", "busy", P1), 0)
    apply(app, ev("B", "no-answer", P2), 1)
    apply(app, ev("A", "completed", P1, 30, "https://r.example/a.mp3"), 2)
    consumer = Consumer(client, limit=1)
    consumer.follow_until(lambda: set(consumer.state) == {"A", "B"})
    assert consumer.taken == ["B", "A"]  # A changed twice: one item, at its latest change, after B
    assert consumer.state == {"A": get(client, "A"), "B": get(client, "B")}
    assert consumer.state["A"]["status"] == "completed"
    # An empty page at the end hands back the cursor it was given.
    empty = consumer.page()
    assert empty == {"changes": [], "next_cursor": consumer.cursor}


def test_a_later_change_moves_the_recording_past_the_cursor(app: Flask, client: FlaskClient) -> None:
    apply(app, ev("A", "busy", P1), 0)
    apply(app, ev("B", "busy", P2), 1)
    consumer = Consumer(client)
    consumer.follow_until(lambda: len(consumer.taken) == 2)
    apply(app, ev("A", "completed", P1, 12), 2)
    consumer.follow_until(lambda: len(consumer.taken) == 3)
    assert consumer.taken[2:] == ["A"]
    assert consumer.state["A"] == get(client, "A")
    assert consumer.state["A"]["duration"] == 12
    # An event that changes nothing visible leaves the feed alone.
    apply(app, ev("A", "busy", P1), 0.5)
    assert consumer.catch_up() == 0


def test_each_item_carries_a_cursor_to_resume_from(app: Flask, client: FlaskClient, auth: dict) -> None:
    for n in range(5):
        apply(app, ev(f"R{n}", "busy", P1), n)
    items = client.get(FEED, headers=auth).get_json()["changes"]
    assert [i["recording"]["recording_id"] for i in items] == [f"R{n}" for n in range(5)]
    rest = client.get(FEED, query_string={"after": items[1]["cursor"]}, headers=auth).get_json()
    assert [i["recording"]["recording_id"] for i in rest["changes"]] == ["R2", "R3", "R4"]
    assert rest["next_cursor"] == items[4]["cursor"]


def test_limit_defaults_to_100_and_allows_1000(app: Flask, client: FlaskClient, auth: dict) -> None:
    for n in range(101):
        apply(app, ev(f"R{n:03}", "busy"), n)
    assert len(client.get(FEED, headers=auth).get_json()["changes"]) == 100
    assert len(client.get(FEED, query_string={"limit": "1000"}, headers=auth).get_json()["changes"]) == 101


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"limit": "0"}, "limit must be an integer between 1 and 1000"),
        ({"limit": "1001"}, "limit must be an integer between 1 and 1000"),
        ({"limit": "ten"}, "limit must be an integer between 1 and 1000"),
        ({"limit": "²"}, "limit must be an integer between 1 and 1000"),
        ({"after": "not-a-cursor"}, "after is not a cursor this feed issued"),
        ({"after": "WzEsMiwzXQ"}, "after is not a cursor this feed issued"),  # [1,2,3]
        ({"after": "WyJ4IiwiQSJd"}, "after is not a cursor this feed issued"),  # ["x","A"]
        ({"after": "WzEsIkFcdTAwMDAiXQ"}, "after is not a cursor this feed issued"),  # [1,"A\u0000"]
        ({"after": "WzEwMDAwMDAwMDAwMDAwMDAwMDAwMCwiQSJd"}, "after is not a cursor this feed issued"),  # 1e22
    ],
)
def test_bad_parameters_are_400(client: FlaskClient, auth: dict, query: dict, error: str) -> None:
    answer = client.get(FEED, query_string=query, headers=auth)
    assert answer.status_code == 400
    assert answer.get_json() == {"error": error}


def test_the_feed_needs_a_key(client: FlaskClient) -> None:
    answer = client.get(FEED)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_consumer_following_concurrent_writers_ends_with_every_recording_as_get_shows_it(
    app: Flask, client: FlaskClient
) -> None:
    """Four writer threads apply a shuffled load while the consumer keeps following the feed."""
    rng = random.Random(14)
    events = []
    for n in range(30):
        session = f"C{n:02}"
        url = f"https://r.example/{n}.mp3"
        events += [(ev(session, "busy", P1), rng.uniform(0, 60)),
                   (ev(session, "completed", P2, rng.randint(1, 600), url), rng.uniform(0, 60))]
    rng.shuffle(events)
    chunks = [events[i::4] for i in range(4)]
    errors: list[BaseException] = []

    def write(chunk: list[tuple[Event, float]]) -> None:
        try:
            for event_, seconds in chunk:
                apply(app, event_, seconds)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    consumer = Consumer(client, limit=7)
    while any(t.is_alive() for t in threads):
        consumer.catch_up()
    for thread in threads:
        thread.join()
    assert not errors
    expected_ids = {f"C{n:02}" for n in range(30)}
    consumer.follow_until(lambda: consumer.state == {rid: get(client, rid) for rid in expected_ids})
    assert set(consumer.state) == expected_ids
    assert consumer.state == {rid: get(client, rid) for rid in expected_ids}


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_change_that_commits_after_a_later_one_is_not_missed(
    make_app: Any, postgresql_url: str, settings: Settings
) -> None:
    """Writer A takes its place in the feed first and commits last; a consumer reads in between.

    A feed ordered by processed_at (or by a sequence taken in the transaction) hands the consumer
    B's position while A is still uncommitted, and A then lands behind the cursor: missed.
    """
    app = make_app(settings)
    client = app.test_client()
    a_flushed, release_a = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def writer_a() -> None:
        try:
            with app.app_context(), Session(db.engine) as session:
                def hold(*_args: Any) -> None:
                    a_flushed.set()  # A's changes, and its place in the feed, are written, not committed
                    assert release_a.wait(20)

                event.listen(session, "after_flush", hold, once=True)
                apply_event(session, ev("A", "completed", P1, 10, "https://r.example/a.mp3"), T0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer_a)
    thread.start()
    try:
        assert a_flushed.wait(20)
        apply(app, ev("B", "completed", P2, 20, "https://r.example/b.mp3"), 1)  # B commits while A waits
        consumer = Consumer(client)
        consumer.catch_up()
        assert "A" not in consumer.state  # A is not committed: the consumer cannot have it yet
    finally:
        release_a.set()
        thread.join(30)
    assert not errors
    expected = {"A": get(client, "A"), "B": get(client, "B")}
    consumer.follow_until(lambda: set(consumer.state) == {"A", "B"}, timeout=10)
    assert consumer.state == expected


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_transaction_open_in_another_database_does_not_hold_the_feed_back(
    app: Flask, client: FlaskClient, auth: dict
) -> None:
    """Transaction ids are shared by the whole server; only this database's writers matter."""
    with psycopg.connect(PG_ADMIN_DSN) as elsewhere:  # the server's `test` database, not the service's
        elsewhere.execute("SELECT pg_current_xact_id()")  # holds an id, uncommitted, for the block
        apply(app, ev("R", "busy", P1), 1)
        items = client.get(FEED, headers=auth).get_json()["changes"]
        assert [item["recording"]["recording_id"] for item in items] == ["R"]
        elsewhere.rollback()


@pytest.mark.parametrize("path", ["/api/v1/voice/recordings", FEED])
def test_a_non_ascii_digit_limit_is_400_not_500(client: FlaskClient, auth: dict, path: str) -> None:
    answer = client.get(path, query_string={"limit": "²"}, headers=auth)
    assert answer.status_code == 400
    assert answer.get_json()["error"].startswith("limit must be an integer between 1 and ")
