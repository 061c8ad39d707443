"""Peak resident memory of every worker process while it drains events, per pool model and database.

Starts its own redis-server and PostgreSQL (and a SQLite file), queues N events the way the
webhook does, then runs the Procfile's ``worker`` line with each pool model (the pool options are
appended to it, so they win over the line's own) until the events are applied. It prints VmHWM
(the most resident memory a process ever had) of every process in the worker's process group:
the main process and, with prefork, its pool processes.

With ``--imports`` it also runs a solo worker with an import hook (``bench/import_memory.py``)
and prints what each package's import added to the resident memory, and who imported it first.

    python -m bench.worker_memory                 # 3000 events, prefork 1 and 2, solo, both databases
    python -m bench.worker_memory --events 500 --imports
    python -m bench.worker_memory --module        # the line with ``python -m worker`` instead
    python -m bench.worker_memory --pinned-only   # without this venv's dev tools, as a production install
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from app import create_app
from app.base.extensions import db
from app.base.timeutil import utcnow
from app.plumbing.pending import PENDING_DUE
from app.plumbing.publish import enqueue
from bench.run import events
from config import Settings
from tests.conftest import migrate
from tests.support import PostgresServer, RedisServer, free_port, group_members, stop_group, wait_for

ROOT = Path(__file__).resolve().parent.parent
GOAL_MB = 80.0
POOLS = {"prefork-1": ["--pool=prefork", "--concurrency=1"], "prefork-2": ["--pool=prefork", "--concurrency=2"],
         "solo": ["--pool=solo"]}
HOOKS = str(ROOT / "bench" / "import_hook")
CELERY_COMMAND, MODULE_COMMAND = "celery -A worker worker", "python -m worker"
_STARTED = time.monotonic()


def step(message: str) -> None:
    print(f"[worker_memory {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def worker_line() -> str:
    """The Procfile's ``worker`` command, as honcho would run it."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("worker:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit("the Procfile has no worker line")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def role(pid: int, leader: int) -> str:
    return "main" if pid == leader else "pool"


def enqueue_events(settings: Settings, n: int, prefix: str) -> int:
    app = create_app(settings)
    with app.app_context():
        for event in events(n, prefix):
            enqueue(event, utcnow(), None)
        db.engine.dispose()
    app.extensions["redis"].close()
    return n


