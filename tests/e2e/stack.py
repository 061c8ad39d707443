"""A running service for end-to-end tests: its own redis-server, migrations, gunicorn, Celery workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis

from tests.support import ROOT, RedisServer, free_port, queued_on_rabbitmq, spawn, stop_group, wait_for

API_KEY = "e2e-api-key"
BIN = Path(sys.executable).parent


def procfile_line(name: str) -> str:
    """The Procfile's command for the process type ``name``."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    raise KeyError(name)


def worker_line(*options: str) -> list[str]:
    """The Procfile's worker line as honcho runs it (``sh -c``), with ``options`` added to the
    worker's own (a later one wins over the line's, as --hostname does)."""
    return ["sh", "-c", procfile_line("worker") + ' "$@"', "worker", *options]


def start_formation(argvs: list[list[str]], log: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """Start each command as a process of one new process group (the first one's), writing to
    ``log``: a formation that ``stop_group`` on the first stops whole. The group is made in this
    process's session, since a process can only join a group of its own session."""
    started: list[subprocess.Popen[bytes]] = []
    with open(log, "ab") as output:
        try:
            for argv in argvs:
                started.append(subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                                process_group=started[0].pid if started else 0))
        except BaseException:
            for process in started:
                process.kill()
                process.wait(timeout=10)
            raise
    return started


