"""The acknowledgement's server CPU per request against a bare Flask endpoint on the same gunicorn
line, on each broker, in one run; with ``--before``, another checkout's webhook measured in the
same turns, so a before and after is one run too.

    .venv/bin/python -m bench.ack_cpu --out bench/results/DATE-ack-cpu.json
    git worktree add /tmp/before COMMIT && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.ack_cpu --before /tmp/before --turns 5 --out ...   # before and after, one run
    .venv/bin/python -m bench.ack_cpu --brokers redis --turns 1 --seconds 3      # a quick look
    .venv/bin/python -m bench.ack_cpu --doc check    # docs/performance.md's tables against the newest results

What it starts, all stopped and removed at the end whatever happens: a redis-server of its own, a
temp folder (SQLite database, metric files, logs), a virtual host of its own on the machine's
RabbitMQ (deleted at the end), and side by side on free ports: gunicorn with gunicorn.conf.py
serving this checkout's ``wsgi:app`` ("webhook"), ``bench.bare:app`` ("bare", the yardstick: it
answers the webhook's JSON and does nothing else) and, with ``--before``, that checkout's
``wsgi:app`` ("before"). Each turn loads each server in turn with wrk (2 threads, 32 connections,
``bench/webhook.lua``: valid webhooks) for ``--seconds`` and reads its worker processes' CPU from
/proc (utime and stime apart) and their threads' context switches over exactly that load, then
divides by the requests wrk counted. Turns alternate the servers, so a burst of noise on this
shared machine lands on every figure of a ratio; each figure is the median of its turns.

After the turns, an open loop (``bench.loadgen``) at half the webhook's closed-loop maximum on each
webhook server: the p99 the issue's goal names; and the bare endpoint at the same rate right after,
the yardstick for it (the load generator shares the machine's two cores with the servers).
Ratios are bare ÷ webhook CPU per request (the
larger, the closer the webhook is to a bare endpoint) and webhook ÷ bare requests per second.
Progress goes to stderr, the result (JSON) to stdout and to ``--out``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu
import redis

from app.plumbing.queues import WEBHOOK_QUEUE
from bench.bare import FLOOR_QUEUE
from bench.loadgen import open_loop
from bench.profile_ack_gunicorn import URL_PATH, Load, answers, unprofiled
from bench.run import ROOT, Processes, body_for, children, step, sync_doc, write_result
from tests.support import RedisServer, free_port, rabbitmq_vhost, wait_for

BIN = Path(sys.executable).parent


def _commit_of(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                          check=True).stdout.strip()


def one_turn(port: int, workers: list[int], seconds: int) -> dict[str, float]:
    """One closed-loop load on one server: its worker processes' CPU and switches per request."""
    got = unprofiled(port, workers, seconds, "")
    return {"rps": got["load"]["rps"], "requests": got["requests"], "cpu_us_per_request": got["cpu_us_per_request"],
            "user_us_per_request": got["user_us_per_request"], "system_us_per_request": got["system_us_per_request"],
            "switches_per_request": got["voluntary_switches_per_request"] + got["involuntary_switches_per_request"]}


Side = tuple[Path, str, dict[str, str]]  # the checkout, the WSGI app gunicorn serves, environment of its own


