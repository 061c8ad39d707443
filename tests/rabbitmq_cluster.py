"""Three RabbitMQ nodes of the test's own, clustered, beside the machine's shared node (never touched).

Each node is a :class:`tests.rabbitmq_node.RabbitNode` (own node name, AMQP and distribution ports,
folders, started as the ``rabbitmq`` user) that shares one Erlang cookie with the others: nodes
of a cluster, and the ``rabbitmqctl`` that talks to them, must present the same cookie. The first
node starts alone; the other two name it in their config (classic peer discovery) and join it as
they boot, which is RabbitMQ's own cluster formation rather than a join by hand. Quorum queues
declared afterwards have a member on each of the three nodes, so the cluster survives the loss
of any one of them.

Used as a context manager: whatever fails on the way up or inside the block, all three nodes are
killed and their folders removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from tests.rabbitmq_node import RabbitNode
from tests.support import free_port, group_members, wait_for

CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
QUEUES = "/usr/lib/rabbitmq/bin/rabbitmq-queues"
# Erlang's schedulers spin while idle by default: three nodes doing so would take the cores the
# stack under test needs. Distribution (node to node, and the CLI) listens on loopback only.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"


class ClusterNode(RabbitNode):
    """A node that presents the cluster's cookie and, unless it is the first, joins ``seed`` at boot."""

    def __init__(self, cookie: str, seed: str | None = None) -> None:
        super().__init__()
        cookie_file = self.workdir / "home" / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)  # Erlang refuses a cookie others may read
        if seed is not None:
            with (self.workdir / "rabbitmq.conf").open("a") as conf:
                conf.write("cluster_formation.peer_discovery_backend = classic_config\n"
                           f"cluster_formation.classic_config.nodes.1 = {seed}\n")
        if self.as_root:
            shutil.chown(cookie_file, "rabbitmq", "rabbitmq")
        # The CLI's own distribution port: RabbitMQ's default range (35672-35682) is shared with
        # every other rabbitmqctl on the machine.
        self.ctl_dist_port = free_port()

    def env(self) -> dict[str, str]:
        return {**super().env(), "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS}

    def ctl(self, *args: str, program: str = CTL, timeout: float = 60) -> str:
        """Run a RabbitMQ CLI command against this node (as the ``rabbitmq`` user, with its cookie)."""
        env = {**self.env(), "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_dist_port),
               "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_dist_port + 10)}
        argv = (["runuser", "-u", "rabbitmq", "--"] if self.as_root else []) + [program, "-n", self.name, *args]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def beam(self) -> int | None:
        """The node's Erlang VM: the one OS process that is the node (the rest of its group are the
        wrapper scripts and the VM's port helper)."""
        if self.process is None:
            return None
        for pid in group_members(self.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam"):
                    return pid
        return None

    def kill(self) -> None:
        """SIGKILL the node's VM: no shutdown, no goodbye to its peers, as a crashed host would leave it."""
        pid = self.beam()
        if pid is None:
            raise RuntimeError(f"{self.name} has no running VM")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.beam() is None, timeout=10, interval=0.02)


class RabbitCluster:
    """Three clustered nodes; ``url`` names all three, as kombu's failover list."""

    SIZE = 3  # odd: quorum queues keep a majority with one node lost

    def __init__(self) -> None:
        cookie = secrets.token_hex(16).upper()
        self.nodes = [ClusterNode(cookie)]
        try:
            while len(self.nodes) < self.SIZE:
                self.nodes.append(ClusterNode(cookie, seed=self.nodes[0].name))
        except BaseException:  # the folders made so far go too
            self.remove()
            raise

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 120) -> float:
        """Start the first node, then the others at once (each joins the first as it boots); wait
        until every node sees all three running. Returns how long that took."""
        started = time.monotonic()
        self.nodes[0].start(timeout=timeout)
        with ThreadPoolExecutor(len(self.nodes) - 1) as pool:
            list(pool.map(lambda node: node.start(timeout=timeout), self.nodes[1:]))
        wait_for(lambda: self.running() == {node.name for node in self.nodes}, timeout=60, interval=1)
        return time.monotonic() - started

    def running(self, via: ClusterNode | None = None) -> set[str]:
        """The nodes ``via`` (the first live one by default) sees running in its cluster."""
        node = via or self.live()[0]
        listed = node.ctl("cluster_status", "--formatter", "json")
        return set(json.loads(listed)["running_nodes"])

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.beam() is not None]

    def leader(self, queue: str, vhost: str = "/") -> ClusterNode:
        """The node that leads a quorum queue now, as a live node reports it."""
        listed = self.live()[0].ctl("list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "leader")
        for line in listed.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == queue:
                return self.node(fields[1])
        raise LookupError(f"no quorum queue {queue!r}: {listed!r}")

    def members(self, queue: str, vhost: str = "/") -> dict[str, str]:
        """The quorum queue's members (its Raft group): node name -> Raft state, as a live node
        reports them."""
        listed = self.live()[0].ctl("quorum_status", "-p", vhost, queue, "--formatter", "json", program=QUEUES)
        return {member["Node Name"]: member["Raft State"] for member in json.loads(listed)}

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()
