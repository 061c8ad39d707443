"""What REDIS_MIN_REPLICAS=1 costs the acknowledgement: the webhook's write waits (Redis WAIT, in
the same round trip) until a replica holds it. A master and one replica of its own, two gunicorn
lines side by side (REDIS_MIN_REPLICAS=0 and =1), measured in alternating turns like bench/run.py.

    python -m bench.wait_cost            # prints its progress, then a table
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.loadgen import open_loop
from bench.run import BIN, Processes, _answers, body_for, step, wrk
from tests.conftest import migrate
from tests.redis_ha import ReplicatedRedis
from tests.support import free_port, wait_for


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="voice-wait-"))
    try:
        return measure(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(workdir: Path) -> int:
    with ReplicatedRedis(workdir, replicas=1) as redis_:
        database = f"sqlite:///{workdir / 'voice.db'}"
        migrate(database, redis_.url)
        procs = Processes(workdir, {**os.environ, "REDIS_URL": redis_.url, "DATABASE_URL": database,
                                    "LOG_LEVEL": "WARNING", "PROMETHEUS_MULTIPROC_DIR": str(workdir)})
        ports = {}
        try:
            for replicas in ("0", "1"):
                ports[replicas] = free_port()
                procs.start(f"web-{replicas}", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                            PORT=str(ports[replicas]), HOST="127.0.0.1", REDIS_MIN_REPLICAS=replicas)
                wait_for(lambda port=ports[replicas]: _answers(port), timeout=30)
                wrk(ports[replicas], 1, 16)
            turns: dict[str, list[float]] = {"0": [], "1": []}
            for turn in range(5):
                for replicas, port in ports.items():
                    turns[replicas].append(wrk(port, 4, 32))
                step(f"turn {turn + 1} of 5: REDIS_MIN_REPLICAS=0 {turns['0'][-1]:.0f} req/s, "
                     f"=1 {turns['1'][-1]:.0f} req/s")
            rate = statistics.median(turns["0"]) / 2
            tails = {}
            for replicas, port in ports.items():
                step(f"open loop at {rate:.0f} req/s, REDIS_MIN_REPLICAS={replicas}")
                tails[replicas] = open_loop(port, rate, 10, body_for)
        finally:
            procs.stop_all()
    print("| REDIS_MIN_REPLICAS | ack req/s (median of 5 turns) | p50 / p99 at half the =0 maximum |")
    print("|---|---|---|")
    for replicas in ("0", "1"):
        each = ", ".join(f"{r:.0f}" for r in turns[replicas])
        print(f"| {replicas} | {statistics.median(turns[replicas]):.0f} ({each}) "
              f"| {tails[replicas]['p50_ms']} / {tails[replicas]['p99_ms']} ms at {rate:.0f} req/s |")
    ratio = statistics.median(turns["1"]) / statistics.median(turns["0"])
    print(f"throughput with WAIT ÷ without: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
