"""The batch's claims (``dedup.claim_many``, one script for every event of a batch) against the
claims one by one (``dedup.claim``, one script each), on a real Redis: the same answers, the same
keys left behind, the same messages acknowledged."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.base.timeutil import stamp
from app.plumbing import dedup, pending, transport

EPOCH = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
KEYS = ["k0", "k1", "k2", "k3"]
OWNERS = ["t0", "t1", "t2"]


def at(seconds: int) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


@pytest.fixture
def acks() -> Iterator[type]:
    """This thread as the consuming one; the bookkeeping put back as it was after."""
    kept = transport._Acks
    saved = (kept.pid, kept.thread, kept.keys, dict(kept.tags), dict(kept.ids), set(kept.acked))
    kept.pid, kept.thread, kept.keys = os.getpid(), threading.get_ident(), ("unacked", "unacked_index")
    try:
        yield kept
    finally:
        kept.pid, kept.thread, kept.keys = saved[:3]
        for live, old in zip((kept.tags, kept.ids, kept.acked), saved[3:], strict=True):
            live.clear()
            live.update(old)


# What a key holds before the claims: nothing, a claim of one of the owners, or a done mark.
before_states = st.sampled_from([None, *[f"claim:{o}" for o in OWNERS], *[f"done:{stamp(at(s))}" for s in (5, 10)]])
claims = st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(OWNERS), st.sampled_from([0, 5, 10, 15]),
                            st.booleans()), min_size=1, max_size=8)


def prepare(client: redis.Redis, acks: type, before: dict[str, str | None],
            made: list[tuple[str, str, int, bool]]) -> None:
    client.flushdb()
    acks.tags.clear()
    acks.ids.clear()
    acks.acked.clear()
    for key, value in before.items():
        client.hset(pending.PENDING_DATA, key, "{}")
        client.zadd(pending.PENDING_DUE, {key: 1})
        client.hset(pending.PENDING_SENDS, key, 1)
        if value is not None:
            client.set(dedup.DEDUP_PREFIX + key, value, ex=600)
    for n, (_key, owner, _arrived, consumed) in enumerate(made):
        if consumed:  # this process consumes the task's message: its delivery is known here
            tag = f"tag-{n}"
            acks.tags[owner], acks.ids[tag] = tag, owner
            client.hset("unacked", tag, "message")
            client.zadd("unacked_index", {tag: n})


def left(client: redis.Redis, acks: type) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name in client.keys("*"):
        kind = client.type(name).decode()
        if kind == "string":
            seen[name.decode()] = (client.get(name), client.ttl(name) > 0)
        elif kind == "hash":
            seen[name.decode()] = client.hgetall(name)
        else:
            seen[name.decode()] = client.zrange(name, 0, -1, withscores=True)
    return {"redis": seen, "acked": set(acks.acked)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.fixed_dictionaries({key: before_states for key in KEYS}), made=claims)
def test_one_script_for_a_batch_answers_as_one_script_per_event(app: Flask, acks: type,
                                                                 before: dict[str, str | None],
                                                                 made: list[tuple[str, str, int, bool]]) -> None:
    client = app.extensions["redis"]
    batch = [(key, owner, at(arrived)) for key, owner, arrived, _ in made]
    with app.app_context():
        assert pending.in_use()
        prepare(client, acks, before, made)
        one_by_one = [dedup.claim(*claim) for claim in batch]
        expected = left(client, acks)
        prepare(client, acks, before, made)
        together = dedup.claim_many(batch)
        assert together == one_by_one
        assert left(client, acks) == expected


def test_every_answer_shows_up(app: Flask, acks: type) -> None:
    """The states the comparison above must meet, in one batch: a new event, a copy of an applied
    one (its pending entry and its message's unacknowledged record dropped), a copy that arrived
    before the applied one, another task's claim, a task's own claim, and an event twice."""
    client = app.extensions["redis"]
    before = {"k0": None, "k1": f"done:{stamp(at(5))}", "k2": f"done:{stamp(at(5))}", "k3": "claim:t9"}
    made = [("k0", "t0", 0, True), ("k1", "t1", 10, True), ("k2", "t2", 0, True), ("k3", "t3", 0, True),
            ("k4", "t4", 0, True), ("k4", "t5", 0, True)]
    with app.app_context():
        prepare(client, acks, before, made)
        client.set(dedup.DEDUP_PREFIX + "k4", "claim:t4", ex=60)
        answers = dedup.claim_many([(key, owner, at(arrived)) for key, owner, arrived, _ in made])
        assert answers == ["claimed", "duplicate", "earlier", "busy", "claimed", "busy"]
        assert client.hexists(pending.PENDING_DATA, "k1") is False
        assert client.hexists("unacked", "tag-1") is False
        assert client.hexists("unacked", "tag-0") is True
        assert acks.acked == {"tag-1"}
        assert client.get(dedup.DEDUP_PREFIX + "k0") == b"claim:t0"
