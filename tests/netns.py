"""Hosts of the test's own: Linux network namespaces, each joined to the machine by a veth pair.

Host ``n`` gets the namespace ``voice-<tag>-<n>`` and the pair ``vh<tag><n>`` (machine side,
address ``.4n+1``) / ``vn<tag><n>`` (host side, ``.4n+2``), a /30 each inside one private /24
chosen at random among those the machine does not route; hosts reach each other through the
machine (forwarding on their links only). Servers that the hosts must reach
listen on the machine-side addresses as well as 127.0.0.1. ``cut`` takes a host's link down
(packets vanish: no reset, no refusal, as when a host drops off the network) and ``restore``
brings it back. Everything made is removed on exit, also when the test fails: processes in the
namespaces are SIGKILLed, the namespaces and links deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import address_record, made


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _ip("netns", "list")
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        return f"ip netns unavailable: {exc}"
    return None


def require(purpose: str) -> None:
    """For a test whose claim rests on hosts of its own: where namespaces cannot be made it never
    runs a weaker variant. It fails (as root, which is how CI runs the suite, or wherever ``CI``
    is set: there it should work), else it is skipped with the reason, which pytest's summary
    lists."""
    reason = available()
    if reason is None:
        return
    message = f"{purpose} needs network namespaces, and {reason}"
    if os.geteuid() == 0 or os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class Host:
    namespace: str
    outer_link: str  # the machine's end of the pair
    server_address: str  # where the host reaches the machine's servers
    address: str  # the host's own address

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]


class Hosts:
    def __init__(self, count: int) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = _unrouted_subnet()
        self.hosts: list[Host] = []
        self.count = count
        # One address of the machine that every host reaches (through its own link), for a server
        # all hosts must name alike (a Redis master its replicas and sentinels agree on). It lives
        # on the machine's loopback, labelled, in the suite's own unrouted subnet.
        self.shared_address = str(ipaddress.IPv4Address(int(self.subnet.network_address) + 254))
        self._shared_added = False

    def __enter__(self) -> Hosts:
        try:
            # Each namespace, link and address is recorded (tests.support.made) before it is made,
            # so that the session's end reports whatever ``remove`` did not take away.
            made("address", address_record(f"{self.shared_address}/32", "lo"))
            self._shared_added = True  # removing an address never added only fails, unchecked
            _ip("addr", "add", f"{self.shared_address}/32", "dev", "lo", "label", f"lo:v{self.tag}")
            base = int(self.subnet.network_address)
            for n in range(self.count):
                namespace, outer, inner = f"voice-{self.tag}-{n}", f"vh{self.tag}{n}", f"vn{self.tag}{n}"
                server, own = ipaddress.IPv4Address(base + 4 * n + 1), ipaddress.IPv4Address(base + 4 * n + 2)
                self.hosts.append(Host(made("netns", namespace), made("link", outer), str(server), str(own)))
                _ip("netns", "add", namespace)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", namespace)
                made("address", address_record(f"{server}/30", outer))
                _ip("addr", "add", f"{server}/30", "dev", outer)
                _ip("link", "set", outer, "up")
                _ip("-n", namespace, "addr", "add", f"{own}/30", "dev", inner)
                _ip("-n", namespace, "link", "set", inner, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
                _ip("-n", namespace, "route", "add", f"{self.shared_address}/32", "via", str(server))
                # The other hosts, through the machine: a replica must reach another one promoted
                # master. Forwarding is turned on for this link alone (the machine's own setting,
                # and every other interface's, stay as they are); the link takes it with it.
                _ip("-n", namespace, "route", "add", str(self.subnet), "via", str(server))
                Path(f"/proc/sys/net/ipv4/conf/{outer}/forwarding").write_text("1\n")
        except BaseException:
            self.remove()
            raise
        return self

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.outer_link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.outer_link, "up")

    def remove(self) -> None:
        for host in self.hosts:
            pids = _ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("link", "del", host.outer_link, check=False)  # takes its peer with it
            _ip("netns", "del", host.namespace, check=False)
        self.hosts = []
        if self._shared_added:
            _ip("addr", "del", f"{self.shared_address}/32", "dev", "lo", check=False)
            self._shared_added = False

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _unrouted_subnet() -> ipaddress.IPv4Network:
    routed = [ipaddress.ip_network(line.split()[0], strict=False)
              for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines()
              if line and line.split()[0][0].isdigit()]
    rng = random.Random()
    for _ in range(100):
        candidate = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24")
        if not any(candidate.overlaps(net) for net in routed):
            return candidate
    raise RuntimeError("no unrouted 10.x.y.0/24 left for test hosts")
