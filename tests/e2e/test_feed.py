"""After the callback, end to end on PostgreSQL and Redis: a consumer following the change feed
during a shuffled load, and the ready hook reaching a downstream Celery worker of its own across
a worker SIGKILL and a broker outage."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis

from tests.e2e.stack import BIN, Stack
from tests.support import pg_database, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

HOOK_TASK = "crm.tasks.recording_ready"
HOOK_QUEUE = "crm-recordings"
P1, P2 = "+254712345678", "+254787654321"


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service on PostgreSQL + Redis with the ready hook on, beat running the sweeper every
    5 s, and a downstream worker consuming the hook queue."""
    workdir = Path(tmp_path_factory.mktemp("hooked"))
    with pg_database("voice_feed") as url:
        stack = Stack(workdir, url, beat=True, persistent_redis=True, VOICE_HOOK_TASK=HOOK_TASK,
                      VOICE_HOOK_QUEUE=HOOK_QUEUE, PENDING_REDELIVERY_SECONDS="6",
                      HOOK_LOG=str(workdir / "hooks.jsonl"))
        try:
            stack.start()
            stack._spawn("hooks", [str(BIN / "celery"), "-A", "tests.e2e.hook_consumer", "worker", f"-Q{HOOK_QUEUE}",
                                   "--pool=solo", "--without-gossip", "--without-mingle", "--loglevel=INFO",
                                   f"--hostname=hooks-{stack.port}@%h"])
            wait_for(lambda: " ready." in stack.log("hooks"), timeout=30)
            yield stack
        finally:
            stack.stop()
            for name in ("worker", "hooks"):
                print(f"----- {name} log (last 2000 chars) -----\n{stack.log(name)[-2000:]}")


def post(stack: Stack, fields: dict) -> None:
    """As AT does: send again until the service answers 200 (503 while the broker is away)."""
    def accepted() -> bool:
        try:
            return stack.post_form(fields)[0] == 200
        except OSError:
            return False

    wait_for(accepted, timeout=60, interval=0.2)


def post_all(stack: Stack, posts: list[dict], threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda fields: post(stack, fields), posts))


class FeedConsumer:
    """Follows GET /changes over HTTP, as a downstream system would, keeping the latest state."""

    def __init__(self, stack: Stack, limit: int = 5) -> None:
        self.stack = stack
        self.limit = limit
        self.cursor = ""
        self.state: dict[str, dict] = {}
        self.pages = 0

    def catch_up(self) -> None:
        while True:
            status, body = self.stack.get(f"/api/v1/voice/changes?limit={self.limit}&after={self.cursor}")
            assert status == 200, body
            self.pages += 1
            for item in body["changes"]:
                self.state[item["recording"]["recording_id"]] = item["recording"]
            self.cursor = body["next_cursor"]
            if not body["changes"]:
                return


