"""Where a webhook's server CPU goes under gunicorn, part by part: py-spy on every gunicorn worker
process (not the arbiter) while a steady closed-loop load of valid webhooks runs, the collapsed
stacks summed into the parts of a request. ``bench/profile_ack.py`` profiles through Flask's test
client and so misses gunicorn's own parts (HTTP parsing, socket I/O, its thread pool); this one
runs the Procfile's web line as it ships.

    python -m bench.profile_ack_gunicorn                         # Redis broker, 20 s
    python -m bench.profile_ack_gunicorn --broker rabbitmq       # a virtual host of its own on the machine's RabbitMQ
    python -m bench.profile_ack_gunicorn --seconds 20 --out /tmp/ack-profile-redis.json
    python -m bench.profile_ack_gunicorn --no-bare               # the webhook only, not bench/bare.py's endpoint

What it starts, all stopped and removed at the end whatever happens: a redis-server of its own
(tests.support.RedisServer), a temp folder (SQLite database, metric files, logs), the Procfile's web
line on a free port (gunicorn with gunicorn.conf.py, ``wsgi:app``; then the same line serving
``bench.bare:app``), wrk (``bench/webhook.lua``, 2 threads, 32 connections; bench.loadgen's open loop
at ``--fallback-rate`` when wrk is missing), and one ``py-spy record --format raw --rate 500
--nonblocking`` per gunicorn worker process for ``--seconds``. With ``--broker rabbitmq``, a virtual
host of its own on the machine's RabbitMQ (tests.support.rabbitmq_vhost), deleted at the end.

How a sample is attributed (``RULES``): its frames are looked at from the leaf up; the first frame
that a rule matches (rules tried in their listed order on each frame) names the part. Frames no
rule matches (the standard library: socket, json, uuid, threading...) are transparent: they count
for the part of the nearest matching caller, so each part is inclusive of the generic code it
calls, and exclusive of what another part owns (the broker round trip inside the publish, the log
line inside an after-request hook). A sample no frame of which matches is "other". Before that,
the samples of threads waiting for work (``IDLE``: the worker's main thread in epoll waiting for
connections, the pool threads waiting for a request, the memory reporter sleeping) are taken out
and counted separately: py-spy's own idle detection lets many of them through under
``--nonblocking``. Shares are of the remaining (working) samples. "us/req" is samples / rate /
requests answered while py-spy ran: thread time on a CPU per request, an estimate that a busy
machine inflates; compare the shares, and the webhook - bare difference per part. The worker
processes' own CPU (utime + stime from /proc over the same seconds) is printed beside it.

What a sample means: py-spy 0.3.14 cannot tell here whether a thread runs (its idle test falls back
to the leaf frame's name), so by default a "working" sample is also a thread blocked in a socket
call (the broker's reply, sendall) or waiting to take the GIL back after one: the default table is
where the threads' time goes, not the CPU. ``--gil`` keeps only the sample of the thread holding
the GIL in each process: the Python CPU, the closer answer to "where the CPU goes" (kernel time in
socket calls, made without the GIL, is then left out). py-spy 0.3.14 sometimes panics under
``--nonblocking``; the server is then profiled again with a fresh gunicorn (``--attempts``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.run import ROOT, Processes, body_for, children, procfile_command, step, write_result
from tests.support import RedisServer, free_port, rabbitmq_vhost, wait_for

BIN = Path(sys.executable).parent
URL_PATH = "/api/v1/voice/webhook"
RATE = 500  # py-spy samples per second per thread
AUTH_TOKEN = "bench-profile-token"  # noqa: S105 - a throwaway server's; with --auth: WEBHOOK_TOKENS, and ?token= on every request

# (part, substrings of a frame "function (file:line)"): tried in this order on each frame, leaf first.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("log line (structlog + stdlib logging)",
     ("structlog/", "logging/", "app/base/logs.py", "_record (app/intake/webhook.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "app/base/metrics.py")),
    ("webhook auth / allow-list", ("app/base/security.py",)),
    ("body decoding + validation (msgspec)", ("app/payload/events.py", "app/payload/africastalking.py", "msgspec")),
    ("task message (celery create_task_message, kombu serialize, app.plumbing.publish)",
     ("celery/", "kombu/serialization.py", "kombu/utils/json.py", "kombu/utils/uuid.py", "_prepare (kombu/messaging.py",
      "app/plumbing/publish.py", "app/payload/envelope.py", "app/plumbing/pending.py")),
    ("broker round trip (redis-py / kombu / py-amqp publish, confirm wait)",
     ("redis/", "hiredis", "kombu/", "amqp/", "vine/", "app/plumbing/transport.py", "app/plumbing/redis_clients.py",
      "app/plumbing/queues.py")),
    ("response building (jsonify, werkzeug Response)",
     ("jsonify (flask/", "make_response (flask/", "finalize_request (flask/", "flask/json/",
      "werkzeug/wrappers/response.py", "werkzeug/sansio/response.py")),
    ("Flask request hooks (request id, security headers)",
     ("_request_id (app/__init__.py", "_valid_request_id (app/__init__.py", "_headers (app/__init__.py",
      "preprocess_request (flask/", "process_response (flask/")),
    ("webhook view glue (utcnow, replace, g)", ("receive (app/intake/webhook.py", "app/base/timeutil.py",
                                                "webhook (bench/bare.py")),
    ("WSGI/werkzeug request building (environ, Request, body read)",
     ("_read_body (app/intake/webhook.py", "werkzeug/wrappers/request.py", "werkzeug/sansio/request.py",
      "werkzeug/wsgi.py", "werkzeug/formparser.py", "werkzeug/sansio/utils.py", "flask/wrappers.py",
      "request_context (flask/", "__init__ (flask/ctx.py")),
    ("Flask dispatch (app/request context, routing, LocalProxy)",
     ("flask/", "werkzeug/routing/", "werkzeug/local.py", "blinker/")),
    ("gunicorn: HTTP parsing, socket I/O, thread pool", ("gunicorn/", "concurrent/futures/", "(gunicorn:")),
]
OTHER = "other"


def _line_of(source_file: str, needle: str, first: int = 1) -> int:
    """The line number of the first line at or after ``first`` holding ``needle``."""
    for number, text in enumerate(Path(source_file).read_text().splitlines(), start=1):
        if number >= first and needle in text:
            return number
    raise LookupError(f"{needle!r} not in {source_file}")


def idle_rules() -> list[tuple[str, str]]:
    """(what waits, the leaf frame's exact "function (file:line)" suffix): the blocking calls (C
    code, so the Python leaf is the line that calls them) of threads with nothing to do."""
    import concurrent.futures.thread
    import selectors

    pool_line = _line_of(concurrent.futures.thread.__file__, "work_queue.get(block=True)")
    poll_line = _line_of(selectors.__file__, "self._selector.poll(",
                         inspect.getsourcelines(selectors._PollLikeSelector.select)[1])  # type: ignore[attr-defined]
    sleep_line = _line_of(str(ROOT / "app" / "base" / "metrics.py"), "time.sleep(PROCESS_MEMORY_INTERVAL_SECONDS)")
    return [
        ("gunicorn main thread waiting in epoll for connections", f"select (selectors.py:{poll_line})"),
        ("pool threads waiting for a request", f"_worker (concurrent/futures/thread.py:{pool_line})"),
        ("memory reporter thread sleeping", f"report (app/base/metrics.py:{sleep_line})"),
    ]


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: "root;...;leaf count" per line."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        head, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = tuple(frame for frame in head.strip().split(";") if frame)
        stacks[frames] += int(count)
    return stacks


def attribute(stacks: Counter[tuple[str, ...]], idle: list[tuple[str, str]]) -> dict[str, Any]:
    parts: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    unmatched: Counter[str] = Counter()  # the leaf frames of "other", to see what a rule misses
    leaves: dict[str, Counter[str]] = {}
    for frames, count in stacks.items():
        leaf = frames[-1] if frames else "(empty stack)"
        waiting = next((name for name, suffix in idle if leaf.endswith(suffix)), None)
        if waiting:
            waits[waiting] += count
            continue
        part = next((name for frame in reversed(frames) for name, needles in RULES
                     if any(needle in frame for needle in needles)), OTHER)
        parts[part] += count
        leaves.setdefault(part, Counter())[leaf] += count
        if part == OTHER:
            unmatched[leaf] += count
    return {"parts": parts, "idle": waits, "other_leaves": unmatched.most_common(8),
            "top_leaves": {part: counter.most_common(5) for part, counter in leaves.items()}}


# --- the run ---------------------------------------------------------------------------------


class PySpyFailed(RuntimeError):
    """py-spy 0.3.14 may panic under --nonblocking (reading a code object while it changes)."""


def answers(port: int, query: str) -> bool:
    """Whether the server answers a valid webhook with 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("POST", URL_PATH + query, body_for(0), {"Content-Type": "application/x-www-form-urlencoded"})
        return conn.getresponse().status == 200
    finally:
        conn.close()


