"""Replicated Redis for tests: a master with replicas, and a Sentinel group watching them.

Every server is a redis-server of the test's own on a free port, in a folder of its own; the
machine's shared Redis is never touched. ``ReplicatedRedis`` and ``SentinelGroup`` are context
managers that SIGKILL whatever they started, also when the test fails.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.netns import Hosts
from tests.support import free_port, redis_server_binary, wait_for

MASTER_NAME = "voice-master"
# Sentinel's timings, short so that a failover takes seconds: a master that does not answer for
# DOWN_AFTER_MS is subjectively down; with a quorum of sentinels agreeing it is failed over.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 6000


class Node:
    """One redis-server (a master, a replica or a sentinel) that can be killed."""

    def __init__(self, workdir: Path, name: str, *args: str, config: str | None = None, host: str = "127.0.0.1",
                 prefix: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.workdir = workdir / name
        self.name = name
        self.args = args
        self.config = config
        self.host = host  # the address it listens on (and is reached by)
        self.prefix = prefix  # e.g. ``ip netns exec <namespace>``: a server on a host of the test's own
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [*self.prefix, redis_server_binary()]
        if self.config is not None:  # a sentinel: it rewrites its own config file as it learns
            conf = self.workdir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n{self.config}")
            argv += [str(conf), "--sentinel"]
        else:
            # A replica's first sync starts at once (Redis waits 5 s by default for more replicas
            # to share a diskless transfer).
            argv += ["--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                     "--repl-diskless-sync-delay", "0", "--dir", str(self.workdir), *self.args]
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.client().ping, timeout=10)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ReplicatedRedis:
    """A master and ``replicas`` replicas, each replica in sync before the block starts."""

    def __init__(self, workdir: Path, replicas: int = 1, hosts: Hosts | None = None) -> None:
        """With ``hosts``, replica n runs on host n (a network namespace, ``tests.netns``), so its
        link can be cut; master and replicas then give up on a silent link after 2 s."""
        self.monitored_address = "127.0.0.1"
        if hosts is None:
            self.master = Node(workdir, "master")
            self.replicas = [Node(workdir, f"replica{n}", "--replicaof", "127.0.0.1", str(self.master.port))
                             for n in range(1, replicas + 1)]
        else:
            timeouts = ("--repl-ping-replica-period", "1", "--repl-timeout", "2")
            self.master = Node(workdir, "master", "--bind", "127.0.0.1", hosts.shared_address,
                               "--protected-mode", "no", *timeouts)
            self.monitored_address = hosts.shared_address  # one name the replicas and sentinels agree on
            self.replicas = [Node(workdir, f"replica{n}", "--replicaof", hosts.shared_address, str(self.master.port),
                                  "--protected-mode", "no", *timeouts, host=host.address,
                                  prefix=tuple(host.command([])))
                             for n, host in enumerate(hosts.hosts[:replicas], start=1)]
        self.nodes = [self.master, *self.replicas]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master.port}/0"

    def __enter__(self) -> ReplicatedRedis:
        try:
            for node in self.nodes:
                node.start()
            wait_for(lambda: self.connected_replicas() == len(self.replicas), timeout=20)
            # A replica just online may let the first WAIT time out (it is still loading the
            # sync): ready means every replica acknowledges a write.
            wait_for(self._replicas_acknowledge, timeout=20)
        except BaseException:
            self.kill_all()
            raise
        return self

    def _replicas_acknowledge(self) -> bool:
        client = self.master.client()
        client.set("voice:replication-probe", "1")
        acknowledged = client.wait(len(self.replicas), 200) == len(self.replicas)
        client.delete("voice:replication-probe")
        return acknowledged

    def connected_replicas(self) -> int:
        info = self.master.client().info("replication")
        return sum(1 for key, value in info.items()
                   if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


class SentinelGroup(ReplicatedRedis):
    """A master, replicas, and ``sentinels`` sentinels (quorum: a majority) watching them."""

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3, hosts: Hosts | None = None) -> None:
        super().__init__(workdir, replicas, hosts)
        quorum = sentinels // 2 + 1
        # announce-ip: sentinels listen on 127.0.0.1 only, whichever address their connections use.
        config = (f"sentinel announce-ip 127.0.0.1\n"
                  f"sentinel monitor {MASTER_NAME} {self.monitored_address} {self.master.port} {quorum}\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                  f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                  f"sentinel parallel-syncs {MASTER_NAME} {replicas}\n")
        self.sentinels = [Node(workdir, f"sentinel{n}", config=config) for n in range(1, sentinels + 1)]
        self.nodes = [*self.nodes, *self.sentinels]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def __enter__(self) -> SentinelGroup:
        super().__enter__()
        try:
            # Every sentinel knows the master, its replicas and the other sentinels.
            wait_for(lambda: all(self._sees_everything(s) for s in self.sentinels), timeout=30, interval=0.2)
        except BaseException:
            self.kill_all()
            raise
        return self

    def _sees_everything(self, sentinel: Node) -> bool:
        state = sentinel.client().sentinel_master(MASTER_NAME)
        return (int(state["num-slaves"]) == len(self.replicas)
                and int(state["num-other-sentinels"]) == len(self.sentinels) - 1)

    def master_address(self) -> tuple[str, int] | None:
        """The master's address as the live sentinels' majority reports it."""
        found = []
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            with contextlib.suppress(redis.RedisError):
                host, port = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
                found.append((host.decode() if isinstance(host, bytes) else str(host), int(port)))
        return max(set(found), key=found.count) if found else None

    def master_port(self) -> int | None:
        address = self.master_address()
        return address[1] if address else None

    def wait_for_promotion(self, old_port: int, timeout: float = 30) -> tuple[Node, float]:
        """Until the sentinels name another master and it takes writes; returns it and when."""
        def promoted() -> Node | None:
            port = self.master_port()
            if port is None or port == old_port:
                return None
            node = next(n for n in self.replicas if n.port == port)
            return node if node.client().info("replication")["role"] == "master" else None

        node = wait_for(promoted, timeout=timeout, interval=0.05)
        return node, time.monotonic()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill_all()