def worker_metrics(stack: Stack) -> str:
    """The worker's own scrape endpoint (the web's /metrics serves the web's processes only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def test_a_consumer_following_the_feed_during_a_shuffled_load_ends_with_every_get(hooked: Stack) -> None:
    rng = random.Random(1414)
    sessions = [f"feed_{uuid.uuid4().hex[:10]}" for _ in range(40)]
    posts = []
    for n, session in enumerate(sessions):
        posts += [
            {"sessionId": session, "phoneNumber": P1, "status": "busy"},
            {"sessionId": session, "phoneNumber": P2, "status": "completed", "duration": str(rng.randint(1, 900)),
             "recordingUrl": f"https://r.example/feed/{n}.mp3"},
            {"sessionId": session, "phoneNumber": P1, "status": "no-answer", "duration": "0"},
        ]
    rng.shuffle(posts)
    consumer = FeedConsumer(hooked)
    loading = threading.Thread(target=post_all, args=(hooked, posts))
    loading.start()
    while loading.is_alive():  # the consumer reads while events are being applied
        consumer.catch_up()
    loading.join()
    hooked.wait_until_idle(timeout=90)
    gets = {rid: hooked.recording(rid) for rid in sessions}
    # On PostgreSQL a long transaction anywhere on the server holds the feed back while it runs.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: consumer.catch_up() is None and all(consumer.state.get(r) == g for r, g in gets.items()),
                 timeout=30, interval=0.2)

    mine = {rid: state for rid, state in consumer.state.items() if rid in set(sessions)}
    assert set(mine) == set(sessions)
    assert gets == mine
    assert {state["status"] for state in mine.values()} == {"completed"}  # each session has a completed event
    assert consumer.pages > 3


def hook_log(stack: Stack) -> list[dict]:
    path = Path(stack.extra_env["HOOK_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_each_ready_recording_reaches_the_hook_consumer_across_a_worker_kill_and_a_broker_outage(
    hooked: Stack,
) -> None:
    rng = random.Random(1415)
    sessions = [f"hook_{uuid.uuid4().hex[:10]}" for _ in range(30)]
    first = {s: f"https://r.example/hook/{s}/1.mp3" for s in sessions}
    second = {s: f"https://r.example/hook/{s}/2.mp3" for s in sessions[:10]}  # these get a new URL later
    expected = {(s, url) for s, url in first.items()} | {(s, url) for s, url in second.items()}

    posts = [{"sessionId": s, "phoneNumber": P1, "status": "busy"} for s in sessions]
    posts += [{"sessionId": s, "phoneNumber": P2, "status": "completed", "recordingUrl": url}
              for s, url in first.items()]
    rng.shuffle(posts)
    loading = threading.Thread(target=post_all, args=(hooked, posts, 4))
    loading.start()
    wait_for(lambda: len(hook_log(hooked)) >= 3, timeout=60)
    hooked.kill("worker")  # SIGKILL mid-load: tasks die between claim, commit and relay
    hooked.start_worker("worker")
    loading.join()
    wait_for(lambda: all(hooked.recording(s) and hooked.recording(s)["recording_url"] == url
                         for s, url in first.items()), timeout=90, interval=0.5)

    # The second URLs arrive while the broker goes away and comes back.
    loading = threading.Thread(target=post_all, args=(hooked, [
        {"sessionId": s, "phoneNumber": P2, "status": "completed", "recordingUrl": url} for s, url in second.items()
    ], 4))
    loading.start()
    wait_for(lambda: any((hooked.recording(s) or {}).get("recording_url") == url for s, url in second.items()),
             timeout=30, interval=0.05)  # some of them are in before the outage
    hooked.redis.stop()
    wait_for(lambda: hooked.get("/readyz")[0] == 503, timeout=10)  # the service sees the broker gone
    hooked.redis.start()
    loading.join()

    def all_delivered() -> bool:
        return {(m["recording"]["recording_id"], m["recording"]["recording_url"]) for m in hook_log(hooked)} >= expected

    wait_for(all_delivered, timeout=120, interval=0.5)
    received = [m for m in hook_log(hooked) if m["recording"]["recording_id"] in set(sessions)]
    pairs = {(m["recording"]["recording_id"], m["recording"]["recording_url"]) for m in received}
    task_ids = {m["task_id"] for m in received}
    hook_lines = [line for line in worker_metrics(hooked).splitlines() if line.startswith("voice_hook_")]
    print(f"hook: {len(expected)} URLs set, {len(received)} tasks received, {len(task_ids)} distinct task ids; "
          f"{hook_lines}")
    assert pairs == expected  # every URL each recording was given, and nothing else
    assert len(task_ids) == len(expected)  # repeats carry the same task id
    for m in received:  # the argument is the recording at the commit that set that URL
        assert m["recording"]["status"] == "completed" and m["recording"]["participants"]
    status, text = hooked.get("/metrics")
    assert "voice_hook_backlog 0.0" in text
    assert status == 200


def test_a_hook_committed_while_the_broker_hangs_and_its_worker_killed_is_sent_by_the_sweeper(
    hooked: Stack,
) -> None:
    """Placed exactly in the window: the change commits, the broker stops answering, the worker is
    SIGKILLed before any relay; the outbox row survives and the sweeper delivers it afterwards.

    The broker hangs (CLIENT PAUSE) rather than stops: a stopped Redis makes Celery cancel the
    running task at once, before its commit, which is the other, harmless side of the window.
    """
    session, url = f"window_{uuid.uuid4().hex[:10]}", "https://r.example/window.mp3"
    post(hooked, {"sessionId": session, "phoneNumber": P1, "status": "busy"})
    wait_for(lambda: hooked.recording(session), timeout=30)
    dsn = hooked.database_url.replace("postgresql+psycopg://", "postgresql://")
    broker = redis.Redis.from_url(hooked.redis.url)
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as observer:
        holder.execute("SELECT 1 FROM voice_recordings WHERE id = %s FOR UPDATE", (session,))
        post(hooked, {"sessionId": session, "phoneNumber": P2, "status": "completed", "recordingUrl": url})

        def worker_waits_for_the_row() -> bool:
            return observer.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock'").fetchone()[0] > 0

        def in_outbox() -> bool:
            return observer.execute("SELECT count(*) FROM hook_outbox WHERE recording_id = %s",
                                    (session,)).fetchone()[0] == 1

        wait_for(worker_waits_for_the_row, timeout=20, interval=0.02)  # claimed in Redis, blocked on the row
        try:
            broker.execute_command("CLIENT", "PAUSE", "20000", "WRITE")  # the broker takes no more writes
            holder.commit()  # the worker's transaction goes on and commits, outbox row included
            wait_for(in_outbox, timeout=4, interval=0.02)
            hooked.kill("worker")
            assert in_outbox()  # nothing relayed it before the worker died
        finally:
            broker.execute_command("CLIENT", "UNPAUSE")
            broker.close()
        hooked.start_worker("worker")
        wait_for(lambda: not in_outbox(), timeout=60, interval=0.2)
    received = wait_for(lambda: [m for m in hook_log(hooked) if m["recording"]["recording_id"] == session],
                        timeout=30, interval=0.2)
    assert len({m["task_id"] for m in received}) == 1  # every send of this change carries one task id
    assert received[0]["recording"]["recording_url"] == url
    # The sends are counted where they happen, in the worker: its own metrics port serves them.
    wait_for(lambda: 'voice_hook_sent_total{path="sweeper"}' in worker_metrics(hooked), timeout=30)
