"""A RabbitMQ node of the test's own, beside the machine's shared one (which is never touched).

It has its own node name, AMQP and distribution ports (free ones), Mnesia and log folders, an
empty plugin list (no management listener to collide with the shared node's) and a config that
names only its own listener (the machine's /etc/rabbitmq/rabbitmq.conf would bind 5672). As root
it runs as the ``rabbitmq`` user, in a folder that user owns. Stopping it (SIGTERM) is RabbitMQ's
graceful shutdown; starting it again on the same folders recovers durable queues and their
persistent messages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import kombu

from tests.support import free_port, group_members, made, stop_group, wait_for

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class RabbitNode:
    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"voicetest-{uuid.uuid4().hex[:8]}@localhost"
        # Outside pytest's tmp_path (the rabbitmq user must reach it): recorded, so that the
        # session's end reports it if ``remove`` never ran.
        self.workdir = Path(made("folder", tempfile.mkdtemp(prefix="voice-rabbitmq-")))
        self.process: subprocess.Popen[bytes] | None = None
        (self.workdir / "mnesia").mkdir()
        (self.workdir / "log").mkdir()
        (self.workdir / "home").mkdir()
        (self.workdir / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            for path in [self.workdir, *self.workdir.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            "HOME": str(self.workdir / "home"),  # an Erlang cookie of its own
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 90) -> float:
        """Start the node and wait until it takes AMQP connections; returns how long that took."""
        started = time.monotonic()
        argv = (["runuser", "-u", "rabbitmq", "--"] if self.as_root else []) + [SERVER]
        log = open(self.workdir / "server.out", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_for(self._answers, timeout=timeout, interval=0.3)
        return time.monotonic() - started

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited: {self.log()[-2000:]}")
        with kombu.Connection(self.url, connect_timeout=1) as connection:
            connection.ensure_connection(max_retries=1)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """SIGTERM: RabbitMQ's graceful shutdown (SIGKILL after ``timeout``), until nothing of its
        process group is left alive (beam is a grandchild; an exited one the suite adopted stays a
        zombie, which holds nothing)."""
        if self.process is None or (self.process.poll() is not None and not group_members(self.process.pid)):
            return
        stop_group(self.process, sig, timeout)

    def log(self) -> str:
        path = self.workdir / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(signal.SIGKILL, timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
