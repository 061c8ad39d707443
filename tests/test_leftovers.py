"""The session-end check (``tests.support.leftovers``, run by ``nothing_left_behind``) on things
made for the purpose: each kind it looks for, left behind, is reported, and no longer once
removed; and the helpers that make namespaces, links, addresses and RabbitMQ node folders record
them as they make them.

The things made here are recorded in a scratch record of the test's own, never in the suite's
(``MADE``), and removed in a ``finally``: the real check at the session's end is not tripped by
them (a removal that fails makes the test fail instead).
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests import netns
from tests.rabbitmq_node import RabbitNode
from tests.support import MADE, PG_ADMIN_DSN, _rabbitmqctl, address_record, leftovers, spawn, stop_group

Made = tuple[dict[str, set[str]], str]  # a scratch record, and the line leftovers should report


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def a_folder() -> Iterator[Made]:
    path = tempfile.mkdtemp(prefix="voice-leftover-")
    try:
        yield {"folder": {path}}, f"folder {path}"
    finally:
        shutil.rmtree(path)


@contextlib.contextmanager
def a_database() -> Iterator[Made]:
    name = f"voice_leftover_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield {"database": {name}}, f"database {name}"
        finally:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.contextmanager
def a_vhost() -> Iterator[Made]:
    name = f"voice-leftover-{uuid.uuid4().hex[:10]}"
    subprocess.run([_rabbitmqctl(), "add_vhost", name], check=True, capture_output=True, timeout=60)
    try:
        yield {"vhost": {name}}, f"RabbitMQ vhost {name}"
    finally:
        subprocess.run([_rabbitmqctl(), "delete_vhost", name], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def a_namespace() -> Iterator[Made]:
    netns.require("a namespace left behind")
    name = f"voice-leftover-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        yield {"netns": {name}}, f"network namespace {name}"
    finally:
        ip("netns", "del", name)


@contextlib.contextmanager
def a_link() -> Iterator[Made]:
    netns.require("a link left behind")
    name = f"vleft{uuid.uuid4().hex[:6]}"
    ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")  # a pair, as tests.netns makes
    try:
        yield {"link": {name}}, f"network link {name}"
    finally:
        ip("link", "del", name)  # takes its peer with it


@contextlib.contextmanager
def an_address() -> Iterator[Made]:
    netns.require("an address left behind")
    subnet = netns._unrouted_subnet()
    cidr = f"{ipaddress.IPv4Address(int(subnet.network_address) + 254)}/32"
    ip("addr", "add", cidr, "dev", "lo", "label", f"lo:l{uuid.uuid4().hex[:6]}")
    try:
        yield {"address": {address_record(cidr, "lo")}}, f"address {cidr} dev lo"
    finally:
        ip("addr", "del", cidr, "dev", "lo")


KINDS: dict[str, Callable[[], contextlib.AbstractContextManager[Made]]] = {
    "folder": a_folder,
    "database": a_database,
    "vhost": a_vhost,
    "netns": a_namespace,
    "link": a_link,
    "address": an_address,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_recorded_thing_left_behind_is_reported_until_it_is_removed(kind: str) -> None:
    with KINDS[kind]() as (records, line):
        assert leftovers(timeout=0, records=records, processes=False) == [line]
        # The same thing recorded under another name is not mistaken for it.
        other = {kind: {name + "-not-made" for name in records[kind]}}
        assert leftovers(timeout=0, records=other, processes=False) == []
    assert leftovers(timeout=10, records=records, processes=False) == []


def test_a_live_descendant_is_reported_until_it_has_exited() -> None:
    sleeper = spawn(["sleep", "300"])
    try:
        found = leftovers(timeout=0, records={})
        assert f"process {sleeper.pid}: sleep 300" in found, found
    finally:
        stop_group(sleeper, signal.SIGKILL, timeout=10)
    assert not [line for line in leftovers(timeout=0, records={}) if line.startswith(f"process {sleeper.pid}:")]


def test_a_kind_it_cannot_look_for_is_an_error_not_nothing_left() -> None:
    with pytest.raises(KeyError):
        leftovers(timeout=0, records={"bucket": {"b"}}, processes=False)


def recorded_since(before: dict[str, set[str]]) -> dict[str, set[str]]:
    return {kind: MADE[kind] - before[kind] for kind in MADE}


def test_hosts_record_each_namespace_link_and_address_as_they_make_them() -> None:
    netns.require("recording the hosts a test makes")
    before = {kind: set(names) for kind, names in MADE.items()}
    with netns.Hosts(2) as hosts:
        records = recorded_since(before)
        assert records["netns"] == {host.namespace for host in hosts.hosts}
        assert records["link"] == {host.outer_link for host in hosts.hosts}
        assert records["address"] == {address_record(f"{hosts.shared_address}/32", "lo")} | {
            address_record(f"{host.server_address}/30", host.outer_link) for host in hosts.hosts}
        reported = leftovers(timeout=0, records=records, processes=False)
        assert len(reported) == 2 + 2 + 3, reported  # all of them exist while the hosts do
    assert leftovers(timeout=10, records=records, processes=False) == []


def test_a_rabbitmq_node_records_its_folder() -> None:
    node = RabbitNode()  # makes its folders; not started
    try:
        assert str(node.workdir) in MADE["folder"]
        records = {"folder": {str(node.workdir)}}
        assert leftovers(timeout=0, records=records, processes=False) == [f"folder {node.workdir}"]
    finally:
        node.remove()
    assert leftovers(timeout=10, records=records, processes=False) == []