def measure(procs: Processes, sides: dict[str, Side], turns: int, seconds: int, open_seconds: int,
            open_loop_for: list[str] | None = None, open_rate: float | None = None,
            open_turns: int = 1) -> dict[str, Any]:
    """Every side's server started at once, then measured in alternating turns; an open loop at half
    its maximum on each side of ``open_loop_for`` (default: every side but "bare"), or with
    ``open_rate`` every side of it at that one rate in ``open_turns`` alternating turns (the
    median turn's figures, and every turn's p99)."""
    servers: dict[str, tuple[int, list[int]]] = {}
    for name, (checkout, app, own_env) in sides.items():
        port = free_port()
        procs.cwd = checkout
        metrics_dir = procs.workdir / f"metrics-{name}"
        metrics_dir.mkdir(exist_ok=True)
        process = procs.start(name, [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app], PORT=str(port),
                              HOST="127.0.0.1", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **own_env)
        wait_for(lambda port=port, process=process: process.poll() is None and answers(port, ""), timeout=60,
                 interval=0.2)
        workers = wait_for(lambda process=process: len(children(process.pid)) >= 2 and children(process.pid),
                           timeout=30)
        servers[name] = (port, workers)
        Load(port, 2, 0.0, "").start().wait()  # warm up
    procs.cwd = ROOT
    got: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for turn in range(turns):
        for name, (port, workers) in servers.items():
            empty_queues(procs.env)
            got[name].append(one_turn(port, workers, seconds))
        step("turn {}/{}: {}".format(turn + 1, turns, ", ".join(
            f"{name} {runs[-1]['cpu_us_per_request']:.0f} us/req at {runs[-1]['rps']:.0f} req/s"
            for name, runs in got.items())))
    out: dict[str, Any] = {}
    for name, runs in got.items():
        out[name] = {key: round(statistics.median(run[key] for run in runs), 2)
                     for key in ("rps", "cpu_us_per_request", "user_us_per_request", "system_us_per_request",
                                 "switches_per_request")}
        out[name]["turns_cpu_us_per_request"] = [round(run["cpu_us_per_request"], 1) for run in runs]
        out[name]["turns_rps"] = [round(run["rps"], 1) for run in runs]
    if open_rate is not None:  # one rate for every side: where a tail comes from, rung by rung
        tails: dict[str, list[dict[str, float]]] = {name: [] for name in open_loop_for or []}
        for turn in range(open_turns):
            for name in tails:
                empty_queues(procs.env)
                tails[name].append(open_loop(servers[name][0], open_rate, open_seconds, body_for, path=URL_PATH))
            step("open loop turn {}/{} at {:.0f} req/s, p99: {}".format(turn + 1, open_turns, open_rate, ", ".join(
                f"{name} {runs[-1]['p99_ms']:.1f} ms" for name, runs in tails.items())))
        for name, runs in tails.items():
            middle = sorted(runs, key=lambda run: run["p99_ms"])[len(runs) // 2]
            out[name]["open_fixed"] = {**middle, "turns_p99_ms": [run["p99_ms"] for run in runs]}
        open_loop_for = []
    for name in [name for name in servers if name != "bare"] if open_loop_for is None else open_loop_for:
        port = servers[name][0]
        rate = max(20.0, out[name]["rps"] / 2)
        step(f"{name}: open loop at half its maximum, {rate:.0f} req/s for {open_seconds} s")
        empty_queues(procs.env)
        out[name]["open_50"] = open_loop(port, rate, open_seconds, body_for, path=URL_PATH)
        if "bare" in servers:  # the yardstick at the same rate: what this machine and the load generator allow
            step(f"bare: open loop at {name}'s rate, {rate:.0f} req/s for {open_seconds} s")
            out[name]["open_50_bare"] = open_loop(servers["bare"][0], rate, open_seconds, body_for, path=URL_PATH)
    bare = out["bare"]
    for name in [name for name in servers if name != "bare"]:
        out[name]["bare_to_webhook_cpu"] = round(bare["cpu_us_per_request"] / out[name]["cpu_us_per_request"], 3)
        out[name]["webhook_to_bare_rps"] = round(out[name]["rps"] / bare["rps"], 3)
    for name in list(servers):
        procs.stop(name)
    return out


# Every queue a server of these benches publishes to (bench.ack_variants' floor included).
BENCH_QUEUES = (WEBHOOK_QUEUE, FLOOR_QUEUE)


def empty_queues(env: dict[str, str]) -> None:
    """Each load starts on empty queues, as a production queue that workers drain would be: no
    worker runs here, and a backlog of a hundred thousand messages left by the previous loads
    slows the broker (RabbitMQ pages them to disk) and charges its pauses to whichever server is
    loaded next. The bench's own Redis is emptied; on RabbitMQ, the bench's virtual host's queues."""
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    broker_url = env.get("CELERY_BROKER_URL", "")
    if not broker_url.startswith("amqp"):
        return
    with kombu.Connection(broker_url) as connection:
        for queue in BENCH_QUEUES:
            channel = connection.channel()
            try:
                channel.queue_purge(queue)
            except connection.channel_errors:  # not declared (yet) on this virtual host: nothing to empty
                pass
            finally:
                with contextlib.suppress(*connection.channel_errors, *connection.connection_errors):
                    channel.close()


def on_each_broker(brokers: list[str], prefix: str,
                   work: Callable[[Processes, str], dict[str, Any]]) -> dict[str, Any]:
    """``work(procs, broker)`` for each broker, with what every server needs: a redis-server of the
    bench's own (REDIS_URL, and the broker on Redis), a SQLite file, metric folders, and on RabbitMQ
    a virtual host of its own; all stopped and removed at the end, on SIGTERM and SIGHUP too."""

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # through every finally below: processes and folders cleaned up

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    redis_server: RedisServer | None = None
    procs: Processes | None = None
    got: dict[str, Any] = {}
    try:
        redis_server = RedisServer(workdir / "redis").start()
        env = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir / 'voice.db'}", "REDIS_URL": redis_server.url,
               "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "API_KEYS": "bench"}
        for variable in ("CELERY_BROKER_URL", "WEBHOOK_TOKENS", "WEBHOOK_ALLOWED_IPS", "VOICE_BENCH_VARIANT"):
            env.pop(variable, None)
        procs = Processes(workdir, env)
        for broker in brokers:
            with contextlib.ExitStack() as resources:
                procs.env.pop("CELERY_BROKER_URL", None)
                if broker == "rabbitmq":
                    procs.env["CELERY_BROKER_URL"] = resources.enter_context(rabbitmq_vhost())
                got[broker] = work(procs, broker)
    finally:
        if procs is not None:
            procs.stop_all()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return got


