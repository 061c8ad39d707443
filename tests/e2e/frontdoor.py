"""Debian's nginx with deploy/nginx/voice-webhooks.conf in front of a stack, and slow clients.

nginx runs from a folder of its own (prefix, pid, temp folders, logs) on a free port, never as the
system's service. ``python -m tests.e2e.frontdoor`` measures the same slow-client load against
gunicorn directly and through nginx, and prints both.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from tests.support import ROOT, free_port, wait_for

SITE = ROOT / "deploy" / "nginx" / "voice-webhooks.conf"


def site_config(upstream_port: int, listen_port: int) -> str:
    """The shipped site file with only its two addresses changed (upstream and listen port)."""
    text = SITE.read_text()
    for old, new in (("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
                     ("listen 80;", f"listen 127.0.0.1:{listen_port};")):
        assert old in text, old
        text = text.replace(old, new)
    return text


class Nginx:
    def __init__(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise FileNotFoundError("nginx is missing: scripts/test.sh installs Debian's nginx-light package")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "voice-webhooks.conf").write_text(site_config(self.upstream_port, self.port))
        temp = "\n".join(f"  {kind}_temp_path {self.workdir / kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, nginx's workers would switch to nobody, who cannot enter the test's folder.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (self.workdir / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'} warn;\nevents {{ worker_connections 2048; }}\n"
            f"http {{\n  access_log off;\n{temp}\n  include {self.workdir / 'voice-webhooks.conf'};\n}}\n")
        self.process = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"), "-e",
             str(self.workdir / "error.log")],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115
            start_new_session=True)
        wait_for(lambda: get(self.port, "/healthz")[0] == 200, timeout=20, interval=0.1)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_webhook(port: int, session_id: str, timeout: float = 10,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/api/v1/voice/webhook", urlencode({"sessionId": session_id, "status": "busy"}),
                     {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class SlowClients:
    """``count`` connections that each send a request line, then one header line every ``every``
    seconds and never finish; a connection the server closes is opened again."""

    def __init__(self, port: int, count: int = 200, every: float = 2.0) -> None:
        self.port, self.count, self.every = port, count, every
        self.sockets: list[socket.socket | None] = [None] * count
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.reconnects = 0
        self.open_at_peak = 0

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(b"POST /api/v1/voice/webhook HTTP/1.1\r\nHost: voice\r\n")
            return sock
        except OSError:
            return None

    def _run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            for i in range(self.count):
                sock = self.sockets[i]
                if sock is not None:
                    try:
                        if not _closed_by_server(sock):
                            sock.sendall(f"X-Slow-{n}: {'a' * 20}\r\n".encode())
                            continue
                    except OSError:
                        pass
                    sock.close()  # the server gave up on it (an answer, or the end): a real attacker reconnects
                    self.reconnects += 1
                self.sockets[i] = self._open()
            self.open_at_peak = max(self.open_at_peak, sum(s is not None for s in self.sockets))
            n += 1
            self.stopped.wait(self.every)

    def __enter__(self) -> SlowClients:
        for i in range(self.count):
            self.sockets[i] = self._open()
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)
        for sock in self.sockets:
            if sock is not None:
                sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
    """The server answered (a 408) or closed: anything readable on a request never finished."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


@dataclass
class Probe:
    """Requests an ordinary client makes while the slow ones hold their connections; client-timed."""

    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    def timed(self, call: Callable[[], tuple[int, bytes]]) -> None:
        started = time.perf_counter()
        try:
            status, _ = call()
            if status != 200:
                self.failures += 1
        except (OSError, http.client.HTTPException):
            self.failures += 1
        self.seconds.append(time.perf_counter() - started)

    def summary(self) -> str:
        if not self.seconds:
            return "no requests"
        return (f"{len(self.seconds)} requests, {self.failures} failed or timed out; "
                f"median {statistics.median(self.seconds):.3f} s, max {max(self.seconds):.3f} s")


def probe_under_slow_clients(port: int, connections: int, seconds: float, timeout: float,
                             prefix: str) -> tuple[Probe, Probe, SlowClients]:
    """/healthz and a webhook, one of each every half second for ``seconds``, with the slow clients on."""
    health, webhook = Probe(), Probe()
    with SlowClients(port, connections) as slow:
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            health.timed(lambda: get(port, "/healthz", timeout=timeout))
            webhook.timed(lambda n=n: post_webhook(port, f"{prefix}_{n}", timeout=timeout))
            n += 1
            time.sleep(0.5)  # pacing of an ordinary client, not a wait for a condition
    return health, webhook, slow


def main() -> None:
    """Slow clients against gunicorn directly, then through nginx; prints what an ordinary client saw."""
    import argparse
    import tempfile

    from tests.e2e.stack import Stack

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--timeout", type=float, default=10, help="an ordinary client's timeout per request")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="voice-frontdoor-"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}", TRUSTED_PROXY_COUNT="1")
    nginx = Nginx(workdir / "nginx", stack.port)
    try:
        stack.start()
        nginx.start()
        for name, port in (("gunicorn directly", stack.port), ("through nginx", nginx.port)):
            health, webhook, slow = probe_under_slow_clients(port, args.connections, args.seconds, args.timeout,
                                                             f"frontdoor_{name[:4]}_{time.time_ns()}")
            print(f"{name}: {args.connections} slow connections (a header line every 2 s) for {args.seconds:g} s, "
                  f"{slow.reconnects} reconnects after the server closed them")
            print(f"  /healthz: {health.summary()}")
            print(f"  webhook:  {webhook.summary()}")
            # gunicorn needs its threads back before the next measurement
            wait_for(lambda port=port: get(port, "/healthz", timeout=2)[0] == 200, timeout=60, interval=0.5)
    finally:
        nginx.stop()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
