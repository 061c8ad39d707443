"""The benchmark: starts its own Redis, PostgreSQL and SQLite, gunicorn and Celery, measures, writes
bench/results/<date>.json, .md and .png. Every goal is a ratio of two figures from the same run.

    python -m bench.run            # the full run (a few minutes)
    python -m bench.run --tiny     # a smoke run on a tiny load (what the test suite does)
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import redis

from app import create_app
from app.applying.domain import apply_event
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.payload.events import Event
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from bench.loadgen import open_loop
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, free_port, rabbitmq_vhost, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
_STARTED = time.monotonic()


def step(message: str) -> None:
    """Progress on stderr as the run goes (a full run takes minutes); the report goes to stdout."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


GOALS = {"ack_throughput_ratio": 0.75, "ack_p99_ms_at_half": 10.0, "ack_p99_ratio_at_80": 3.0,
         "network_throughput_ratio": 0.9, "processing_ratio": 0.6, "duplicate_ratio": 5.0, "peak_rss_mb": 80.0}


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
    def __init__(self, workdir: Path, env: dict[str, str], cwd: Path = ROOT) -> None:
        """``cwd``: the checkout whose service the processes run (``python -m worker`` imports from it)."""
        self.workdir, self.env, self.running, self.cwd = workdir, env, {}, cwd

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen(argv, cwd=self.cwd, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
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


def measure_ack(procs: Processes, tiny: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Both servers run side by side and are measured in turns, so a burst of noise on this shared
    machine lands on both figures of a ratio, not on one; each figure is the median of its turns."""
    seconds, rounds = (1, 1) if tiny else (4, 5)
    results: dict[str, Any] = {}
    servers = {}
    for name, app in (("webhook", "wsgi:app"), ("bare", "bench.bare:app")):
        port = free_port()
        servers[name] = (port, procs.start(name, [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app],
                                           PORT=str(port), HOST="127.0.0.1", **(env or {})))
        wait_for(lambda port=port: _answers(port), timeout=30)
        wrk(port, 1, 16)  # warm up
    turns: dict[str, list[float]] = {"webhook": [], "bare": []}
    for turn in range(rounds):
        for name, (port, _process) in servers.items():
            step(f"ack: closed-loop turn {turn + 1}/{rounds}, {name}")
            turns[name].append(wrk(port, seconds, 32))
        step(f"closed loop, turn {turn + 1} of {rounds}: webhook {turns['webhook'][-1]:.0f} req/s, "
                 f"bare {turns['bare'][-1]:.0f} req/s")
    for name, rates in turns.items():
        results[f"{name}_rps"] = statistics.median(rates)
        results[f"{name}_rps_turns"] = rates
    # Open loop at half and at 80% of the webhook's closed-loop maximum, on both endpoints in turn.
    for share in (0.5, 0.8):
        rate = max(20.0, results["webhook_rps"] * share)
        step(f"open loop at {int(share * 100)}% of the webhook's maximum: {rate:.0f} req/s on both endpoints")
        for name, (port, _process) in servers.items():
            step(f"ack: open loop at {int(share * 100)}% ({rate:.0f} req/s), {name}")
            results[f"{name}_open_{int(share * 100)}"] = open_loop(port, rate, 2 if tiny else 10, body_for)
    results["web_worker_peak_rss_mb"] = max(peak_rss_mb(pid) for pid in children(servers["webhook"][1].pid))
    results["bare_worker_peak_rss_mb"] = max(peak_rss_mb(pid) for pid in children(servers["bare"][1].pid))
    for name in servers:
        procs.stop(name)
    return results


def measure_network(procs: Processes, redis_url: str, broker_url: str, rtt_ms: float, tiny: bool) -> dict[str, Any]:
    """The webhook with Redis and the broker behind a delay proxy (``rtt_ms`` per round trip):
    closed-loop throughput (median of turns) and the open-loop p99 at half of that maximum."""
    seconds, rounds = (1, 1) if tiny else (4, 3)
    targets = {"REDIS_URL": redis_url, **({"CELERY_BROKER_URL": broker_url} if broker_url else {})}
    env = {}
    for variable, url in targets.items():
        parsed = urlsplit(url)
        port = free_port()
        procs.start(f"proxy-{variable}", [sys.executable, "-m", "bench.delayproxy", "--listen", f"127.0.0.1:{port}",
                                           "--target", f"127.0.0.1:{parsed.port}", "--delay-ms", str(rtt_ms / 2)])
        env[variable] = urlunsplit(parsed._replace(netloc=parsed.netloc.replace(f":{parsed.port}", f":{port}")))
    port = free_port()
    procs.start("webhook", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], PORT=str(port),
                HOST="127.0.0.1", **env)
    wait_for(lambda: _answers(port), timeout=30)
    wrk(port, 1, 16)
    rates = [wrk(port, seconds, 32) for _ in range(rounds)]
    rps = statistics.median(rates)
    half = open_loop(port, max(20.0, rps / 2), 2 if tiny else 10, body_for)
    for name in ["webhook", *(f"proxy-{variable}" for variable in targets)]:
        procs.stop(name)
    return {"rtt_ms": rtt_ms, "rps": rps, "rps_turns": rates, "open_50": half}


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


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    raise KeyError(name)


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


MINGLE_SECONDS = 1.0  # how long Celery's mingle waits for replies as a worker starts


class Drain(NamedTuple):
    """A worker line's drain: events/s, the highest peak RSS (MB) of its processes, and the CPU the
    worker processes and the Redis server each spent per event over the drain (us)."""

    rate: float
    rss: float
    worker_cpu_us: float
    redis_cpu_us: float


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU the processes have used so far (/proc, clock ticks)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return ticks / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def worker_rate(procs: Processes, settings: Settings, batch: list[Event], processes: int,
                options: tuple[str, ...] = (), **env: str) -> Drain:
    """Enqueue the batch, set its queue aside, start ``processes`` copies of the Procfile's
    one-process worker line (as ``honcho start -c worker=N`` does), and once every one of them waits
    in BRPOP put the queue back and time them until the last event is applied (``Drain``).
    ``options`` are added to the line (``-E``: task events on, as while Flower watches).

    A worker takes a second or two to start: timed from the first event applied, a drain shorter
    than that is one process's, however many the line starts."""
    app = create_app(settings)
    client = redis.Redis.from_url(settings.redis_url)
    with app.app_context():
        for event in batch:
            enqueue(event, utcnow(), None)
    total = client.zcard(PENDING_DUE)
    queues = [key for key in client.scan_iter(match="voice-*") if client.type(key) == b"list"]
    aside = {key: b"bench:aside:" + key for key in queues}
    for key, held in aside.items():
        client.rename(key, held)
    names = [f"worker.{i}" for i in range(1, processes + 1)]
    command = " ".join([procfile_command("worker"), *options])
    lines = [procs.start(name, ["bash", "-c", command], WORKER_METRICS_PORT="0", HONCHO_PROCESS_NAME=name,
                         PATH=f"{BIN}:{os.environ['PATH']}", **env) for name in names]
    # Each process blocks in a BRPOP twice as it starts: first on a reply queue, waiting at most
    # MINGLE_SECONDS for other workers' answers (Celery's start-up exchange), then on the queues as
    # its consumer. Its log's "ready." line would tell them apart, but only at INFO.
    wait_for(lambda: waiting_consumers(client) >= processes, timeout=60, interval=0.005)
    time.sleep(MINGLE_SECONDS + 0.5)
    wait_for(lambda: waiting_consumers(client) >= processes, timeout=60, interval=0.005)
    pids = [pid for line in lines for pid in [line.pid, *descendants(line.pid)]]
    worker_cpu, redis_cpu = cpu_seconds(pids), redis_cpu_seconds(client)
    started = time.perf_counter()
    back = client.pipeline(transaction=True)
    for key, held in aside.items():
        back.rename(held, key)
    back.execute()  # a blocked BRPOP is served as soon as its list exists again
    wait_for(lambda: client.zcard(PENDING_DUE) == 0, timeout=600, interval=0.01)
    elapsed = time.perf_counter() - started
    worker_cpu, redis_cpu = cpu_seconds(pids) - worker_cpu, redis_cpu_seconds(client) - redis_cpu
    rss = max((peak_rss_mb(pid) for pid in pids), default=0.0)
    for name in names:
        procs.stop(name)
    with app.app_context():
        db.engine.dispose()
    return Drain(total / elapsed, rss, round(worker_cpu / total * 1e6, 1), round(redis_cpu / total * 1e6, 1))


def waiting_consumers(client: redis.Redis) -> int:
    """Connections blocked in BRPOP right now: one per worker process that is consuming."""
    return sum(1 for entry in client.client_list() if entry.get("cmd") == "brpop" and "b" in entry.get("flags", ""))


def measure_processing(procs: Processes, settings: Settings, tiny: bool) -> dict[str, Any]:
    n = 200 if tiny else 3000
    results: dict[str, Any] = {"events": n}
    step(f"processing, {settings.database_url.split(':', 1)[0]}: plain loop, then workers ({n} events a run)")
    results["plain_loop_eps"] = round(plain_loop_rate(settings, events(n, f"plain{time.time_ns()}")), 1)
    fresh = events(n, f"new{time.time_ns()}")
    rate, rss = worker_rate(procs, settings, fresh, 1)[:2]
    results["worker_eps"] = round(rate, 1)
    results["worker_process_peak_rss_mb"] = rss
    results["duplicate_eps"] = round(worker_rate(procs, settings, fresh, 1)[0], 1)  # the same events again
    for count in (1, 2, 4):
        step(f"processing: scaling with {count} worker process(es)")
        results[f"scaling_eps_{count}"] = round(
            worker_rate(procs, settings, events(n, f"scale{count}_{time.time_ns()}"), count)[0], 1)
    # What an operator sees: the Procfile's line as it ships, as many as scripts/run.sh starts
    # (its default WORKER_CONCURRENCY), INFO logs.
    queued = 100 if tiny else 1500
    step(f"processing: the Procfile's worker line as it ships, {queued} new events, then the same again")
    line = events(queued, f"line{time.time_ns()}")
    processes = int(re.search(r"WORKER_CONCURRENCY:-(\d+)", (ROOT / "scripts" / "run.sh").read_text()).group(1))
    new_rate, new_rss = worker_rate(procs, settings, line, processes, LOG_LEVEL="INFO")[:2]
    dup_rate, dup_rss = worker_rate(procs, settings, line, processes, LOG_LEVEL="INFO")[:2]
    results["line"] = {"events": queued, "processes": processes, "new_eps": round(new_rate, 1),
                       "duplicate_eps": round(dup_rate, 1), "peak_rss_mb": max(new_rss, dup_rss)}
    return results


# --- report ----------------------------------------------------------------------------------


def summarize(acks: dict[str, dict[str, Any]], processing: dict[str, dict[str, Any]],
              network: dict[str, dict[str, Any]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for broker, ack in acks.items():
        suffix = "" if broker == "redis" else f"_{broker}"
        figures[f"ack_throughput_ratio{suffix}"] = round(ack["webhook_rps"] / ack["bare_rps"], 3)
        figures[f"ack_p99_ms_at_half{suffix}"] = ack["webhook_open_50"]["p99_ms"]
        figures[f"ack_p99_ratio_at_80{suffix}"] = round(
            ack["webhook_open_80"]["p99_ms"] / max(ack["bare_open_80"]["p99_ms"], 0.01), 2)
    figures["web_worker_peak_rss_mb"] = acks["redis"]["web_worker_peak_rss_mb"]
    for broker, runs in network.items():
        delayed = [run for run in runs.values() if run["rtt_ms"]]
        if delayed and "0" in runs:
            figures[f"network_throughput_ratio_{broker}"] = round(delayed[0]["rps"] / runs["0"]["rps"], 3)
    for database, p in processing.items():
        figures[f"processing_ratio_{database}"] = round(p["worker_eps"] / p["plain_loop_eps"], 3)
        figures[f"duplicate_ratio_{database}"] = round(p["duplicate_eps"] / p["worker_eps"], 2)
        figures[f"worker_process_peak_rss_mb_{database}"] = max(p["worker_process_peak_rss_mb"],
                                                                p["line"]["peak_rss_mb"])
    return figures


def markdown(report: dict[str, Any]) -> str:
    f = report["figures"]
    lines = [f"# Benchmark {report['date']} (commit {report['commit']})", "", f"Machine: {report['machine']}", "",
             "| measure | figure | goal |", "|---|---|---|"]
    for broker, ack in report["acks"].items():
        suffix = "" if broker == "redis" else f"_{broker}"
        lines += [
            f"| {broker}: ack throughput ratio (webhook {ack['webhook_rps']:.0f} req/s ÷ bare {ack['bare_rps']:.0f} "
            f"req/s) | {f[f'ack_throughput_ratio{suffix}']} | ≥ {GOALS['ack_throughput_ratio']} |",
            f"| {broker}: ack p99 at half the max ({ack['webhook_open_50']['rate']:.0f} req/s, open loop) "
            f"| {f[f'ack_p99_ms_at_half{suffix}']} ms | ≤ {GOALS['ack_p99_ms_at_half']} ms |",
            f"| {broker}: ack p99 at 80% ÷ bare p99 at 80% ({ack['webhook_open_80']['p99_ms']} ÷ "
            f"{ack['bare_open_80']['p99_ms']} ms) | {f[f'ack_p99_ratio_at_80{suffix}']} "
            f"| ≤ {GOALS['ack_p99_ratio_at_80']} |",
        ]
    for broker, runs in report["network"].items():
        for run in runs.values():
            lines.append(f"| {broker} behind the delay proxy, {run['rtt_ms']} ms round trip: ack req/s, p99 at half "
                         f"| {run['rps']:.0f} req/s, {run['open_50']['p99_ms']} ms | |")
        if f"network_throughput_ratio_{broker}" in f:
            lines.append(f"| {broker}: throughput at the delayed round trip ÷ at 0 ms (both through the proxy) "
                         f"| {f[f'network_throughput_ratio_{broker}']} | ≥ {GOALS['network_throughput_ratio']} |")
    bare_rss = report["acks"]["redis"]["bare_worker_peak_rss_mb"]
    lines.append(f"| peak RSS, one web worker (the bare endpoint's: {bare_rss} MB) | {f['web_worker_peak_rss_mb']} MB "
                 f"| ≤ {GOALS['peak_rss_mb']} MB |")
    for database, p in report["processing"].items():
        lines += [
            f"| processing ratio, {database} (worker {p['worker_eps']} ÷ plain loop {p['plain_loop_eps']} events/s) "
            f"| {f[f'processing_ratio_{database}']} | ≥ {GOALS['processing_ratio']} |",
            f"| duplicate fast path, {database} ({p['duplicate_eps']} ÷ {p['worker_eps']} events/s) "
            f"| {f[f'duplicate_ratio_{database}']} | ≥ {GOALS['duplicate_ratio']} |",
            f"| peak RSS, every process of the worker line, {database} "
            f"| {f[f'worker_process_peak_rss_mb_{database}']} MB "
            f"| ≤ {GOALS['peak_rss_mb']} MB |",
            f"| scaling, {database}: events/s with 1, 2, 4 worker processes "
            f"| {p['scaling_eps_1']}, {p['scaling_eps_2']}, {p['scaling_eps_4']} | |",
            f"| the Procfile's worker line as shipped ({p['line']['processes']} processes, INFO logs), {database}: "
            f"{p['line']['events']} queued new events, then the same as duplicates "
            f"| {p['line']['new_eps']} and {p['line']['duplicate_eps']} events/s, peak RSS "
            f"{p['line']['peak_rss_mb']} MB | |",
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
    for database, p in report["processing"].items():  # empty with --ack-only
        right.plot([1, 2, 4], [p["scaling_eps_1"], p["scaling_eps_2"], p["scaling_eps_4"]], marker="o", label=database)
    right.set_xlabel("worker processes")
    right.set_ylabel("events/s")
    right.set_title("Scaling")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_result(path: Path, kind: str, command: str, result: dict[str, Any]) -> None:
    """A result file another command reads (bench.capacity): what, by which command, at which commit."""
    stamped = {"kind": kind, "command": command, "commit": _commit(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    path.write_text(json.dumps(stamped, indent=2) + "\n")


def sync_doc(path: Path, block: re.Pattern[str], generated: str, mode: str, command: str) -> int:
    """Print ``generated``, or check it against the block of ``path`` that ``block`` matches (1 when
    they differ), or write it there: a doc's computed table kept what its command prints."""
    if mode == "print":
        print(generated)
        return 0
    text = path.read_text()
    found = block.search(text)
    if found is None:
        print(f"{path} has no markers for `{command}`", file=sys.stderr)
        return 1
    if mode == "check":
        if found.group(0) != generated:
            print(f"{path} differs from `{command} --doc print`: run --doc write", file=sys.stderr)
            return 1
        return 0
    path.write_text(text[:found.start()] + generated + text[found.end():])
    return 0


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run on a tiny load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="added to the result files' names, e.g. before")
    parser.add_argument("--brokers", default="redis,rabbitmq",
                        help="comma-separated: redis, rabbitmq (a virtual host of its own on the machine's RabbitMQ)")
    parser.add_argument("--rtt-ms", type=float, default=0.5,
                        help="round trip of the delayed network to Redis and the broker (0: no network runs)")
    parser.add_argument("--ack-only", action="store_true", help="measure the acknowledgement only, not the worker")
    args = parser.parse_args()
    brokers = [b for b in args.brokers.split(",") if b]
    if not set(brokers) <= {"redis", "rabbitmq"} or "redis" not in brokers:
        raise SystemExit("--brokers takes redis, and optionally rabbitmq")
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
        with contextlib.ExitStack() as resources:
            amqp_url = resources.enter_context(rabbitmq_vhost()) if "rabbitmq" in brokers else ""
            databases = {"sqlite": f"sqlite:///{workdir / 'voice.db'}", "postgresql": postgres.url}
            base = Settings(redis_url=redis_server.url, log_level="WARNING")
            for url in databases.values():
                migrate(url, redis_server.url)
            procs.env["DATABASE_URL"] = databases["sqlite"]
            acks = {}
            for broker in brokers:
                step(f"acknowledgement, {broker} broker")
                acks[broker] = measure_ack(procs, args.tiny, {"CELERY_BROKER_URL": amqp_url} if broker != "redis"
                                           else None)
            network: dict[str, dict[str, Any]] = {}
            for broker in brokers if args.rtt_ms else []:
                for rtt in (0.0, args.rtt_ms):
                    step(f"acknowledgement, {broker} broker, behind the delay proxy at {rtt} ms round trip")
                    network.setdefault(broker, {})[f"{rtt:g}"] = measure_network(
                        procs, redis_server.url, amqp_url if broker != "redis" else "", rtt, args.tiny)
            redis.Redis.from_url(redis_server.url).flushdb()
            processing = {}
            for name, url in databases.items() if not args.ack_only else []:
                step(f"processing, {name}")
                procs.env["DATABASE_URL"] = url
                processing[name] = measure_processing(procs, replace(base, database_url=url), args.tiny)
        report = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "tiny": args.tiny, "label": args.label,
                  "commit": _commit(),
                  "machine": f"{os.cpu_count()} cores, {os.uname().machine}", "goals": GOALS,
                  "ack": acks["redis"], "acks": acks, "network": network, "processing": processing}
        report["figures"] = summarize(acks, processing, network)
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
