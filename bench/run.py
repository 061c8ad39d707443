"""The benchmark: starts its own Redis, PostgreSQL and SQLite, gunicorn and Celery, measures, writes
bench/results/<date>.json, .md and .png. Every goal is a ratio of two figures from the same run.

    python -m bench.run            # the full run (a few minutes)
    python -m bench.run --tiny     # a smoke run on a tiny load (what the test suite does)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis

from app import create_app
from app.delivery import PENDING_DUE, enqueue
from app.domain import apply_event
from app.events import Event
from app.extensions import db
from app.timeutil import utcnow
from bench.loadgen import open_loop
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
_STARTED = time.monotonic()


def step(message: str) -> None:
    """Progress on stderr as the run goes (a full run takes minutes); the report goes to stdout."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


GOALS = {"ack_throughput_ratio": 0.75, "ack_p99_ms_at_half": 10.0, "ack_p99_ratio_at_80": 3.0,
         "processing_ratio": 0.6, "duplicate_ratio": 5.0, "peak_rss_mb": 80.0}


def events(n: int, prefix: str) -> list[Event]:
    """Distinct events: four participants per session."""
    made = []
    for i in range(n):
        phone = f"+2547{i % 4:08d}"
        status = "completed" if i % 4 == 0 else "no-answer"
        fields = {"sessionId": f"{prefix}_{i // 4}", "phoneNumber": phone, "status": status, "duration": str(i % 600)}
        made.append(Event(fields["sessionId"], status, phone, None, i % 600, fields))
    return made


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Processes:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env, self.running = workdir, env, {}

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running[name] = process
        return process

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


# --- acknowledgement ------------------------------------------------------------------------