def drain(workdir: Path, env: dict[str, str], settings: Settings, line: str, pool: str, n: int,
          extra_env: dict[str, str] | None = None, log_name: str | None = None) -> list[dict[str, Any]]:
    """Queue ``n`` new events, run the worker line with ``pool`` until they are applied, and return
    the peak RSS of each process of its group (read just before it is stopped)."""
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    enqueue_events(settings, n, f"{pool}_{time.time_ns()}")
    queued = client.zcard(PENDING_DUE)
    argv = ["sh", "-c", line + " " + " ".join(shlex.quote(option) for option in POOLS[pool])]
    log = workdir / (log_name or f"worker-{pool}.log")
    with open(log, "ab") as output:
        worker = subprocess.Popen(argv, cwd=ROOT, env={**env, **(extra_env or {})}, stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        wait_for(lambda: client.zcard(PENDING_DUE) == 0 or worker.poll() is not None, timeout=600, interval=0.05)
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
        seconds = time.monotonic() - started
        time.sleep(0.5)  # the last task's acknowledgement and the pool's housekeeping
        found = []
        for pid in sorted(group_members(worker.pid)):
            try:
                found.append({"pid": pid, "role": role(pid, worker.pid),
                              "hwm_mb": round(status_kb(pid, "VmHWM") / 1024, 1),
                              "rss_mb": round(status_kb(pid, "VmRSS") / 1024, 1)})
            except OSError:
                continue
    finally:
        stop_group(worker)
        client.close()
    step(f"{pool}: {queued} events in {seconds:.1f}s; " + ", ".join(f"{p['role']} {p['hwm_mb']} MB" for p in found))
    return found


def import_costs(workdir: Path, env: dict[str, str], settings: Settings, line: str, n: int,
                 database: str) -> dict[str, Any]:
    """A solo worker under the import hook: what each package's import added to RSS."""
    report = workdir / f"imports-{database}.json"
    hook_env = {"PYTHONPATH": os.pathsep.join([HOOKS, env.get("PYTHONPATH", "")]),
                "VOICE_IMPORT_MEMORY_REPORT": str(report)}
    drain(workdir, env, settings, line, "solo", n, hook_env, log_name=f"worker-imports-{database}.log")
    wait_for(report.exists, timeout=30)
    return json.loads(report.read_text())


def unpinned_modules() -> list[str]:
    """Top-level modules of installed packages that requirements.txt does not pin (dev and test tools
    and what they pulled in): a production install, made from requirements.txt, has none of them."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    from tests.test_requirements import pinned

    pins = set(pinned())
    return sorted(top for top, dists in packages_distributions().items()
                  if not {canonicalize_name(d) for d in dists} & pins and not top.startswith("_"))


def print_imports(database: str, data: dict[str, Any], limit: float) -> None:
    packages = data["packages"]
    total = sum(p["kb"] for p in packages.values())
    print(f"\n### Import cost, solo worker, {database} (RSS added while each package's modules ran; "
          f"imports {total / 1024:.1f} MB of {data['hwm_kb'] / 1024:.1f} MB peak)\n")
    print("| package | MB | modules | first imported by |")
    print("|---|---|---|---|")
    small = 0
    for name, p in sorted(packages.items(), key=lambda item: -item[1]["kb"]):
        if p["kb"] / 1024 < limit:
            small += p["kb"]
            continue
        print(f"| {name} | {p['kb'] / 1024:.1f} | {p['modules']} | {p['first_by']} |")
    print(f"| (each under {limit} MB) | {small / 1024:.1f} | | |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--imports", action="store_true", help="also the import-cost table (a solo worker run)")
    parser.add_argument("--min-mb", type=float, default=0.3, help="import table: lump packages under this")
    parser.add_argument("--module", action="store_true", help="the Procfile's worker line with "
                        "``python -m worker`` in place of ``celery -A worker worker``")
    parser.add_argument("--pinned-only", action="store_true", help="hide from the worker what requirements.txt "
                        "does not pin (this venv's dev tools), as in a production install")
    parser.add_argument("--line", help="run this shell command instead of the Procfile's worker line "
                        "(the pool options are appended to it)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    pools = [p for p in args.pools.split(",") if p]
    if not set(pools) <= set(POOLS):
        raise SystemExit(f"--pools takes {', '.join(POOLS)}")
    hidden = unpinned_modules() if args.pinned_only else []
    workdir = Path(tempfile.mkdtemp(prefix="voice-worker-memory-"))
    step("starting redis-server and PostgreSQL")
    redis_server = RedisServer(workdir / "redis").start()
    postgres = PostgresServer().init().start()
    line = args.line or worker_line()
    if args.module:
        if CELERY_COMMAND not in line:
            raise SystemExit(f"--module: the worker line does not run {CELERY_COMMAND!r}")
        line = line.replace(CELERY_COMMAND, MODULE_COMMAND)
    results: dict[str, Any] = {"events": args.events, "worker_line": line, "hidden": hidden, "runs": {}, "imports": {}}
    try:
        databases = {"sqlite": f"sqlite:///{workdir / 'voice.db'}", "postgresql": postgres.url}
        databases = {name: url for name, url in databases.items() if name in args.databases.split(",")}
        for url in databases.values():
            migrate(url, redis_server.url)
        metrics_dir = workdir / "metrics"
        for name, url in databases.items():
            settings = Settings(database_url=url, redis_url=redis_server.url, log_level="WARNING")
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "DATABASE_URL": url, "REDIS_URL": redis_server.url, "LOG_FORMAT": "json",
                   "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WORKER_METRICS_PORT": str(free_port())}
            if args.pinned_only:
                env |= {"PYTHONPATH": os.pathsep.join([HOOKS, env.get("PYTHONPATH", "")]),
                        "VOICE_HIDDEN_MODULES": ",".join(hidden)}
            env.pop("CELERY_BROKER_URL", None)
            env.pop("WORKER_CONCURRENCY", None)
            for pool in pools:
                step(f"{name}, {pool}: queueing {args.events} events, then draining them")
                results["runs"].setdefault(name, {})[pool] = drain(workdir, env, settings, line, pool, args.events)
            if args.imports:
                step(f"{name}: import costs (a solo worker under the import hook)")
                results["imports"][name] = import_costs(workdir, env, settings, line, min(args.events, 500), name)
    finally:
        redis_server.stop()
        postgres.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"# Worker peak RSS (VmHWM), {args.events} events drained per run, goal <= {GOAL_MB} MB per process\n")
    print(f"Worker command: `{results['worker_line']}` + the pool options\n")
    if hidden:
        print(f"Hidden from the worker (not pinned in requirements.txt): {', '.join(hidden)}\n")
    print("| database | pool | process | VmHWM MB | VmRSS at the end MB |")
    print("|---|---|---|---|---|")
    for database, runs in results["runs"].items():
        for pool, processes in runs.items():
            for p in processes:
                flag = "" if p["hwm_mb"] <= GOAL_MB else " (over)"
                print(f"| {database} | {pool} | {p['role']} {p['pid']} | {p['hwm_mb']}{flag} | {p['rss_mb']} |")
    for database, data in results["imports"].items():
        print_imports(database, data, args.min_mb)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    worst = max((p["hwm_mb"] for runs in results["runs"].values() for ps in runs.values() for p in ps), default=0)
    print(f"\nlargest: {worst} MB")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped run still removes its servers
    sys.exit(main())