class Load:
    """A steady closed-loop load in a thread: wrk, or bench.loadgen's open loop without it."""

    def __init__(self, port: int, seconds: int, fallback_rate: float, query: str) -> None:
        self.port, self.seconds, self.fallback_rate, self.query = port, seconds, fallback_rate, query
        self.process: subprocess.Popen[str] | None = None
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            if shutil.which("wrk"):
                self.process = subprocess.Popen(
                    ["wrk", "-t2", "-c32", f"-d{self.seconds}s", "-s", str(ROOT / "bench" / "webhook.lua"),
                     f"http://127.0.0.1:{self.port}{URL_PATH}{self.query}"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                out, _ = self.process.communicate()
                non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
                done = re.search(r"(\d+) requests in", out)
                self.result = {"tool": "wrk -t2 -c32 bench/webhook.lua", "rps": float(rate.group(1)) if rate else 0.0,
                               "requests": int(done.group(1)) if done else None,
                               "non_2xx": int(non_2xx.group(1)) if non_2xx else 0}
            else:
                from bench.loadgen import open_loop

                done = open_loop(self.port, self.fallback_rate, self.seconds, body_for, path=URL_PATH + self.query,
                                 connections=32)
                self.result = {"tool": f"bench.loadgen open loop at {self.fallback_rate:g} req/s",
                               "rps": done["achieved_rps"], "non_2xx": done["errors"]}
        except BaseException as error:  # reported by the main thread
            self.error = error

    def wait(self) -> dict[str, Any]:
        self.thread.join(timeout=self.seconds + 60)
        if self.error is not None:
            raise RuntimeError(f"the load failed: {self.error!r}")
        if self.thread.is_alive() or not self.result:
            raise RuntimeError("the load did not finish")
        if self.result["non_2xx"]:
            raise RuntimeError(f"{self.result['non_2xx']} requests were not answered 200")
        return self.result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/<pid>/stat), all its threads."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process so far, in seconds, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far, summed over the process's threads."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def unprofiled(port: int, workers: list[int], seconds: int, query: str) -> dict[str, Any]:
    """The same closed-loop load with no profiler attached: the worker processes' CPU per request
    (user and kernel apart) and their threads' context switches per request. py-spy pauses a
    process for each sample (without --nonblocking), which inflates both."""
    before = {pid: (cpu_split(pid), context_switches(pid)) for pid in workers}
    loaded = Load(port, seconds, 0.0, query).start().wait()
    requests = max(loaded.get("requests") or loaded["rps"] * seconds, 1)
    user = system = voluntary = involuntary = 0.0
    for pid, ((user0, system0), (voluntary0, involuntary0)) in before.items():
        (user1, system1), (voluntary1, involuntary1) = cpu_split(pid), context_switches(pid)
        user, system = user + user1 - user0, system + system1 - system0
        voluntary, involuntary = voluntary + voluntary1 - voluntary0, involuntary + involuntary1 - involuntary0
    return {"seconds": seconds, "load": loaded, "requests": round(requests),
            "cpu_us_per_request": round((user + system) / requests * 1e6, 1),
            "user_us_per_request": round(user / requests * 1e6, 1),
            "system_us_per_request": round(system / requests * 1e6, 1),
            "voluntary_switches_per_request": round(voluntary / requests, 2),
            "involuntary_switches_per_request": round(involuntary / requests, 2)}


def profile_server(procs: Processes, workdir: Path, name: str, app: str, seconds: int, fallback_rate: float,
                   idle: list[tuple[str, str]], gil: bool, blocking: bool, query: str,
                   plain_seconds: int = 0) -> dict[str, Any]:
    """The Procfile's web line serving ``app`` under load; py-spy on each worker process."""
    line = procfile_command("web")
    if line.count("wsgi:app") != 1:
        raise SystemExit(f"the Procfile's web line does not name wsgi:app once: {line}")
    port = free_port()
    arbiter = procs.start(name, ["bash", "-c", line.replace("wsgi:app", app)], PORT=str(port), HOST="127.0.0.1",
                          PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    spies: list[subprocess.Popen[bytes]] = []
    load: Load | None = None
    try:
        wait_for(lambda: arbiter.poll() is None and answers(port, query), timeout=60, interval=0.2)
        workers = wait_for(lambda: len(children(arbiter.pid)) >= int(os.environ.get("WEB_CONCURRENCY", "2"))
                           and children(arbiter.pid), timeout=30)
        plain: dict[str, Any] | None = None
        if plain_seconds and shutil.which("wrk"):
            step(f"{name}: gunicorn {arbiter.pid} on :{port}, workers {workers}; 3 s of warm-up, then "
                 f"{plain_seconds} s unprofiled")
            Load(port, 3, 0.0, query).start().wait()
            plain = unprofiled(port, workers, plain_seconds, query)
            step(f"{name}: unprofiled {plain['load']['rps']:.0f} req/s, {plain['cpu_us_per_request']:.0f} us CPU/req "
                 f"(user {plain['user_us_per_request']:.0f}, kernel {plain['system_us_per_request']:.0f}), "
                 f"{plain['voluntary_switches_per_request']:.2f} + {plain['involuntary_switches_per_request']:.2f} "
                 f"context switches/req")
        step(f"{name}: gunicorn {arbiter.pid} on :{port}, workers {workers}; warming up, then {seconds} s under py-spy")
        load = Load(port, seconds + 4, fallback_rate, query).start()  # 2 s of warm-up before py-spy, 2 s after
        time.sleep(2)
        outputs = {pid: workdir / f"{name}-{pid}.raw" for pid in workers}
        cpu_before = {pid: cpu_seconds(pid) for pid in workers}
        for pid, output in outputs.items():
            spies.append(subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--format", "raw", "--rate", str(RATE),
                 *([] if blocking else ["--nonblocking"]), *(["--gil"] if gil else []),
                 "--duration", str(seconds), "--pid", str(pid), "--output", str(output)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        said = []
        for spy in spies:
            out, _ = spy.communicate(timeout=seconds + 60)
            said.append(out.decode(errors="replace"))
            if spy.returncode != 0:
                raise PySpyFailed(f"py-spy failed ({spy.returncode}): {said[-1][-300:]}")
        cpu_used = sum(cpu_seconds(pid) - cpu_before[pid] for pid in workers)  # py-spy ran ~``seconds``
        loaded = load.wait()
        if arbiter.poll() is not None or sorted(children(arbiter.pid)) != sorted(workers):
            raise RuntimeError(f"{name}: gunicorn lost a worker while profiled")
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=10)
        if load is not None:
            load.stop()
        procs.stop(name)
    stacks: Counter[tuple[str, ...]] = Counter()
    for output in outputs.values():
        stacks.update(parse_raw(output.read_text()))
    counted = [re.search(r"Samples: (\d+) Errors: (\d+)", text) for text in said]
    found = attribute(stacks, idle)
    working = sum(found["parts"].values())
    requests = loaded["rps"] * seconds
    result = {
        "app": app, "workers": len(workers), "load": loaded, "requests_while_profiled": round(requests),
        "py_spy": {"samples": sum(int(m.group(1)) for m in counted if m),
                   "errors": sum(int(m.group(2)) for m in counted if m)},
        "working_samples": working, "idle_samples": sum(found["idle"].values()),
        "process_cpu_seconds": round(cpu_used, 2),
        "process_cpu_us_per_request": round(cpu_used / max(requests, 1) * 1e6, 1),
        "parts": {part: {"samples": found["parts"].get(part, 0),
                         "share": round(found["parts"].get(part, 0) / max(working, 1), 4),
                         "us_per_request": round(found["parts"].get(part, 0) / RATE / max(requests, 1) * 1e6, 1)}
                  for part in [*(name for name, _ in RULES), OTHER]},
        "idle": dict(found["idle"]),
        "other_leaves": found["other_leaves"],
        "top_leaves": found["top_leaves"],
        "unprofiled": plain,
    }
    step(f"{name}: {loaded['rps']:.0f} req/s, {working} working samples, {result['idle_samples']} idle, "
         f"py-spy errors {result['py_spy']['errors']}")
    return result


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    webhook, bare = runs["webhook"], runs.get("bare")
    mode = " --gil (samples of the thread holding the GIL only)" if result["gil"] else ""
    mode = ("" if result["blocking"] else " --nonblocking") + mode
    auth = ", webhook auth on (token + allow-list)" if result["auth"] else ", no webhook auth configured (as bench.run)"
    lines = [f"broker {result['broker']}, {result['seconds']} s under py-spy --rate {RATE}{mode}{auth}, "
             f"{webhook['workers']} gunicorn workers (Procfile web line), log level {result['log_level']}"]
    for name, run in runs.items():
        lines.append(f"  {name}: {run['app']}, {run['load']['rps']:.0f} req/s ({run['load']['tool']}), "
                     f"{run['working_samples']} working samples + {run['idle_samples']} idle (excluded), "
                     f"py-spy samples {run['py_spy']['samples']}, errors {run['py_spy']['errors']}; worker processes' "
                     f"CPU (utime+stime) {run['process_cpu_us_per_request']:.0f} us/req")
    header = f"{'part (inclusive)':82s} {'webhook':>8s} {'us/req':>7s}"
    if bare:
        header += f" {'bare':>8s} {'us/req':>7s} {'diff us/req':>11s}"
    lines += ["", header, "-" * len(header)]
    for part, figures in webhook["parts"].items():
        row = f"{part:82s} {figures['share'] * 100:7.1f}% {figures['us_per_request']:7.0f}"
        if bare:
            other = bare["parts"][part]
            row += (f" {other['share'] * 100:7.1f}% {other['us_per_request']:7.0f} "
                    f"{figures['us_per_request'] - other['us_per_request']:11.0f}")
        lines.append(row)
    total = sum(f["us_per_request"] for f in webhook["parts"].values())
    row = f"{'total (working samples)':82s} {100.0:7.1f}% {total:7.0f}"
    if bare:
        bare_total = sum(f["us_per_request"] for f in bare["parts"].values())
        row += f" {100.0:7.1f}% {bare_total:7.0f} {total - bare_total:11.0f}"
    lines += ["-" * len(header), row]
    if all(run.get("unprofiled") for run in runs.values()):
        lines += ["", f"unprofiled ({result['plain_seconds']} s of the same load, no py-spy attached): CPU per request "
                      "and what the Python samples above leave unexplained"]
        for name, run in runs.items():
            plain = run["unprofiled"]
            python = sum(f["us_per_request"] for f in run["parts"].values())
            lines.append(f"  {name}: {plain['load']['rps']:.0f} req/s, {plain['cpu_us_per_request']:.0f} us/req "
                         f"(user {plain['user_us_per_request']:.0f}, kernel {plain['system_us_per_request']:.0f}); "
                         f"Python samples {python:.0f}, the rest {plain['cpu_us_per_request'] - python:.0f}; "
                         f"context switches/req {plain['voluntary_switches_per_request']:.2f} voluntary, "
                         f"{plain['involuntary_switches_per_request']:.2f} involuntary")
        if bare:
            ratio = bare["unprofiled"]["cpu_us_per_request"] / webhook["unprofiled"]["cpu_us_per_request"]
            lines.append(f"  bare / webhook CPU per request: {ratio:.3f}")
    lines += ["", "idle samples, excluded above:"]
    for name, run in runs.items():
        for what, count in sorted(run["idle"].items()):
            lines.append(f"  {name}: {what}: {count}")
    for name, run in runs.items():
        if run["other_leaves"]:
            lines.append(f"{name}: leaf frames of 'other': " + "; ".join(f"{leaf} x{n}" for leaf, n in
                                                                       run["other_leaves"][:5]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy samples each server")
    parser.add_argument("--no-bare", action="store_true", help="profile the webhook only, not bench/bare.py's endpoint")
    parser.add_argument("--log-level", default="INFO",
                        help="the service's LOG_LEVEL (INFO, as shipped: one line a webhook)")
    parser.add_argument("--fallback-rate", type=float, default=800.0,
                        help="req/s of bench.loadgen's open loop when wrk is not installed")
    parser.add_argument("--gil", action="store_true",
                        help="py-spy --gil: only samples of the thread holding the GIL (the Python CPU), not the "
                             "threads waiting on a socket or for the GIL")
    parser.add_argument("--blocking", action="store_true",
                        help="without py-spy's --nonblocking (pauses the workers to sample: no sampling errors)")
    parser.add_argument("--auth", action="store_true",
                        help="configure the webhook's checks (WEBHOOK_TOKENS, WEBHOOK_ALLOWED_IPS=127.0.0.1/32) and "
                             "send the token on every request")
    parser.add_argument("--attempts", type=int, default=3,
                        help="profile a server again (a fresh gunicorn) when a py-spy crashed, up to this many times")
    parser.add_argument("--plain-seconds", type=int, default=10,
                        help="before py-spy, this many seconds of the same load unprofiled: CPU per request, user and "
                             "kernel apart, and context switches (0: skip; needs wrk)")
    parser.add_argument("--out", type=Path, help="write the result here (bench.run.write_result, kind ack-profile)")
    args = parser.parse_args()

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # through every finally below: processes and folders cleaned up

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)
    if not shutil.which("wrk"):
        step(f"wrk is not installed: bench.loadgen's open loop at {args.fallback_rate:g} req/s instead")
    idle = idle_rules()
    workdir = Path(tempfile.mkdtemp(prefix="voice-ack-profile-"))
    redis_server: RedisServer | None = None
    procs: Processes | None = None
    try:
        redis_server = RedisServer(workdir / "redis").start()
        metrics_dir = workdir / "metrics"
        metrics_dir.mkdir()
        env = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir / 'voice.db'}", "REDIS_URL": redis_server.url,
               "LOG_FORMAT": "json", "LOG_LEVEL": args.log_level, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
               "API_KEYS": "bench"}
        env.pop("CELERY_BROKER_URL", None)
        if args.auth:
            env.update(WEBHOOK_TOKENS=AUTH_TOKEN, WEBHOOK_ALLOWED_IPS="127.0.0.1/32")
        query = f"?token={AUTH_TOKEN}" if args.auth else ""
        procs = Processes(workdir, env)
        with contextlib.ExitStack() as resources:
            if args.broker == "rabbitmq":
                step("a virtual host of its own on the machine's RabbitMQ")
                procs.env["CELERY_BROKER_URL"] = resources.enter_context(rabbitmq_vhost())
                step(f"virtual host {procs.env['CELERY_BROKER_URL'].rsplit('/', 1)[1]} (deleted at the end)")
            servers = [("webhook", "wsgi:app")] + ([] if args.no_bare else [("bare", "bench.bare:app")])
            runs = {}
            for name, app in servers:
                step(f"{name} ({app}), broker {args.broker}")
                for attempt in range(1, args.attempts + 1):
                    try:
                        runs[name] = profile_server(procs, workdir, name, app, args.seconds, args.fallback_rate,
                                                    idle, args.gil, args.blocking, query, args.plain_seconds)
                        runs[name]["attempt"] = attempt
                        break
                    except PySpyFailed as error:
                        step(f"{name}: attempt {attempt} of {args.attempts}: {str(error).splitlines()[0]}")
                        if attempt == args.attempts:
                            raise
    finally:
        if procs is not None:
            procs.stop_all()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"broker": args.broker, "seconds": args.seconds, "plain_seconds": args.plain_seconds, "rate": RATE,
              "gil": args.gil,
              "blocking": args.blocking, "auth": args.auth,
              "log_level": args.log_level,
              "rules": [[part, list(needles)] for part, needles in RULES],
              "idle_rules": [[what, suffix] for what, suffix in idle], "runs": runs}
    if "bare" in runs:
        webhook, bare = runs["webhook"]["parts"], runs["bare"]["parts"]
        result["difference_us_per_request"] = {
            part: round(webhook[part]["us_per_request"] - bare[part]["us_per_request"], 1) for part in webhook}
    print(table(result))
    if args.out:
        write_result(args.out, "ack-profile",
                     shlex.join([".venv/bin/python", "-m", "bench.profile_ack_gunicorn", *sys.argv[1:]]), result)
        step(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