class Stack:
    """web + worker processes, started from the Procfile's commands with a test's settings."""

    # How long a process may take to be ready, on a machine whose cores other work keeps busy.
    READY_TIMEOUT = 60

    def __init__(self, workdir: Path, database_url: str, worker_concurrency: int = 2, workers: int = 1,
                 beat: bool = False, persistent_redis: bool = False, redis_url: str | None = None,
                 **env: str) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", persistent=persistent_redis)
        # A Redis the test runs itself (e.g. a Sentinel group): then self.redis is not started.
        self.own_redis = redis_url is None
        self.redis_url = redis_url or self.redis.url
        self.port = free_port()
        self.database_url = database_url
        self.worker_concurrency = worker_concurrency
        self.worker_names = ["worker"] + [f"worker{n}" for n in range(2, workers + 1)]
        self.beat = beat
        self.extra_env = env
        self.metrics_port = free_port()
        # name -> the process whose group it is (a worker formation's first process); every
        # process of each name, for those that start several (a worker formation)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.members: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._log_offsets: dict[str, int] = {}

    def env(self) -> dict[str, str]:
        metrics_dir = self.workdir / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "API_KEYS": API_KEY,
            "LOG_FORMAT": "json",
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "2",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "WORKER_METRICS_PORT": str(self.metrics_port),
            **self.extra_env,
        }

    def start(self) -> Stack:
        """Every process started and ready: the web answers /readyz, each worker has said it is
        ready (it consumes its queues), beat has started its schedule."""
        if self.own_redis:
            self.redis.start()
        subprocess.run([str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=self.env(), check=True,
                       capture_output=True, timeout=120)
        self.start_web(wait=False)
        for name in self.worker_names:
            self.start_worker(name, wait=False)
        if self.beat:
            self.start_beat(wait=False)
        wait_for(lambda: self.get("/readyz")[0] == 200, timeout=self.READY_TIMEOUT)
        for name in self.processes:
            self.wait_ready(name)
        return self

    def _ready(self, name: str, since: int) -> bool:
        """Whether a process is ready, from what it logged since it was started. A worker says
        "<hostname> ready." only once its consumer is connected, so a task sent after it is taken."""
        if name == "web":
            return self.get("/healthz")[0] == 200
        text = self.log(name)[since:]
        if name == "beat":
            return "beat: Starting..." in text
        ready = {line.split("@", 1)[0].rsplit(" ", 1)[-1] for line in text.splitlines()
                 if f"{name}-{self.port}-" in line and " ready." in line}
        return len(ready) >= self.worker_concurrency  # every process of the line

    def wait_ready(self, name: str) -> None:
        """Until the process ``name`` (each of a formation's) is ready since it was last started."""
        members, since = self.members[name], self._log_offsets[name]

        def exited() -> list[int | None]:
            return [process.returncode for process in members if process.poll() is not None]

        try:
            wait_for(lambda: exited() or self._ready(name, since), timeout=self.READY_TIMEOUT, interval=0.1)
        except TimeoutError as error:
            raise TimeoutError(f"{name} not ready ({error}):\n{self.log(name)[since:][-3000:]}") from None
        if exited():
            raise RuntimeError(f"{name} exited with {exited()}:\n{self.log(name)[since:][-3000:]}")

    def _spawn(self, name: str, argv: list[str], wait: bool = False, **env: str) -> None:
        self._log_offsets[name] = len(self.log(name))  # a restarted process appends to its log
        self.processes[name] = spawn(argv, log=self.workdir / f"{name}.log", cwd=ROOT, env={**self.env(), **env})
        self.members[name] = [self.processes[name]]
        if wait:
            self.wait_ready(name)

    def role_metrics_dir(self, role: str) -> str:
        """Each role's own multiprocess folder, as the Procfile gives it: every series served once."""
        folder = Path(self.env()["PROMETHEUS_MULTIPROC_DIR"]) / role
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def start_web(self, wait: bool = True) -> None:
        self._spawn("web", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], wait,
                    PROMETHEUS_MULTIPROC_DIR=self.role_metrics_dir("web"))

    def start_worker(self, name: str = "worker", wait: bool = True) -> None:
        """The worker formation as honcho starts it (``-c worker=N``): ``worker_concurrency`` copies
        of the Procfile's one-process worker line, side by side, all in one process group (so that
        stopping, killing or pausing the group reaches every one), each with a node name of its own."""
        self._log_offsets[name] = len(self.log(name))
        argvs = [worker_line("--without-gossip", "--without-mingle", f"--hostname={name}-{self.port}-{i}@%h")
                 for i in range(self.worker_concurrency)]
        self.members[name] = start_formation(argvs, self.workdir / f"{name}.log",
                                             {**self.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
        self.processes[name] = self.members[name][0]
        if wait:
            self.wait_ready(name)

    def start_beat(self, wait: bool = True) -> None:
        self._spawn("beat", [str(BIN / "celery"), "-A", "worker", "beat", "--loglevel=INFO",
                             f"--schedule={self.workdir / 'celerybeat-schedule'}"], wait)

    def flask(self, *args: str) -> str:
        """Run a ``flask voice ...`` command against this stack; returns what it printed."""
        done = subprocess.run([str(BIN / "flask"), "--app", "wsgi", *args], cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"flask {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the process's whole group and wait until every process of it is gone (SIGKILL
        after ``timeout``)."""
        process = self.processes.pop(name, None)
        if process is not None:
            stop_group(process, sig, timeout)
        for member in self.members.pop(name, []):
            member.wait(timeout=10)  # gone with the group: reaped here

    def stop(self) -> None:
        """Every process and the Redis server, each also when stopping another one failed."""
        with contextlib.ExitStack() as stops:
            if self.own_redis:
                stops.callback(self.redis.stop)
            for name in list(self.processes):
                stops.callback(self.stop_process, name)

    def kill(self, name: str) -> None:
        """SIGKILL a process and its whole group: a crash, with no chance to clean up."""
        self.stop_process(name, signal.SIGKILL)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- HTTP ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post_form(self, fields: dict[str, Any] | str, path: str = "/api/v1/voice/webhook") -> tuple[int, dict]:
        body = fields if isinstance(fields, str) else urlencode(fields)
        status, _, data = self.request("POST", path, body.encode(),
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        return status, json.loads(data)

    def post_json(self, fields: dict[str, Any]) -> tuple[int, dict]:
        status, _, data = self.request("POST", "/api/v1/voice/webhook", json.dumps(fields).encode(),
                                       {"Content-Type": "application/json"})
        return status, json.loads(data)

    def get(self, path: str) -> tuple[int, Any]:
        status, _, data = self.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode()

    def recording(self, session_id: str) -> dict | None:
        status, body = self.get(f"/api/v1/voice/recordings/{session_id}")
        return body if status == 200 else None

    def events(self, session_id: str) -> list[dict]:
        status, body = self.get(f"/api/v1/voice/recordings/{session_id}/events")
        return body["events"] if status == 200 else []

    def wait_for_events(self, session_id: str, count: int, timeout: float = 30) -> list[dict]:
        return wait_for(lambda: len(self.events(session_id)) >= count and self.events(session_id), timeout=timeout)

    def redis_client(self) -> redis.Redis:
        """A client of the Redis the stack's processes use: its own server, or the one it was given
        (a Sentinel group's URL names no server: then its own, unused one, as before)."""
        url = self.redis_url if self.redis_url.startswith("redis://") else self.redis.url
        return redis.Redis.from_url(url)

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Until the queue is drained and nothing is pending (applied or dead-lettered)."""
        client = self.redis_client()

        def idle() -> bool:
            broker_url = self.extra_env.get("CELERY_BROKER_URL")
            if broker_url:  # RabbitMQ: messages ready or taken and not yet acknowledged
                return queued_on_rabbitmq(broker_url) == 0
            return client.llen("voice-webhooks") == 0 and client.zcard("voice:pending:due") == 0

        wait_for(idle, timeout=timeout, interval=0.2)
        client.close()