def wrk(port: int, seconds: int, connections: int) -> float:
    done = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(ROOT / "bench" / "webhook.lua"),
         f"http://127.0.0.1:{port}/api/v1/voice/webhook"], capture_output=True, text=True, check=True)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if non_2xx:
        raise RuntimeError(f"{non_2xx.group(1)} requests were not answered 200:\n{done.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))


def body_for(index: int) -> bytes:
    return urlencode({"sessionId": f"ATVoice_ol_{index // 3}", "phoneNumber": f"+2547{index % 10**8:08d}",
                      "duration": str(index % 3600), "status": "completed"}).encode()


def measure_ack(procs: Processes, tiny: bool) -> dict[str, Any]:
    """Both servers run side by side and are measured in turns, so a burst of noise on this shared
    machine lands on both figures of a ratio, not on one; each figure is the median of its turns."""
    seconds, rounds = (1, 1) if tiny else (4, 5)
    results: dict[str, Any] = {}
    servers = {}
    for name, app in (("webhook", "wsgi:app"), ("bare", "bench.bare:app")):
        port = free_port()
        servers[name] = (port, procs.start(name, [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app],
                                           PORT=str(port), HOST="127.0.0.1"))
        wait_for(lambda port=port: _answers(port), timeout=30)
        wrk(port, 1, 16)  # warm up
    turns: dict[str, list[float]] = {"webhook": [], "bare": []}
    for turn in range(rounds):
        for name, (port, _process) in servers.items():
            step(f"ack: closed-loop turn {turn + 1}/{rounds}, {name}")
            turns[name].append(wrk(port, seconds, 32))
    for name, rates in turns.items():
        results[f"{name}_rps"] = statistics.median(rates)
        results[f"{name}_rps_turns"] = rates
    # Open loop at half and at 80% of the webhook's closed-loop maximum, on both endpoints in turn.
    for share in (0.5, 0.8):
        rate = max(20.0, results["webhook_rps"] * share)
        for name, (port, _process) in servers.items():
            step(f"ack: open loop at {int(share * 100)}% ({rate:.0f} req/s), {name}")
            results[f"{name}_open_{int(share * 100)}"] = open_loop(port, rate, 2 if tiny else 10, body_for)
    results["web_worker_peak_rss_mb"] = max(peak_rss_mb(pid) for pid in children(servers["webhook"][1].pid))
    results["bare_worker_peak_rss_mb"] = max(peak_rss_mb(pid) for pid in children(servers["bare"][1].pid))
    for name in servers:
        procs.stop(name)
    return results


def _answers(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("POST", "/api/v1/voice/webhook", body_for(0), {"Content-Type": "application/x-www-form-urlencoded"})
    return conn.getresponse().status == 200


# --- processing ------------------------------------------------------------------------------


def plain_loop_rate(settings: Settings, batch: list[Event]) -> float:
    app = create_app(settings)
    with app.app_context():
        started = time.perf_counter()
        for event in batch:
            apply_event(db.session, event, utcnow())
        elapsed = time.perf_counter() - started
        db.engine.dispose()
    return len(batch) / elapsed


def worker_rate(procs: Processes, settings: Settings, batch: list[Event], concurrency: int) -> tuple[float, float]:
    """Enqueue the batch, then start a worker and time it from its first event to its last."""
    app = create_app(settings)
    client = redis.Redis.from_url(settings.redis_url)
    with app.app_context():
        for event in batch:
            enqueue(event, utcnow(), None)
    total = client.zcard(PENDING_DUE)
    worker = procs.start("worker", [str(BIN / "celery"), "-A", "worker", "worker", "--loglevel=WARNING",
                                    "--queues=voice-webhooks", f"--concurrency={concurrency}", "--without-gossip",
                                    "--without-mingle", f"--hostname=bench-{time.time_ns()}@%h"],
                         WORKER_METRICS_PORT="0")
    wait_for(lambda: client.zcard(PENDING_DUE) < total, timeout=60, interval=0.005)
    started = time.perf_counter()
    first_left = client.zcard(PENDING_DUE)
    wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=600, interval=0.01)
    elapsed = time.perf_counter() - started
    rss = max((peak_rss_mb(pid) for pid in children(worker.pid)), default=0.0)
    procs.stop("worker")
    with app.app_context():
        db.engine.dispose()
    return first_left / elapsed, rss


def measure_processing(procs: Processes, settings: Settings, tiny: bool) -> dict[str, Any]:
    n = 200 if tiny else 3000
    results: dict[str, Any] = {"events": n}
    step(f"processing, {settings.database_url.split(':', 1)[0]}: plain loop, then workers ({n} events a run)")
    results["plain_loop_eps"] = round(plain_loop_rate(settings, events(n, f"plain{time.time_ns()}")), 1)
    fresh = events(n, f"new{time.time_ns()}")
    rate, rss = worker_rate(procs, settings, fresh, 1)
    results["worker_eps"] = round(rate, 1)
    results["worker_process_peak_rss_mb"] = rss
    results["duplicate_eps"] = round(worker_rate(procs, settings, fresh, 1)[0], 1)  # the same events again
    for concurrency in (1, 2, 4):
        step(f"processing: scaling with {concurrency} worker process(es)")
        results[f"scaling_eps_{concurrency}"] = round(
            worker_rate(procs, settings, events(n, f"scale{concurrency}_{time.time_ns()}"), concurrency)[0], 1)
    return results


# --- report ----------------------------------------------------------------------------------


def summarize(ack: dict[str, Any], processing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    half, eighty = ack["webhook_open_50"], ack["webhook_open_80"]
    figures: dict[str, Any] = {
        "ack_throughput_ratio": round(ack["webhook_rps"] / ack["bare_rps"], 3),
        "ack_p99_ms_at_half": half["p99_ms"],
        "ack_p99_ratio_at_80": round(eighty["p99_ms"] / max(ack["bare_open_80"]["p99_ms"], 0.01), 2),
        "web_worker_peak_rss_mb": ack["web_worker_peak_rss_mb"],
    }
    for database, p in processing.items():
        figures[f"processing_ratio_{database}"] = round(p["worker_eps"] / p["plain_loop_eps"], 3)
        figures[f"duplicate_ratio_{database}"] = round(p["duplicate_eps"] / p["worker_eps"], 2)
        figures[f"worker_process_peak_rss_mb_{database}"] = p["worker_process_peak_rss_mb"]
    return figures


def markdown(report: dict[str, Any]) -> str:
    f, ack = report["figures"], report["ack"]
    lines = [f"# Benchmark {report['date']}", "", f"Machine: {report['machine']}", "",
             "| measure | figure | goal |", "|---|---|---|",
             f"| ack throughput ratio (webhook {ack['webhook_rps']:.0f} req/s ÷ bare {ack['bare_rps']:.0f} req/s) "
             f"| {f['ack_throughput_ratio']} | ≥ {GOALS['ack_throughput_ratio']} |",
             f"| ack p99 at half the max ({ack['webhook_open_50']['rate']:.0f} req/s, open loop) "
             f"| {f['ack_p99_ms_at_half']} ms | ≤ {GOALS['ack_p99_ms_at_half']} ms |",
             f"| ack p99 at 80% ÷ bare p99 at 80% ({ack['webhook_open_80']['p99_ms']} ÷ "
             f"{ack['bare_open_80']['p99_ms']} ms) | {f['ack_p99_ratio_at_80']} | ≤ {GOALS['ack_p99_ratio_at_80']} |",
             f"| peak RSS, one web worker (the bare endpoint's: {ack['bare_worker_peak_rss_mb']} MB) "
             f"| {f['web_worker_peak_rss_mb']} MB | ≤ {GOALS['peak_rss_mb']} MB |"]
    for database, p in report["processing"].items():
        lines += [
            f"| processing ratio, {database} (worker {p['worker_eps']} ÷ plain loop {p['plain_loop_eps']} events/s) "
            f"| {f[f'processing_ratio_{database}']} | ≥ {GOALS['processing_ratio']} |",
            f"| duplicate fast path, {database} ({p['duplicate_eps']} ÷ {p['worker_eps']} events/s) "
            f"| {f[f'duplicate_ratio_{database}']} | ≥ {GOALS['duplicate_ratio']} |",
            f"| peak RSS, one worker process, {database} | {p['worker_process_peak_rss_mb']} MB "
            f"| ≤ {GOALS['peak_rss_mb']} MB |",
            f"| scaling, {database}: events/s with 1, 2, 4 worker processes "
            f"| {p['scaling_eps_1']}, {p['scaling_eps_2']}, {p['scaling_eps_4']} | |",
        ]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    f = report["figures"]
    names = ["ack throughput", *[f"processing {d}" for d in report["processing"]],
             *[f"duplicates {d} (/10)" for d in report["processing"]]]
    values = [f["ack_throughput_ratio"], *[f[f"processing_ratio_{d}"] for d in report["processing"]],
              *[f[f"duplicate_ratio_{d}"] / 10 for d in report["processing"]]]
    goals = [GOALS["ack_throughput_ratio"], *[GOALS["processing_ratio"]] * len(report["processing"]),
             *[GOALS["duplicate_ratio"] / 10] * len(report["processing"])]
    left.barh(names, values, color="#4c72b0")
    left.scatter(goals, names, color="#c44e52", marker="|", s=400, label="goal")
    left.set_title("Ratios measured in one run")
    left.legend()
    for database, p in report["processing"].items():
        right.plot([1, 2, 4], [p["scaling_eps_1"], p["scaling_eps_2"], p["scaling_eps_4"]], marker="o", label=database)
    right.set_xlabel("worker processes")
    right.set_ylabel("events/s")
    right.set_title("Scaling")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run on a tiny load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="added to the result files' names, e.g. before")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk (bench/run.sh does it)")
    workdir = Path(tempfile.mkdtemp(prefix="voice-bench-"))
    redis_server = RedisServer(workdir / "redis").start()
    postgres = PostgresServer().init().start()
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "API_KEYS": "bench"}
    procs = Processes(workdir, env)
    try:
        databases = {"sqlite": f"sqlite:///{workdir / 'voice.db'}", "postgresql": postgres.url}
        base = Settings(redis_url=redis_server.url, log_level="WARNING")
        for url in databases.values():
            migrate(url, redis_server.url)
        procs.env["DATABASE_URL"] = databases["sqlite"]
        step("acknowledgement: gunicorn serving the webhook and a bare Flask endpoint")
        ack = measure_ack(procs, args.tiny)
        redis.Redis.from_url(redis_server.url).flushdb()
        processing = {}
        for name, url in databases.items():
            procs.env["DATABASE_URL"] = url
            processing[name] = measure_processing(procs, replace(base, database_url=url), args.tiny)
        report = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "tiny": args.tiny, "label": args.label,
                  "commit": _commit(),
                  "machine": f"{os.cpu_count()} cores, {os.uname().machine}", "goals": GOALS, "ack": ack,
                  "processing": processing}
        report["figures"] = summarize(ack, processing)
    finally:
        procs.stop_all()
        redis_server.stop()
        postgres.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (report["date"][:10] + (f"-{args.label}" if args.label else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    chart(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"written: {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
