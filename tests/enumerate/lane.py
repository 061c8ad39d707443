"""A lane: one complete service of its own that runs one path's fault runs one after another.

A redis-server, a PostgreSQL database (a copy of a migrated template), a RabbitMQ vhost when the
path is on RabbitMQ, gunicorn with one process and one thread, one solo ``python -m worker`` and
``celery -A worker beat``, all from the service checkout under test (``service_root``). Lanes share
nothing, so several run side by side: a run's recovery waits (the sweeper, the Redis transport's
visibility timeout) overlap instead of adding up.

The harness process never imports the service's code (``app``, ``config``): it may be another
checkout's. It speaks to the service only as a client: HTTP, redis-py, psycopg, py-amqp and the
``flask voice`` commands.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import amqp
import psycopg
import redis

from tests.support import PG_ADMIN_DSN, RedisServer, free_port, made, spawn, stop_group, wait_for

INJECT = Path(__file__).resolve().parent / "inject"
BIN = Path(sys.executable).parent
WEBHOOK = "/api/v1/voice/webhook"
FORM = "application/x-www-form-urlencoded"
API_KEY = "enum-api-key"
HOOK_TASK = "enum.recording_ready"
HOOK_QUEUE = "enum-hooks"  # nobody consumes it: the checks read what the relay sent
SERVICE_QUEUES = ("voice-webhooks", "voice-replays")
# The sweeper runs every max(5, PENDING_REDELIVERY_SECONDS / 4) s; 5 is the smallest age allowed.
REDELIVERY_SECONDS = 5
READY_TIMEOUT = 60.0
STUCK_LOG_TAIL = 10000  # characters of a stuck process's log in a harness error
STACKS_CHARS = 12000  # characters of each of its stack dumps


def pg_dsn(database: str) -> str:
    return f"host=127.0.0.1 port=5432 user=postgres dbname={database}"


def create_template(service_root: Path, workdir: Path) -> str:
    """A database migrated by the service's own release step; lanes copy it (CREATE DATABASE ...
    TEMPLATE takes a fraction of a second, a migration several)."""
    name = made("database", f"voice_enum_tmpl_{secrets.token_hex(5)}")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    redis_dir = workdir / "template-redis"
    server = RedisServer(redis_dir).start()  # create_app wants a Redis URL; migrations never use it
    try:
        env = {**os.environ, "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
               "REDIS_URL": server.url, "PYTHONPATH": str(service_root)}
        subprocess.run([str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], cwd=service_root, env=env,
                       check=True, capture_output=True, timeout=180)
    finally:
        server.stop()
    return name


def copy_database(template: str, prefix: str = "voice_enum") -> str:
    name = made("database", f"{prefix}_{secrets.token_hex(5)}")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class LaneSpec:
    """How a path's lanes run the service."""

    broker: str = "redis"  # or "rabbitmq"
    env: dict[str, str] = field(default_factory=dict)  # extra settings (EVENT_MAX_RETRIES, ...)
    beat: bool = True  # beat runs all the time (else the path starts it to settle, see Lane.settling)


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (the web process died, or the connection was refused)
    body: bytes = b""