def table(result: dict[str, Any]) -> str:
    lines = []
    for broker, got in result["brokers"].items():
        lines.append(f"broker {broker}: median of {result['turns']} alternating turns of {result['seconds']} s "
                     f"(wrk -t2 -c32)")
        lines.append(f"  {'server':8s} {'req/s':>7s} {'CPU us/req':>10s} {'user':>6s} {'kernel':>6s} "
                     f"{'switches/req':>12s} {'bare/webhook CPU':>16s} {'p99 at half max':>26s}")
        for name, figures in got.items():
            ratio = f"{figures['bare_to_webhook_cpu']:.3f}" if "bare_to_webhook_cpu" in figures else ""
            p99 = (f"{figures['open_50']['p99_ms']:.1f} ms @ {figures['open_50']['achieved_rps']:.0f}"
                   if "open_50" in figures else "")
            if "open_50_bare" in figures:
                p99 += f" (bare {figures['open_50_bare']['p99_ms']:.1f})"
            lines.append(f"  {name:8s} {figures['rps']:7.0f} {figures['cpu_us_per_request']:10.0f} "
                         f"{figures['user_us_per_request']:6.0f} {figures['system_us_per_request']:6.0f} "
                         f"{figures['switches_per_request']:12.2f} {ratio:>16s} {p99:>26s}")
    return "\n".join(lines)


DOC = ROOT / "docs" / "performance.md"
DOC_BLOCK = re.compile(r"<!-- ack-cpu -->.*<!-- /ack-cpu -->", re.S)
GOALS = {"redis": 0.6, "rabbitmq": 0.35}  # bare ÷ webhook CPU per request, this round's step
P99_GOAL_MS = 10.0


