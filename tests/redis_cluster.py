"""A Redis Cluster for tests: three masters, each with a replica, on redis-servers of the test's own.

Every node is a redis-server on a free port (whose cluster bus port, the port + 10000, is free
too), in a folder of its own with its own cluster config file; the machine's shared Redis is never
touched. ``LocalCluster`` is a context manager that SIGKILLs every node it started and removes
their folders, also when the test fails or the cluster never formed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

from tests.redis_ha import Node
from tests.support import free_port, redis_server_binary, wait_for

# A master silent for this long is failing; its replica takes over about a second later.
NODE_TIMEOUT_MS = 1000


def port_with_free_bus() -> int:
    """A free port whose cluster bus port (the port + 10000, before Redis 7's --cluster-port) is
    free and valid too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli_binary() -> str:
    """Debian's redis-cli beside redis-server, else the one next to the server the tests use."""
    found = shutil.which("redis-cli")
    if found:
        return found
    return str(Path(redis_server_binary()).with_name("redis-cli"))


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, all slots covered, every replica in sync."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.replicas_per_master = replicas
        self.nodes: list[Node] = []
        for n in range(1, masters * (1 + replicas) + 1):
            node = Node(workdir, f"node{n}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS))
            node.port = port_with_free_bus()
            self.nodes.append(node)
        self.masters_count = masters

    @property
    def url(self) -> str:
        """The service's REDIS_URL naming every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def url_of(self, *nodes: Node) -> str:
        """A REDIS_URL naming only ``nodes``: the client learns the rest of the layout from them."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)

    def __enter__(self) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [redis_cli_binary(), "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            self.wait_healthy(timeout=30)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """SIGKILL every node (each also when another fails) and remove their folders."""
        try:
            for node in self.nodes:
                try:
                    node.kill()
                except Exception:  # noqa: S112 - the next node must be killed all the same
                    continue
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and knows every live node, and every live
        replica's link to its master is up (a replica out of sync could not take over)."""
        expected = len(self.alive())

        def healthy() -> bool:
            for node in self.alive():
                client = node.client()
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    known = [line for line in client.execute_command("CLUSTER", "NODES").decode().splitlines()
                             if "fail" not in line.split()[2]]
                    if len(known) < expected:
                        return False
                    info = client.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return True

        wait_for(healthy, timeout=timeout, interval=0.1)

    def role(self, node: Node) -> str:
        client = node.client()
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def masters(self) -> list[Node]:
        return [node for node in self.alive() if self.role(node) == "master"]

    def node_id(self, node: Node) -> str:
        client = node.client()
        try:
            return client.execute_command("CLUSTER", "MYID").decode()
        finally:
            client.close()

    def replicas_of(self, master: Node) -> list[Node]:
        master_id = self.node_id(master)
        found = []
        for node in self.alive():
            client = node.client()
            try:
                mine = next(line for line in client.execute_command("CLUSTER", "NODES").decode().splitlines()
                            if "myself" in line.split()[2])
            finally:
                client.close()
            if mine.split()[3] == master_id:
                found.append(node)
        return found

    def master_of_slot(self, slot: int) -> Node:
        """The master serving ``slot`` as a live node's slot table says."""
        client = self.alive()[0].client()
        try:
            table = client.execute_command("CLUSTER", "SLOTS")
        finally:
            client.close()
        port = next(int(entry[2][1]) for entry in table if entry[0] <= slot <= entry[1])
        return next(node for node in self.nodes if node.port == port)

    def slot_of(self, key: str) -> int:
        client = self.alive()[0].client()
        try:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))
        finally:
            client.close()

    def wait_for_takeover(self, killed: Node, replica: Node, timeout: float = 30) -> float:
        """Until ``replica`` is a master and every live node says cluster_state:ok; returns when."""
        def took_over() -> bool:
            if self.role(replica) != "master":
                return False
            for node in self.alive():
                client = node.client()
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                finally:
                    client.close()
            return True

        wait_for(took_over, timeout=timeout, interval=0.02)
        return time.monotonic()


def claim_cycle(key: str, arrived: datetime) -> None:
    """One event's whole life in the dedup cache, inside an app context: claimed, busy for another
    task, released, claimed again, marked done; then a copy told apart from an earlier one."""
    from app.plumbing import dedup

    assert dedup.claim(key, "task-a", arrived) == "claimed"
    assert dedup.claim(key, "task-b", arrived) == "busy"
    dedup.release(key, "task-a")
    assert dedup.claim(key, "task-b", arrived) == "claimed"
    dedup.finish(key, arrived)
    assert dedup.claim(key, "task-c", arrived) == "duplicate"
    assert dedup.claim(key, "task-d", arrived.replace(second=1)) == "earlier"


def applied_once(session_id: str) -> None:
    """An event delivered twice, inside an app context: applied, then a duplicate, stored once."""
    from sqlalchemy import func, select

    from app.applying.delivery import deliver
    from app.applying.domain import APPLIED, DUPLICATE
    from app.base.extensions import db
    from app.payload.envelope import Envelope
    from app.payload.events import Event
    from app.records.models import WebhookEvent

    event = Event(session_id, "completed", "+254712345678", None, 42,
                  {"sessionId": session_id, "status": "completed", "phoneNumber": "+254712345678", "duration": "42"})
    envelope = Envelope(event.to_message(), "2026-03-06T14:00:05+00:00")
    assert deliver(envelope, owner="task-1") == APPLIED
    assert deliver(envelope, owner="task-2") == DUPLICATE
    assert db.session.scalar(select(func.count()).select_from(WebhookEvent).where(
        WebhookEvent.recording_id == session_id)) == 1
