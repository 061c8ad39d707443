"""Fault scenario: the PostgreSQL primary dies and its synchronous standby is promoted.

A primary and a synchronous hot standby of the scenario's own (``PostgresPair``), a stack whose
DATABASE_URL names both hosts with ``target_session_attrs=read-write`` (libpq connects to whichever
accepts writes), a steady stream of webhooks and a consumer following the change feed. The
primary's postmaster is SIGKILLed and, after a pause, the standby promoted: the test plays the part
Patroni or a managed service plays in production. The web's answers never depend on the database,
so every webhook is answered 200 throughout; the worker's transactions that meet the outage fail
and are retried (their messages stay in the broker) and apply on the new primary, with no process
restarted. Replication is synchronous, so nothing committed is lost with the primary: every event
is applied once, and the feed's consumer ends with every recording's latest state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from tests.e2e.stack import Stack
from tests.faults.scenarios import Tally, make_events, tally, wait_until_applied, worker_lines
from tests.faults.sentinel import SteadyStream
from tests.support import PostgresServer, descendants, postgres_bin, wait_for

STANDBY_NAME = "standby1"
# Patroni promotes once the leader key's TTL has run out (30 s by default); the scenario promotes
# sooner, to keep its run short: what matters is that nothing can commit for a while.
PROMOTE_AFTER_SECONDS = 2.0
# Events a few seconds of the stream bring, before the kill and after the promotion.
BEFORE_KILL = 60
AFTER_PROMOTION = 60
TIME_LIMIT = 240  # it runs in about half a minute; this much on a machine other work keeps busy


class PostgresPair:
    """A primary and a hot standby streaming from it synchronously, each a server of its own on a
    free port, in a folder the postgres user owns. ``url`` names both, for the service."""

    def __init__(self) -> None:
        self.primary = PostgresServer()
        self.standby = PostgresServer()
        self.killed: list[int] = []  # the killed primary's postmaster and the children it left
        self.killed_segment: str | None = None  # its System V shared memory id, which it left too

    @property
    def url(self) -> str:
        return (f"postgresql+psycopg://postgres@/postgres?host=127.0.0.1:{self.primary.port}"
                f"&host=127.0.0.1:{self.standby.port}&target_session_attrs=read-write")

    @staticmethod
    def dsn(server: PostgresServer) -> str:
        return f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres connect_timeout=5"

    def start(self) -> PostgresPair:
        """The primary, then the standby cloned from it; returns once the primary reports the
        standby as its synchronous one (every commit from then on waits for it)."""
        self.primary.init()
        _append(self.primary.datadir / "postgresql.conf",
                "wal_level = replica", "max_wal_senders = 4", "hot_standby = on",
                f"synchronous_standby_names = '{STANDBY_NAME}'")
        self.primary.start()
        if self.standby.as_root:
            shutil.chown(self.standby.workdir, "postgres", "postgres")
        self.standby._run(postgres_bin("pg_basebackup"), "-D", str(self.standby.datadir), "-h", "127.0.0.1",
                          "-p", str(self.primary.port), "-U", "postgres", "-X", "stream", "-R",
                          "--checkpoint=fast", "--no-sync")
        # The clone's settings are the primary's. Later lines win: the standby names itself, so
        # that the primary waits for it; once promoted it waits for no standby of its own (as
        # Patroni's synchronous mode does when none is left), or no commit would ever return.
        _append(self.standby.datadir / "postgresql.auto.conf",
                f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} user=postgres "
                f"application_name={STANDBY_NAME}'",
                "synchronous_standby_names = ''")
        self.standby.start()
        wait_for(lambda: self.sync_state() == "sync", timeout=30, interval=0.1)
        return self

    def sync_state(self) -> str | None:
        with psycopg.connect(self.dsn(self.primary), autocommit=True) as conn:
            row = conn.execute("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                               [STANDBY_NAME]).fetchone()
        return row[0] if row else None

    def kill_primary(self) -> float:
        """SIGKILL the primary's postmaster: a crash of its host, as far as clients can tell (its
        port refuses at once; its backends end as they notice their postmaster gone). Returns the
        moment of the kill (``time.monotonic()``)."""
        pid = self.primary.postmaster_pid()
        assert pid is not None, "the primary is not running"
        self.killed = [pid, *descendants(pid)]
        # postmaster.pid's seventh line: the key and id of the segment a clean stop would remove.
        lines = (self.primary.datadir / "postmaster.pid").read_text().splitlines()
        self.killed_segment = lines[6].split()[1] if len(lines) > 6 and len(lines[6].split()) == 2 else None
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _reap(pid)
        return killed_at

    def promote(self) -> None:
        self.standby._run(postgres_bin("pg_ctl"), "-D", str(self.standby.datadir), "-w", "promote")

    def remove(self) -> None:
        """Both servers stopped and their folders removed, each also when the other fails; the
        killed primary's children that are still ending are waited for (and killed after 10 s)."""
        with contextlib.ExitStack() as removals:
            removals.callback(self.primary.remove)
            removals.callback(self.standby.remove)
            removals.callback(self._end_killed)

    def _end_killed(self) -> None:
        def alive() -> list[int]:
            return [pid for pid in self.killed if _running(pid)]

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not alive(), timeout=10, interval=0.1)
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(), timeout=10, interval=0.1)
        for pid in self.killed:
            _reap(pid, block=False)
        if self.killed_segment is not None and self._segment_creator() == self.killed[0]:
            subprocess.run(["ipcrm", "-m", self.killed_segment], capture_output=True, timeout=30, check=False)

    def _segment_creator(self) -> int | None:
        """The pid that made the killed primary's segment, if it is still there (else it is gone,
        or the id names another one now)."""
        listed = subprocess.run(["ipcs", "-m", "-p"], capture_output=True, text=True, timeout=30, check=False)
        for line in listed.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == self.killed_segment and fields[2].isdigit():
                return int(fields[2])
        return None


