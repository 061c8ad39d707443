"""What Python's garbage collector costs the webhook, with and without the start-up heap frozen
(``app.base.heap``): N webhooks through Flask's test client on a Redis of its own, each
collection timed by ``gc.callbacks``, in alternating turns of a fresh process each.

    .venv/bin/python -m bench.gc_pauses --out bench/results/DATE-gc-pauses.json
    .venv/bin/python -m bench.gc_pauses -n 2000 --turns 1      # a quick look

Per turn: objects the collector tracks when the load starts, and per generation how many
collections ran and how long they took (the longest too: a full collection stops every thread of
the process while it runs). Progress goes to stderr, the result (JSON) to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.run import ROOT, step, write_result

MODES = ("as loaded", "frozen")


def one_turn(mode: str, n: int, redis_url: str) -> dict[str, Any]:
    """In this process: the app, then (``frozen``) its heap frozen, then ``n`` webhooks."""
    from app import create_app
    from app.base.heap import freeze_startup_heap
    from bench.profile_ack import URL, body
    from config import Settings

    app = create_app(Settings(redis_url=redis_url, log_level="INFO"))  # a line per webhook, as in production
    client = app.test_client()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    for i in range(50):  # first-use costs (connections, scripts) out of the count
        client.post(URL, data=body(10**7 + i), headers=headers)
    if mode == "frozen":
        freeze_startup_heap()
    tracked = len(gc.get_objects())
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            times[info["generation"]].append(time.perf_counter() - started.pop())

    gc.callbacks.append(timed)
    cpu = time.process_time()
    for i in range(1, n + 1):
        answer = client.post(URL, data=body(i), headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"webhook answered {answer.status_code}: {answer.get_data(as_text=True)[:200]}")
    cpu = time.process_time() - cpu
    gc.callbacks.remove(timed)
    return {
        "mode": mode, "webhooks": n, "tracked_objects": tracked, "frozen_objects": gc.get_freeze_count(),
        "cpu_us_per_webhook": round(cpu / n * 1e6, 1),
        "gc_us_per_webhook": round(sum(sum(t) for t in times.values()) / n * 1e6, 2),
        "collections": {str(g): {"count": len(t), "total_ms": round(sum(t) * 1e3, 2),
                                 "longest_ms": round(max(t, default=0.0) * 1e3, 2)} for g, t in times.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20000, help="webhooks per turn")
    parser.add_argument("--turns", type=int, default=3, help="alternating turns of each mode")
    parser.add_argument("--out", type=Path, help="also write the result here (kind gc-pauses)")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a turn, in a child process
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_turn(args.one, args.n, args.redis_url)))
        return 0
    from tests.support import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="voice-gc-")) / "redis").start()
    turns: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for turn in range(args.turns):
            for mode in MODES:
                step(f"turn {turn + 1}/{args.turns}, {mode}: {args.n} webhooks")
                done = subprocess.run([sys.executable, "-m", "bench.gc_pauses", "--one", mode, "-n", str(args.n),
                                       "--redis-url", server.url], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, check=True)
                got = json.loads(done.stdout.strip().splitlines()[-1])
                turns[mode].append(got)
                full = got["collections"]["2"]
                step(f"  {got['tracked_objects']:,} objects tracked, {got['gc_us_per_webhook']} µs of collections "
                     f"per webhook, {full['count']} full collections (longest {full['longest_ms']} ms)")
                redis.Redis.from_url(server.url).flushall()
    finally:
        server.stop()
    result: dict[str, Any] = {"webhooks_per_turn": args.n, "turns": args.turns, "modes": {}}
    for mode, got in turns.items():
        result["modes"][mode] = {
            "tracked_objects": statistics.median(g["tracked_objects"] for g in got),
            "gc_us_per_webhook": statistics.median(g["gc_us_per_webhook"] for g in got),
            "cpu_us_per_webhook": statistics.median(g["cpu_us_per_webhook"] for g in got),
            "full_collections": [g["collections"]["2"]["count"] for g in got],
            "full_collection_longest_ms": max(g["collections"]["2"]["longest_ms"] for g in got),
            "turns": got,
        }
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, "gc-pauses", f".venv/bin/python -m bench.gc_pauses -n {args.n} --turns {args.turns}",
                     result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