class Lane:
    """One service of its own; see the module's docstring."""

    def __init__(self, name: str, workdir: Path, service_root: Path, database: str, spec: LaneSpec,
                 broker_url: str | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.service_root = service_root
        self.database = database
        self.spec = spec
        self.broker_url = broker_url
        self.plans = workdir / "plans"
        self.redis = RedisServer(workdir / "redis")
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.hostname = f"enum-{name}-{self.port}"
        self._warm = 0
        self.exits: list[str] = []  # processes under test that exited on their own
        self._client: redis.Redis | None = None

    # --- environment ------------------------------------------------------------------------

    def env(self, role: str | None = None, plan: dict[str, Any] | None = None) -> dict[str, str]:
        """The service's settings; with ``role``, the interceptor first on the path (inert
        without a plan for a web or worker, armed from the start for a command)."""
        env = {key: value for key, value in os.environ.items()
               if key not in {"PROMETHEUS_MULTIPROC_DIR", "CELERY_BROKER_URL", "VOICE_ENUM", "PYTHONPATH"}}
        env.update({
            "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}",
            "REDIS_URL": self.redis.url,
            "API_KEYS": API_KEY,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "1",
            "WEB_THREADS": "1",
            "WORKER_METRICS_PORT": "0",
            "PENDING_REDELIVERY_SECONDS": str(REDELIVERY_SECONDS),
            "VOICE_HOOK_TASK": HOOK_TASK,
            "VOICE_HOOK_QUEUE": HOOK_QUEUE,
            "PYTHONPATH": str(self.service_root),
            "PYTHONDONTWRITEBYTECODE": "1",
            **self.spec.env,
        })
        if self.broker_url:
            env["CELERY_BROKER_URL"] = self.broker_url
        if role is not None:
            env["PYTHONPATH"] = f"{INJECT}{os.pathsep}{self.service_root}"
            config: dict[str, Any] = {"role": role, "dir": str(self.plans)}
            if plan is not None:
                config["plan"] = plan
            env["VOICE_ENUM"] = json.dumps(config)
        return env

    # --- processes --------------------------------------------------------------------------

    def start(self) -> Lane:
        """Every process started, the worker warmed up (its connections open, its first event
        applied), so that every armed path meets the same warm process."""
        self.plans.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        if self.broker_url:
            self._declare_hook_queue()
        self.start_web(wait=False)
        self.start_worker(wait=False)
        if self.spec.beat:
            self.start_beat()
        self.wait_web()
        self.warm_up()
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.processes[name] = spawn(argv, log=self.workdir / f"{name}.log", cwd=self.service_root, env=env)

    def start_web(self, wait: bool = True) -> None:
        self._spawn("web", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], self.env("web"))
        if wait:
            self.wait_web()

    def wait_web(self) -> None:
        def up() -> bool:
            self._alive("web")
            return self.request("GET", "/healthz").status == 200

        wait_for(up, timeout=READY_TIMEOUT, interval=0.1)

    def start_worker(self, wait: bool = True) -> None:
        self._spawn("worker", [
            sys.executable, "-m", "worker", "--pool=solo", "--loglevel=INFO",
            "--queues=voice-webhooks,voice-replays,voice-maintenance", "--without-gossip", "--without-mingle",
            f"--hostname={self.hostname}@%h"], self.env("worker"))
        if wait:
            self.warm_up()

    def start_beat(self) -> None:
        if "beat" in self.processes:
            return
        schedule = self.workdir / "celerybeat-schedule"
        for stale in self.workdir.glob("celerybeat-schedule*"):
            stale.unlink()
        self._spawn("beat", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                             f"--schedule={schedule}"], self.env())

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            stop_group(process, sig, timeout=20)

    def worker_died(self) -> bool:
        process = self.processes.get("worker")
        return process is None or process.poll() is not None

    def restart_worker_if_dead(self) -> bool:
        """Restart what died: the worker (a killed web is replaced by gunicorn's master itself).
        A worker that exited on its own (not by the SIGKILL a fault sends) is noted in ``exits``."""
        process = self.processes.get("worker")
        if process is None or process.poll() is None:
            return False
        if process.returncode != -signal.SIGKILL:
            self.exits.append(f"worker exited with {process.returncode}: {self._last_error('worker')}")
        self.stop_process("worker", signal.SIGKILL)  # its group, if anything of it is left
        self.start_worker()
        return True

    def _last_error(self, name: str) -> str:
        for line in reversed(self.log(name).splitlines()):
            if '"level": "critical"' in line or "Unrecoverable" in line or "Error" in line:
                try:
                    return str(json.loads(line).get("event"))[:200]
                except ValueError:
                    return line[:200]
        return "no error logged"

    def _alive(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} of lane {self.name} exited with {process.returncode}:\n"
                               f"{self.log(name)[-3000:]}")

    def warm_up(self) -> None:
        """An unarmed event with a recording URL through web, worker and hook relay."""
        self._warm += 1
        session = f"warm-{self.name}-{self._warm}-{secrets.token_hex(3)}"
        fields = {"sessionId": session, "phoneNumber": "+254700000001", "status": "completed",
                  "duration": "1", "recordingUrl": f"https://voice.africastalking.com/recordings/{session}.mp3"}
        deadline = time.monotonic() + READY_TIMEOUT
        while self.post(fields).status != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lane {self.name}: the web never took the warm-up event")
            time.sleep(0.2)

        def applied() -> bool:
            self._alive("worker")
            return bool(self.query("SELECT 1 FROM webhook_events WHERE recording_id = %s", session))

        try:
            wait_for(applied, timeout=READY_TIMEOUT, interval=0.1)
        except TimeoutError:
            log_tail = self.log("worker")[-STUCK_LOG_TAIL:]  # before the stacks are appended to it
            raise TimeoutError(f"lane {self.name}: the worker never applied the warm-up event "
                               f"{session} within {READY_TIMEOUT:.0f} s; the worker's log:\n{log_tail}\n"
                               f"{self.stacks('worker')}") from None

    def stacks(self, name: str) -> str:
        """Where every thread of a live process is, for a harness error: Celery's own SIGUSR1
        handler (a worker's threads by name, with their locals), the interceptor's faulthandler on
        SIGUSR2 (written from C, so it answers even while the main thread is stuck where Python
        cannot run a signal handler) and ``py-spy dump`` where it is installed."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return f"(no stacks: {name} is not running)"
        parts = []
        for sig, what in ((signal.SIGUSR1, "Celery's SIGUSR1 handler"), (signal.SIGUSR2, "faulthandler on SIGUSR2")):
            if not _catches(process.pid, sig):  # its default action would end the process
                parts.append(f"--- {what}: not installed in pid {process.pid}")
                continue
            parts.append(f"--- {what} (pid {process.pid}):\n{self._log_growth(name, process, sig)}")
        spy = shutil.which("py-spy") or str(BIN / "py-spy")
        if os.path.exists(spy):
            try:
                dumped = subprocess.run([spy, "dump", "--locals", "--pid", str(process.pid)], capture_output=True,
                                        text=True, timeout=30)
                dump = (dumped.stdout + dumped.stderr)[:STACKS_CHARS]
                parts.append(f"--- py-spy dump (pid {process.pid}):\n{dump}")
            except (OSError, subprocess.SubprocessError) as exc:
                parts.append(f"--- py-spy dump failed: {exc!r}")
        return "\n".join(parts)

    def _log_growth(self, name: str, process: subprocess.Popen[bytes], sig: int) -> str:
        """What the process writes to its log after ``sig``: until it stops growing (or 5 s)."""
        path = self.workdir / f"{name}.log"
        start = path.stat().st_size if path.exists() else 0
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            return "(the process is gone)"
        deadline = time.monotonic() + 5
        size, still = start, 0
        while time.monotonic() < deadline and still < 5:  # 0.5 s without growth once it grew
            time.sleep(0.1)
            now = path.stat().st_size if path.exists() else 0
            still = still + 1 if now == size and now > start else 0
            size = now
        with open(path, "rb") as handle:
            handle.seek(start)
            text = handle.read().decode(errors="replace")
        if not text:
            return "(nothing written: the main thread never ran the handler)" if sig == signal.SIGUSR1 else "(nothing)"
        return text[:STACKS_CHARS]

    def stop(self) -> None:
        with contextlib.ExitStack() as stops:
            stops.callback(self.redis.stop)
            if self._client is not None:
                stops.callback(self._client.close)
            for name in list(self.processes):
                stops.callback(self.stop_process, name)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- commands ---------------------------------------------------------------------------

    def flask(self, *args: str, plan: dict[str, Any] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """``flask voice ...`` as an operator runs it; with ``plan``, the process under test."""
        return subprocess.run([str(BIN / "flask"), "--app", "wsgi", *args], cwd=self.service_root,
                              env=self.env("cli", plan) if plan is not None else self.env(),
                              capture_output=True, text=True, timeout=timeout)

    # --- HTTP -------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Answer(response.status, response.read())
        except (OSError, http.client.HTTPException):
            return Answer(0)
        finally:
            conn.close()

    def post(self, fields: dict[str, str], marker: str | None = None) -> Answer:
        headers = {"Content-Type": FORM}
        if marker:
            headers["X-Enum-Marker"] = marker
        return self.request("POST", WEBHOOK, urlencode(fields).encode(), headers)

    def post_like_at(self, fields: dict[str, str], marker: str, timeout: float = 60) -> list[int]:
        """Africa's Talking: a callback not answered 200 is sent again until it is."""
        answers = []
        deadline = time.monotonic() + timeout
        while True:
            status = self.post(fields, marker).status
            answers.append(status)
            if status == 200 or time.monotonic() > deadline:
                return answers
            time.sleep(0.3)

    def recording(self, session: str) -> dict[str, Any] | None:
        """The recording as the read API shows it (what the ready hook carries)."""
        answer = self.request("GET", f"/api/v1/voice/recordings/{session}",
                              headers={"Authorization": f"Bearer {API_KEY}"})
        return json.loads(answer.body) if answer.status == 200 else None

    # --- reading state ----------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        return self._client

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_dsn(self.database), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def amqp_channel(self) -> Iterator[Any]:
        assert self.broker_url is not None
        vhost = self.broker_url.rsplit("/", 1)[1]
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", virtual_host=vhost,
                               connect_timeout=5)
        conn.connect()
        try:
            yield conn.channel()
        finally:
            conn.close()

    def _declare_hook_queue(self) -> None:
        """Declared as Celery declares it, so that a hook relayed before any consumer lands."""
        with self.amqp_channel() as channel:
            channel.queue_declare(HOOK_QUEUE, durable=True, auto_delete=False)

    def hook_messages(self) -> list[dict[str, Any]]:
        """Every ready-hook task message sent so far, oldest first: ``{"id", "recording"}``."""
        found = []
        if self.broker_url is None:
            # kombu pushes at the head and consumers take from the tail: the tail is the oldest.
            for raw in reversed(self.client.lrange(HOOK_QUEUE, 0, -1)):
                message = json.loads(raw)
                body = json.loads(_b64(message["body"]))
                found.append({"id": message["headers"]["id"], "recording": body[0][0]})
            return found
        with self.amqp_channel() as channel:
            while (message := channel.basic_get(HOOK_QUEUE, no_ack=False)) is not None:
                body = json.loads(message.body)
                found.append({"id": message.headers["id"], "recording": body[0][0]})
            # not acknowledged: they go back to the queue, in order, when the channel closes
        return found

    def broker_idle(self) -> bool:
        """No event task queued, taken or waiting for its countdown anywhere in the broker."""
        if self.broker_url is None:
            if any(self.client.llen(queue) for queue in SERVICE_QUEUES):
                return False
            for raw in self.client.hvals("unacked"):
                with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                    if json.loads(raw)[0]["headers"].get("task") == "voice.sweep_pending":
                        continue
                return False
            return True
        with self.amqp_channel() as channel:
            for queue in SERVICE_QUEUES:
                try:
                    _name, ready, _consumers = channel.queue_declare(queue, passive=True)
                except amqp.exceptions.NotFound:
                    return True  # declared by the worker when it starts; nothing was ever queued
                if ready:
                    return False
        # Ready messages are not all: a message taken (and held for its retry's countdown) is
        # unacknowledged, which only the server's own count shows.
        vhost = self.broker_url.rsplit("/", 1)[1]
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        listed = subprocess.run([ctl, "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages"],
                                capture_output=True, text=True, timeout=60)
        if listed.returncode != 0:
            return False  # not known to be idle
        counts = dict(line.split()[:2] for line in listed.stdout.splitlines() if len(line.split()) >= 2)
        return all(int(counts.get(queue, "0")) == 0 for queue in SERVICE_QUEUES)


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` (``SigCgt`` in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _b64(text: str) -> bytes:
    return base64.b64decode(text)