def _append(path: Path, *lines: str) -> None:
    with path.open("a") as conf:
        conf.write("\n" + "\n".join(lines) + "\n")


def _running(pid: int) -> bool:
    """Whether a process is there and has not exited (an exited one may wait to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _reap(pid: int, block: bool = True) -> None:
    """Reap a process that was killed or has exited, if it is this one's child (an orphan this
    process adopted as its subreaper: see ``tests.support.adopt_orphans``); otherwise init does."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0 if block else os.WNOHANG)


def applied_count(server: PostgresServer) -> int | None:
    try:
        with psycopg.connect(PostgresPair.dsn(server), autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM webhook_events").fetchone()[0]  # type: ignore[index]
    except psycopg.Error:
        return None


class FeedFollower:
    """A downstream consumer following GET /changes every ``pause`` seconds in a thread, as it
    would across a failover: an answer other than 200 is counted and the page asked again."""

    def __init__(self, stack: Stack, limit: int = 50, pause: float = 0.2) -> None:
        self.stack = stack
        self.limit = limit
        self.pause = pause
        self.cursor = ""
        self.state: dict[str, dict[str, Any]] = {}
        self.answers: list[tuple[float, int]] = []  # (monotonic time asked, status) of every page
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def page(self) -> bool:
        """One page; whether it held anything. Each answer is kept with the time it was asked."""
        asked = time.monotonic()
        try:
            status, body = self.stack.get(f"/api/v1/voice/changes?limit={self.limit}&after={self.cursor}")
        except OSError:
            status, body = 0, None
        self.answers.append((asked, status))
        if status != 200:
            return False
        for item in body["changes"]:
            self.state[item["recording"]["recording_id"]] = item["recording"]
        self.cursor = body["next_cursor"]
        return bool(body["changes"])

    def catch_up(self) -> None:
        while self.page():
            pass

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.catch_up()
            self.stopped.wait(self.pause)

    def __enter__(self) -> FeedFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def pg_failover(workdir: Path, seed: int = 12) -> Tally:
    events = make_events(sessions=1000, participants=2, per_session=2, seed=seed, prefix="pgfail")
    pair = PostgresPair()
    stack: Stack | None = None
    try:
        pair.start()
        stack = Stack(workdir, pair.url).start()  # migrated through the two-host URL, on the primary
        pids = {name: process.pid for name, process in stack.processes.items()}
        with FeedFollower(stack) as follower, SteadyStream(stack, events, pause=0.1) as stream:
            wait_for(lambda: stream.accepted_at_least(0, BEFORE_KILL), timeout=60)
            wait_for(lambda: (applied_count(pair.primary) or 0) > 0, timeout=60)
            killed_at = pair.kill_primary()
            time.sleep(PROMOTE_AFTER_SECONDS)
            # Read on the standby before it takes writes: every event committed before the kill.
            kept = wait_for(lambda: applied_count(pair.standby), timeout=10)
            promoting_at = time.monotonic()
            pair.promote()
            promoted_at = time.monotonic()
            first_applied_at = wait_for(
                lambda: (applied_count(pair.standby) or 0) > (kept or 0) and time.monotonic(), timeout=60,
                interval=0.05)
            wait_for(lambda: stream.accepted_at_least(promoted_at, AFTER_PROMOTION), timeout=60)
            feed_back_at = wait_for(lambda: next((at for at, status in list(follower.answers)
                                                  if at > promoted_at and status == 200), None), timeout=30)
        posted = stream.posted
        sent = [p.fields for p in posted]
        wait_until_applied(stack, sent, timeout=120)
        applied_at = time.monotonic()
        stack.wait_until_idle(timeout=60)
        sessions = {fields["sessionId"] for fields in sent}
        gets: dict[str, Any] = {}

        def feed_caught_up() -> bool:
            follower.catch_up()
            gets.update({rid: stack.recording(rid) for rid in sessions if follower.state.get(rid) != gets.get(rid)})
            return all(follower.state.get(rid) == gets[rid] for rid in sessions)

        with contextlib.suppress(TimeoutError):
            wait_for(feed_caught_up, timeout=30, interval=0.5)
        during = [p.attempt for p in posted if killed_at <= p.started < first_applied_at]
        feed_during = Counter(str(status) for at, status in follower.answers if killed_at <= at < feed_back_at)
        restarted = [name for name, process in stack.processes.items()
                     if process.poll() is not None or process.pid != pids.get(name)]
        return tally(
            stack, "PostgreSQL primary killed, synchronous standby promoted", sent,
            answered_200=sum(1 for p in posted if p.attempt.status == 200),
            answers=dict(Counter(str(p.attempt.status) for p in posted)),
            posted_during_failover=len(during),
            not_200_during_failover=sum(1 for a in during if a.status != 200),
            committed_before_kill=kept,
            promote_took_s=round(promoted_at - promoting_at, 2),
            first_applied_after_kill_s=round(first_applied_at - killed_at, 2),
            first_applied_after_promotion_s=round(first_applied_at - promoted_at, 2),
            feed_back_after_kill_s=round(feed_back_at - killed_at, 2),
            feed_answers_during_failover=dict(feed_during),
            all_applied_after_kill_s=round(applied_at - killed_at, 1),
            worker_retries=len(worker_lines(stack, "event_retry")),
            feed_recordings=len(sessions & follower.state.keys()),
            feed_missing=len(sessions - follower.state.keys()),
            feed_stale=sum(1 for rid in sessions & follower.state.keys() if follower.state[rid] != gets.get(rid)),
            processes_restarted=restarted,
        )
    finally:
        with contextlib.ExitStack() as stops:
            stops.callback(pair.remove)
            if stack is not None:
                stops.callback(stack.stop)