def doc_tables(cpu: dict[str, Any], cpu_source: str, parts: dict[str, Any], parts_source: str) -> str:
    """docs/performance.md's tables: the before and after of a ``--before`` run, and the parts
    (``bench.ack_parts``) of the newest ladder."""

    def met(ok: bool) -> str:
        return "" if ok else " — not met"

    before = cpu.get("before_root_commit", "?")
    lines = [f"From {cpu_source}, {cpu['turns']} alternating turns of {cpu['seconds']} s:", "",
             f"| broker | measure | before ({before}) | after ({cpu['commit']}) | goal |", "|---|---|---|---|---|"]
    for broker, got in cpu["brokers"].items():
        old, new, bare = got["before"], got["webhook"], got["bare"]
        goal, p99 = GOALS[broker], new["open_50"]["p99_ms"]
        lines += [
            f"| {broker} | server CPU per webhook (bare endpoint {bare['cpu_us_per_request']:.0f} us) | "
            f"{old['cpu_us_per_request']:.0f} us | **{new['cpu_us_per_request']:.0f} us** | |",
            f"| {broker} | bare ÷ webhook, CPU per request | {old['bare_to_webhook_cpu']:.3f} | "
            f"**{new['bare_to_webhook_cpu']:.3f}** | ≥ {goal}{met(new['bare_to_webhook_cpu'] >= goal)} |",
            f"| {broker} | webhook ÷ bare, requests/s (closed loop) | {old['webhook_to_bare_rps']:.3f} "
            f"({old['rps']:,.0f}/s) | {new['webhook_to_bare_rps']:.3f} ({new['rps']:,.0f}/s) | |",
            f"| {broker} | p99 at half the webhook's maximum (open loop) | {old['open_50']['p99_ms']:.1f} ms at "
            f"{old['open_50']['achieved_rps']:,.0f}/s | **{new['open_50']['p99_ms']:.1f} ms** at "
            f"{new['open_50']['achieved_rps']:,.0f}/s | ≤ {P99_GOAL_MS:g} ms{met(p99 <= P99_GOAL_MS)} |",
        ]
        if "open_50_bare" in old and "open_50_bare" in new:
            lines.append(f"| {broker} | the bare endpoint's p99 at the same rate (this machine's floor) | "
                         f"{old['open_50_bare']['p99_ms']:.1f} ms | {new['open_50_bare']['p99_ms']:.1f} ms | |")
    lines += ["", f"Where it goes, at {parts['commit']}: {parts_source}, {parts['turns']} alternating turns of "
                  f"{parts['seconds']} s (CPU per request, us; each part is the difference of two rungs):", "",
              "| part | " + " | ".join(parts["brokers"]) + " |", "|---|" + "---|" * len(parts["brokers"])]
    rungs = {name: None for got in parts["brokers"].values() for name in got["rungs"]}
    for name in rungs:
        lines.append(f"| rung: {name} | " + " | ".join(
            f"{got['rungs'][name]['cpu_us_per_request']:.0f}" if name in got["rungs"] else ""
            for got in parts["brokers"].values()) + " |")
    names = {name: None for got in parts["brokers"].values() for name in got["parts"]}
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{got['parts'][name]:.0f}" if name in got["parts"] else "" for got in parts["brokers"].values()) + " |")
    return "<!-- ack-cpu -->\n" + "\n".join(lines) + "\n<!-- /ack-cpu -->"


def doc(mode: str) -> int:
    """Print, check or write docs/performance.md's tables from the newest ack-cpu and ack-parts results."""
    from bench.capacity import newest, source

    cpu_path, cpu = newest("ack-cpu")
    parts_path, parts = newest("ack-parts")
    generated = doc_tables(cpu, source(cpu_path, cpu), parts, source(parts_path, parts))
    return sync_doc(DOC, DOC_BLOCK, generated, mode, "python -m bench.ack_cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", choices=["redis", "rabbitmq"], default=["redis", "rabbitmq"])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6, help="each turn's load on each server")
    parser.add_argument("--open-seconds", type=int, default=10, help="the open loop at half the maximum")
    parser.add_argument("--before", type=Path, help="another checkout of the service (an earlier commit) whose "
                                                    "webhook is measured in the same turns")
    parser.add_argument("--out", type=Path, help="write the result here (bench.run.write_result, kind ack-cpu)")
    parser.add_argument("--doc", choices=("print", "check", "write"),
                        help="no measuring: docs/performance.md's tables from the newest ack-cpu and ack-parts results")
    args = parser.parse_args()
    if args.doc:
        return doc(args.doc)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: bash bench/run.sh installs it (apt-get install wrk)")

    sides: dict[str, Side] = {"webhook": (ROOT, "wsgi:app", {}),
                              **({"before": (args.before.resolve(), "wsgi:app", {})} if args.before else {}),
                              "bare": (ROOT, "bench.bare:app", {})}

    def servers(procs: Processes, broker: str) -> dict[str, Any]:
        step(f"broker {broker}: servers {', '.join(sides)}")
        return measure(procs, sides, args.turns, args.seconds, args.open_seconds)

    brokers = on_each_broker(args.brokers, "voice-ack-cpu-", servers)
    result = {"turns": args.turns, "seconds": args.seconds, "open_seconds": args.open_seconds, "brokers": brokers,
              **({"before_root_commit": _commit_of(args.before)} if args.before else {})}
    print(table(result), file=sys.stderr)
    print(json.dumps(result, indent=1))
    if args.out:
        command = " ".join([".venv/bin/python -m bench.ack_cpu", *sys.argv[1:]])
        if args.before:
            command = command.replace(str(args.before), f"CHECKOUT-AT-{result['before_root_commit']}")
        write_result(args.out, "ack-cpu", command, result)
        step(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
