"""Fault scenario: the Redis master (broker and dedup cache) dies behind a Sentinel group.

A master, two replicas and three sentinels of the scenario's own, a stack on a PostgreSQL of its
own whose REDIS_URL names the sentinels. Webhooks arrive in a steady stream; the master is
SIGKILLed. While there is no master, webhooks are answered 503 with Retry-After within a second;
once a replica is promoted they are answered 200 again, with no process restarted. Events that
got 503 are sent again, as Africa's Talking does. An event answered 200 whose write had not
reached a replica is lost with the master (asynchronous replication); with REDIS_MIN_REPLICAS=1
no event is answered 200 before a replica holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.e2e.stack import Stack
from tests.faults.scenarios import Attempt, Tally, ident, make_events, post_like_at, post_once, stored_idents, tally
from tests.netns import Hosts
from tests.redis_ha import MASTER_NAME, SentinelGroup
from tests.support import PostgresServer, wait_for


class StreamRanOut(Exception):
    """A scenario waited for more accepted events than its stream had left to send."""


@dataclass
class Posted:
    fields: dict[str, str]
    started: float
    attempt: Attempt


class SteadyStream:
    """``threads`` clients, each posting the next event every ``pause`` seconds until stopped;
    each event is posted once (what happens to refused ones is decided later)."""

    def __init__(self, stack: Stack, events: list[dict[str, str]], threads: int = 3, pause: float = 0.03) -> None:
        self.stack = stack
        self.events = iter(events)
        self.lock = threading.Lock()
        self.posted: list[Posted] = []
        self.stopped = threading.Event()
        self.ran_out = False
        self.pause = pause
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                fields = next(self.events, None)
                if fields is None:
                    self.ran_out = True
                    return
            started = time.monotonic()
            attempt = post_once(self.stack, fields)
            with self.lock:
                self.posted.append(Posted(fields, started, attempt))
            self.stopped.wait(self.pause)

    def __enter__(self) -> SteadyStream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def accepted_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for p in self.posted if p.started >= since and p.attempt.status == 200)

    def accepted_at_least(self, since: float, count: int) -> bool:
        """Whether ``count`` events posted since ``since`` were answered 200; raises when too few
        were and no more will come, so that a wait on it says why it gave up."""
        ran_out = self.ran_out  # read first: an event posted after this is counted below
        if self.accepted_since(since) >= count:
            return True
        if ran_out:
            raise StreamRanOut(f"the stream ran out of events ({len(self.posted)} posted): too few for the scenario")
        return False


def idle(group: SentinelGroup) -> bool:
    """Nothing queued and nothing pending on the current master: every event that survived in
    Redis has been applied (the pending entry is dropped only after the transaction commits)."""
    address = group.master_address()
    if address is None:
        return False
    client = redis.Redis(host=address[0], port=address[1], socket_timeout=2)
    try:
        return client.llen("voice-webhooks") == 0 and client.zcard("voice:pending:due") == 0
    finally:
        client.close()


def sentinel_failover(workdir: Path, seed: int = 10, min_replicas: int = 0, lagging: bool = False) -> Tally:
    """``lagging``: the replicas run on hosts of their own (network namespaces) whose links are cut
    for the last webhooks before the master dies, long enough that both sides give the
    replication link up, and the worker is paused: what only the master held is still queued
    when it dies. Answered 200 then, it is lost; with REDIS_MIN_REPLICAS=1 it is refused (503)
    and sent again instead."""
    # More events than the stream needs: it stops at the scenario's end, and a failover that is
    # aborted once (cut-off replicas) refuses many of them fast meanwhile.
    events = make_events(sessions=2500, participants=2, per_session=2, seed=seed, prefix=f"sentinel{min_replicas}")
    with contextlib.ExitStack() as cleanup:
        hosts = cleanup.enter_context(Hosts(2)) if lagging else None
        return _with_hosts(workdir, events, min_replicas, hosts)


def _with_hosts(workdir: Path, events: list[dict[str, str]], min_replicas: int, hosts: Hosts | None) -> Tally:
    postgres = PostgresServer().init().start()
    try:
        with SentinelGroup(workdir / "redis", replicas=2, sentinels=3, hosts=hosts) as group:
            stack = Stack(workdir, postgres.url, redis_url=group.url, beat=True, REDIS_SENTINEL_MASTER=MASTER_NAME,
                          REDIS_MIN_REPLICAS=str(min_replicas), PENDING_REDELIVERY_SECONDS="10")
            try:
                stack.start()
                return _run(stack, group, events, min_replicas, hosts)
            finally:
                stack.stop()
    finally:
        postgres.remove()


def _run(stack: Stack, group: SentinelGroup, events: list[dict[str, str]], min_replicas: int,
         hosts: Hosts | None) -> Tally:
    pids = {name: process.pid for name, process in stack.processes.items()}
    with SteadyStream(stack, events) as stream:
        wait_for(lambda: stream.accepted_at_least(0, 60), timeout=60)
        old = group.master
        paused_at = cut_at = time.monotonic()
        if hosts is None:
            killed_at = time.monotonic()
            old.kill()
        else:
            worker = stack.processes["worker"].pid
            os.killpg(worker, signal.SIGSTOP)
            try:
                for host in hosts.hosts:
                    hosts.cut(host)
                cut_at = time.monotonic()  # from here no packet reaches a replica
                wait_for(lambda: sum(1 for p in stream.posted if p.started >= cut_at) >= 20, timeout=30)
                # Both ends have given the replication link up (2 s of silence), so nothing the
                # master still had to send reaches a replica once the links are back.
                wait_for(lambda: old.client().info("replication")["connected_slaves"] == 0, timeout=30)
                time.sleep(max(0.0, paused_at + 4 - time.monotonic()))  # the cut's length: twice that timeout
                killed_at = time.monotonic()
                old.kill()
            finally:
                for host in hosts.hosts:
                    hosts.restore(host)
                os.killpg(worker, signal.SIGCONT)
        _new, promoted_at = group.wait_for_promotion(old.port, timeout=30)
        # Accepted again: a webhook sent after the kill answered 200.
        wait_for(lambda: stream.accepted_at_least(killed_at, 1), timeout=30, interval=0.02)
        with stream.lock:
            first_200 = min(p.started + p.attempt.seconds for p in stream.posted
                            if p.started >= killed_at and p.attempt.status == 200)
        wait_for(lambda: stream.accepted_at_least(first_200, 60), timeout=60)  # and it stays so
    posted = stream.posted
    acknowledged = {id(p.fields) for p in posted if p.attempt.status == 200}
    after_kill = [p.attempt for p in posted if p.started >= killed_at]
    refused = [a for a in after_kill if a.status != 200]
    # Africa's Talking sends again what was not answered 200.
    retried = [p.fields for p in posted if id(p.fields) not in acknowledged]
    retried_attempts = {id(fields): post_like_at(stack, fields, time.monotonic() + 60) for fields in retried}
    retries = list(itertools.chain.from_iterable(retried_attempts.values()))
    # A task cut off mid-way by the kill keeps its claim, and its message waits out the broker's
    # visibility timeout (app.celery_app.VISIBILITY_TIMEOUT) before it comes back: allow for both.
    wait_for(lambda: idle(group), timeout=120, interval=0.5)
    drained_at = time.monotonic()
    restarted = [name for name, process in stack.processes.items()
                 if process.poll() is not None or process.pid != pids.get(name)]
    sent = [p.fields for p in posted]
    # Which events were lost, and when they had been answered 200: only the old master can have
    # acknowledged an event it then took with it; one answered 200 after the kill (by the new
    # master, or a retry) is held by the master that answered.
    stored = set(stored_idents(stack))
    lost = [p for p in posted if ident(p.fields) not in stored]
    before_kill = [p for p in lost if id(p.fields) in acknowledged and p.started < killed_at]
    cut_off = [p for p in posted if cut_at <= p.started < killed_at] if hosts else []
    return tally(
        stack, f"Redis master SIGKILLed behind Sentinel{', replicas cut off' if hosts else ''}, "
        f"REDIS_MIN_REPLICAS={min_replicas}", sent,
        answered_200=len(acknowledged),
        answered_200_at_last=len(acknowledged) + sum(1 for attempts in retried_attempts.values()
                                                     if attempts[-1].status == 200),
        lost_acknowledged_after_kill=len(lost) - len(before_kill),
        lost_acknowledged_before_kill=len(before_kill),
        oldest_lost_posted_s_before_kill=round(max(killed_at - p.started for p in before_kill), 3)
        if before_kill else None,
        after_kill=f"{sum(1 for a in after_kill if a.status == 200)} x 200, {len(refused)} refused",
        refused_statuses=sorted({a.status for a in refused}),
        refused_without_retry_after=sum(1 for a in refused if a.status == 503 and not a.retry_after),
        slowest_refusal_ms=round(max((a.seconds for a in refused), default=0) * 1000, 1),
        promoted_after_s=round(promoted_at - killed_at, 2),
        accepted_again_after_s=round(first_200 - killed_at, 2),
        all_applied_after_s=round(drained_at - killed_at, 1),
        retried_like_at=len(retried),
        retries_answered_200=sum(1 for a in retries if a.status == 200),
        processes_restarted=restarted,
        **({"replicas_cut_off_for_s": round(killed_at - cut_at, 2),
            "posted_while_replicas_cut_off": len(cut_off),
            "answered_200_while_replicas_cut_off": sum(1 for p in cut_off if p.attempt.status == 200),
            "refused_while_replicas_cut_off": sum(1 for p in cut_off if p.attempt.status == 503)} if hosts else {}),
    )
