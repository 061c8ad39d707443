"""The fault enumeration's interceptor, loaded by Python at start-up in the processes under test only.

Put first on a child process's PYTHONPATH by ``tests.enumerate``, and inert unless ``VOICE_ENUM``
holds a JSON plan. It wraps the clients, never the service's code:

- redis-py: ``AbstractConnection.send_packed_command`` and ``read_response``. One packed send is
  one step (a pipeline or MULTI/EXEC is one step); it has taken effect once every reply it asked
  for was read. Health-check PINGs and the commands a connection sends while it connects are not
  steps (when they happen depends on the connection's age, not on the path).
- SQLAlchemy: ``DefaultDialect.do_execute`` (and ``do_executemany``/``do_execute_no_params``),
  ``do_commit``, ``do_rollback`` and the pool's pre-ping. An injected failure raises the DBAPI's
  own ``OperationalError`` after closing the DBAPI connection, so SQLAlchemy wraps it and
  invalidates the connection as it does for a server that went away. What SQLAlchemy runs while
  it opens a connection is not a step.
- py-amqp: ``Channel._basic_publish``, the publisher-confirm wait, ``basic_ack``,
  ``basic_reject``/``basic_nack`` and ``_on_basic_deliver``. Celery's own events and remote
  control (``MONITORING_EXCHANGES``; on Redis, PUBLISHes to their fanout channels) are never the
  path's: passed through, noted as "outside".

A path is armed (its calls are numbered from 0) in one of three ways, per process role:

- ``web``: a request carrying the ``X-Enum-Marker`` header whose plan file ``<dir>/<marker>.plan``
  exists (the file is renamed as it is taken, so an Africa's Talking retry of the same event, or
  a gunicorn worker that replaced a killed one, is not armed again); the path ends with the
  request. Every publish that carries the marker is also written to ``<dir>/<marker>.sent`` with
  the ``received_at`` the web gave the event (what the arrival-time invariant compares with).
- ``worker``: a message delivered (a BRPOP reply on Redis, ``basic_deliver`` on RabbitMQ) whose
  session id has a plan file; the path ends when the worker asks for its next message (Redis:
  the next BRPOP is sent) or when the delivery callback returns (RabbitMQ).
- ``cli``: from the start of the process (the plan is in ``VOICE_ENUM`` itself) to its exit.

A plan is ``{"trace": file, "fault": {"step": k, "kind": before|after|fail|refuse} | null,
"db": null|"first"|"twice"|"all"}``. ``before`` SIGKILLs the process just before step k, ``after`` just
after it took effect (its reply read, before the caller sees it), ``fail`` raises the client's own
connection error instead of making the call, ``refuse`` is the server's own refusal from step k to
the end of the path (a Redis replica or a loading Redis, a broker that refuses publishes): Redis's
error reply (READONLY for a write, LOADING for a read) to the path's later calls of the same kind
too, and RabbitMQ's nack of that publish and of the path's later ones (not queued;
``MessageNacked``). ``db`` makes the path's database calls fail (the first one, the first two
statements: a worker's batch and then the task that applies its event alone, or all of them):
the transient error of the retry path, the database down of the dead-letter path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import signal
import threading
import time
from typing import Any

PLAN_ENV = "VOICE_ENUM"
MARKER_HEADER = "HTTP_X_ENUM_MARKER"
# Session ids the harness makes: "enum-<lane>-<hex>". Found in task messages' argsrepr and bodies.
MARKER = re.compile(rb"enum-[a-z0-9]+-[0-9a-f]{10}")
_HEX_TAIL = re.compile(r"[0-9a-f]{16,}|[0-9a-f-]{32,}")
# Celery's own exchanges: its events (the worker-heartbeat every 2 s, task events) and remote
# control. The worker sends them from its event loop's timers, on the thread that runs the path, so
# one may fall due while a worker path is armed: Celery sends a task's ack or reject with
# hub.call_soon, and when the delivery was read by kombu's reader from the ready list (it queues
# itself again after every frame it reads), that ack or reject waits for the next batch, after the
# timers due. They are not the path's calls (which of them a run meets depends on timing), and a
# broker that refuses a queue's messages still takes them (no queue is bound to celeryev unless a
# monitor listens). Numbered, a struck refusal refused them too, and Celery publishes the heartbeat
# with retry=True and no retry policy (kombu's ensure() without a limit): the worker reconnected
# and published it again forever, the deferred reject never went out, the path never ended and
# the worker took no other message (the harness error "the worker never applied the warm-up event").
MONITORING_EXCHANGES = frozenset({"celeryev", "celery.pidbox", "reply.celery.pidbox"})
# On Redis the same events are PUBLISHes to kombu's fanout channels, named "/<db>.<exchange>/<key>"
# (the heartbeat: "/0.celeryev/worker.heartbeat"); one that fell due while a worker path was armed
# was numbered as its step, and the path's recordings then differed by it.
_REDIS_MONITORING_CHANNEL = re.compile(
    rb"^/\d+\.(?:" + b"|".join(re.escape(e.encode()) for e in sorted(MONITORING_EXCHANGES)) + rb")(?:/|$)")


class _State:
    """What the process is doing: armed or not, in which thread, at which step."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.role: str = config["role"]
        self.dir: str = config.get("dir", "")
        self.lock = threading.Lock()
        self.armed = False
        self.thread: int | None = None
        self.plan: dict[str, Any] = {}
        self.marker = ""
        self.trace_fd: int | None = None
        self.index = 0
        self.fired = False
        self.db_failed = 0
        self.delivery_tag = ""
        self.holding = False  # the worker's batch holds messages (app.applying.fastpath.Batch)
        self.flushed = False  # the armed path's batch was applied: the path ends on the loop's next round
        self.local = threading.local()  # connecting: calls made while a connection is opened

    # --- arming ---------------------------------------------------------------------------

    def take_plan(self, marker: str) -> dict[str, Any] | None:
        """The marker's plan, taken once (atomic rename), or None."""
        path = os.path.join(self.dir, f"{marker}.plan")
        try:
            with open(path) as handle:
                if json.load(handle).get("on") != self.role:  # another process's path
                    return None
            taken = f"{path}.taken.{os.getpid()}"
            os.rename(path, taken)
        except (OSError, ValueError):
            return None
        with open(taken) as handle:
            return json.load(handle)

    def arm(self, plan: dict[str, Any], marker: str, **details: Any) -> None:
        if self.armed:
            self.end(f"superseded by {marker}")  # a path that never saw its end must not block the next
        self.plan, self.marker, self.index, self.fired, self.db_failed = plan, marker, 0, False, 0
        self.flushed = False
        self.seen: dict[str, int] = {}
        self.channel: Any = None
        self.refusing = ""  # "redis" or "amqp" once a refusal struck: the server goes on refusing
        self.trace_fd = os.open(plan["trace"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.thread = threading.get_ident()
        self.armed = True
        self.write({"event": "armed", "pid": os.getpid(), "role": self.role, "marker": marker, **details})

    def end(self, why: str) -> None:
        if not self.armed:
            return
        self.write({"event": "end", "why": why, "steps": self.index})
        self.armed = False
        self.thread = None
        if self.trace_fd is not None:
            os.close(self.trace_fd)
            self.trace_fd = None

    def in_step(self) -> Any:
        """While a traced call runs: the frames it sends are the step's own."""
        @contextlib.contextmanager
        def scope() -> Any:
            self.local.in_step = getattr(self.local, "in_step", 0) + 1
            try:
                yield
            finally:
                self.local.in_step -= 1

        return scope()

    def mine(self) -> bool:
        """Whether the calling thread runs the armed path (and is not opening a connection, nor
        sending Celery's own monitoring events)."""
        return self.armed and self.thread == threading.get_ident() and not getattr(self.local, "connecting", 0) \
            and not getattr(self.local, "outside", 0)

    def outside_path(self) -> Any:
        """While the armed thread makes a call that is not the path's (see ``MONITORING_EXCHANGES``):
        it is passed through, never numbered, faulted or refused (the trace notes it as
        "outside", which the engine ignores)."""
        @contextlib.contextmanager
        def scope() -> Any:
            self.local.outside = getattr(self.local, "outside", 0) + 1
            try:
                yield
            finally:
                self.local.outside -= 1

        return scope()

    # --- steps ----------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        if self.trace_fd is not None:
            os.write(self.trace_fd, (json.dumps(record) + "\n").encode())

    def step(self, label: str, db_call: bool = False, family: str | None = None,
             **details: Any) -> tuple[int, str | None]:
        """Number the next call and say what to do with it: None, before, after, fail, refuse or
        "down" (the plan's database failure: every call, or the first statement; a failed pre-ping
        is only a reconnect, never the transient error a task sees)."""
        index = self.index
        self.index += 1
        down = False
        db_mode = self.plan.get("db")
        statement = label not in {"db ping", "db COMMIT", "db ROLLBACK"}
        if db_call and (db_mode == "all" or (db_mode == "first" and self.db_failed == 0 and label != "db ping")
                        or (db_mode == "twice" and self.db_failed < 2 and statement)):
            down = True
            self.db_failed += 1
        self.write({"event": "step", "i": index, "label": label, **({"down": True} if down else {}), **details})
        self.seen[label] = occurrence = self.seen.get(label, 0) + 1
        fault = self.plan.get("fault")
        kind = None
        # A fault names its call by label and occurrence (the 3rd "db COMMIT"), so that a call the
        # recording did not have (a queue declared again on a new connection) does not move it.
        target = (fault["label"] == label and fault["occurrence"] == occurrence) if fault and "label" in fault \
            else bool(fault and fault["step"] == index)
        if fault and not self.fired and target:
            self.fired = True
            kind = fault["kind"]
            self.write({"event": "fault", "i": index, "kind": kind})
        if kind == "before":
            self.kill(index)
        if kind is None and down:
            return index, "down"
        if kind == "refuse":
            self.refusing = family or ""
        elif kind is None and family and self.refusing == family:
            kind = "refuse"  # a refusing server refuses the path's later calls of the same kind too
            self.write({"event": "refused", "i": index})
        return index, kind

    def kill(self, index: int) -> None:
        self.write({"event": "killed", "i": index})
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL cannot be caught; never reached

    def sent(self, marker: str, payload: bytes, via: str) -> None:
        """A publish carrying the marker left the process: note the event (its duration tells a
        session's events apart) and the received_at it carries."""
        message, received_at = task_in(payload)
        fd = os.open(os.path.join(self.dir, f"{marker}.sent"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps({"received_at": received_at, "duration": (message or {}).get("duration"),
                                      "via": via, "pid": os.getpid(), "at": time.time()}) + "\n").encode())
        finally:
            os.close(fd)


STATE: _State | None = None


def task_in(payload: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The event message and arrival time an apply task carries: Celery's body is [args, kwargs,
    embed] with args (message, received_at, request_id), base64 inside kombu's Redis message (a
    packed command, or a BRPOP reply) and plain on AMQP."""
    candidates = [payload]
    if payload[:1] == b"*":
        try:
            candidates = [arg for command in _commands(payload) for arg in command]
        except (ValueError, IndexError):
            candidates = [payload]
    for candidate in candidates:
        bodies = [candidate, *re.findall(rb'"body": "([A-Za-z0-9+/=]+)"', candidate)]
        for n, body in enumerate(bodies):
            try:
                task = json.loads(base64.b64decode(body, validate=True) if n else body)
            except (ValueError, binascii.Error):
                continue
            if isinstance(task, list) and task and isinstance(task[0], list) and len(task[0]) > 1 \
                    and isinstance(task[0][0], dict) and isinstance(task[0][1], str):
                return task[0][0], task[0][1]
    return None, None


def received_at_in(payload: bytes) -> str | None:
    return task_in(payload)[1]


def _marker_in(data: bytes) -> str | None:
    found = MARKER.search(data)
    return found.group(0).decode() if found else None


# --- redis-py ------------------------------------------------------------------------------


def _commands(data: bytes) -> list[list[bytes]]:
    """The commands in a packed RESP buffer."""
    found: list[list[bytes]] = []
    i = 0
    while i < len(data) and data[i:i + 1] == b"*":
        j = data.index(b"\r\n", i)
        count, i = int(data[i + 1:j]), j + 2
        args = []
        for _ in range(count):
            j = data.index(b"\r\n", i)
            size, i = int(data[i + 1:j]), j + 2
            args.append(data[i:i + size])
            i += size + 2
        found.append(args)
    return found


_READS = {b"GET", b"HGET", b"HGETALL", b"HVALS", b"HLEN", b"LINDEX", b"LLEN", b"LRANGE", b"ZRANGE",
          b"ZRANGEBYSCORE", b"ZSCORE", b"ZCARD", b"EXISTS", b"TYPE", b"SCAN", b"MULTI", b"EXEC"}


def _key(raw: bytes) -> str:
    """A key as a label shows it: the same for every run (markers and hashes left out)."""
    text = MARKER.sub(b"<session>", raw).decode(errors="replace")
    if ":" in text and _HEX_TAIL.search(text.rsplit(":", 1)[1]):
        return text.rsplit(":", 1)[0] + ":*"
    return text if len(text) <= 48 else text[:45] + "..."


def _redis_label(commands: list[list[bytes]]) -> str:
    names = [c[0].decode(errors="replace").upper() for c in commands]
    if len(commands) == 1:
        command = commands[0]
        name = names[0]
        if name in {"EVAL", "EVALSHA"} and len(command) > 3 and command[2] != b"0":
            return f"redis {name}({_key(command[3])})"
        if name in {"EVAL", "EVALSHA"}:
            return f"redis {name}"
        if len(command) > 1 and name not in {"MULTI", "EXEC", "PING"}:
            return f"redis {name} {_key(command[1])}"
        return f"redis {name}"
    inner = [n for n in names if n not in {"MULTI", "EXEC"}]
    kind = "MULTI" if names[0] == "MULTI" else "PIPELINE"
    return f"redis {kind}({','.join(inner)})"


def _patch_redis() -> None:
    import redis
    from redis.connection import AbstractConnection

    original_send = AbstractConnection.send_packed_command
    original_read = AbstractConnection.read_response
    original_connect = AbstractConnection.connect_check_health
    original_disconnect = AbstractConnection.disconnect

    def disconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._enum_step = None  # replies still owed on a closed connection never come
        return original_disconnect(self, *args, **kwargs)

    def connect_check_health(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        if state is None:
            return original_connect(self, *args, **kwargs)
        state.local.connecting = getattr(state.local, "connecting", 0) + 1
        try:
            return original_connect(self, *args, **kwargs)
        finally:
            state.local.connecting -= 1

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        state = STATE
        if state is None or not state.armed:
            return original_send(self, command, check_health)
        chunks = [command] if isinstance(command, (bytes, str)) else command
        data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        if not state.mine():
            return original_send(self, command, check_health)
        try:
            commands = _commands(data)
        except (ValueError, IndexError):
            commands = []
        names = [c[0].upper() for c in commands if c]
        if not commands or names == [b"PING"]:
            return original_send(self, command, check_health)
        if state.role == "worker" and names[0] == b"BRPOP":
            if state.holding or state.flushed:
                # The path's message waits in the batch, or its batch was applied and the path ends
                # once the loop ran what the flush left for its next round (``_patch_batch``): the
                # worker asks for more messages meanwhile, not as a step of the path.
                state.write({"event": "outside", "after": state.index - 1,
                             "what": f"redis BRPOP ({'batch held' if state.holding else 'batch applied'})"})
                return original_send(self, command, check_health)
            state.end("next BRPOP")  # the worker asks for its next message: the path is over
            return original_send(self, command, check_health)
        if names == [b"PUBLISH"] and len(commands[0]) > 1 and _REDIS_MONITORING_CHANNEL.match(commands[0][1]):
            state.write({"event": "outside", "after": state.index - 1,
                         "what": f"redis PUBLISH {commands[0][1].decode(errors='replace')}"})
            return original_send(self, command, check_health)
        if check_health:  # a health-check PING goes first, outside the step
            self.check_health()
        index, kind = state.step(_redis_label(commands), family="redis read" if set(names) <= _READS else "redis write")
        if kind == "fail":
            self.disconnect()
            raise redis.ConnectionError("Error 104 while writing to socket. Connection reset by peer.")
        if kind == "refuse":  # the server's own error reply: a replica refuses writes, a loading server reads
            if set(names) <= _READS:
                raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
            raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")
        marker = _marker_in(data) if state.role == "web" else None
        self._enum_step = [index, len(commands), kind, marker, data if marker else b""]
        return original_send(self, command, False)

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        pending = getattr(self, "_enum_step", None)
        try:
            response = original_read(self, *args, **kwargs)
        except BaseException:
            if pending is not None:
                _replied(self, pending)
            raise
        if pending is not None:
            _replied(self, pending)
        elif state is not None and state.role == "worker" and isinstance(response, list) \
                and len(response) == 2 and isinstance(response[1], bytes):
            _maybe_arm_on_brpop(self, response[1])
        return response

    def _replied(connection: Any, pending: list[Any]) -> None:
        pending[1] -= 1
        if pending[1] > 0:
            return
        connection._enum_step = None
        state = STATE
        if state is None:
            return
        if pending[3]:
            state.sent(pending[3], pending[4], "redis")
        if pending[2] == "after":
            state.kill(pending[0])

    def _maybe_arm_on_brpop(connection: Any, item: bytes) -> None:
        marker = _marker_in(item)
        if marker is None:
            return
        plan = STATE.take_plan(marker) if STATE else None
        if plan is None:
            return
        tag = re.search(rb'"delivery_tag": "([^"]+)"', item)
        STATE.arm(plan, marker, received_at=received_at_in(item), delivery_tag=tag.group(1).decode() if tag else None)
        _index, kind = STATE.step("redis BRPOP (reply)")
        if kind == "after":
            STATE.kill(0)
        if kind == "fail":
            connection.disconnect()
            raise redis.ConnectionError("Error while reading from socket: (104, 'Connection reset by peer')")

    AbstractConnection.connect_check_health = connect_check_health
    AbstractConnection.disconnect = disconnect
    AbstractConnection.send_packed_command = send_packed_command
    AbstractConnection.read_response = read_response


# --- SQLAlchemy ----------------------------------------------------------------------------

_SQL_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+\"?(\w+)", re.IGNORECASE)


def _sql_label(statement: str) -> str:
    text = " ".join(statement.split())
    verb = text.split(" ", 1)[0].upper()
    table = _SQL_TABLE.search(text)
    label = f"db {verb}" + (f" {table.group(1)}" if table else "")
    if verb == "SELECT" and "FOR UPDATE" in text.upper():
        label += " FOR UPDATE"
    return label


def _db_error(dbapi_connection: Any) -> BaseException:
    """The DBAPI's own error for a server that went away, its connection closed as it would be."""
    real = getattr(dbapi_connection, "dbapi_connection", None) or dbapi_connection  # under the pool's proxy
    with contextlib.suppress(Exception):  # closing what is being failed; nothing to report
        real.close()
    import psycopg

    return psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly\n\t"
                                    "This probably means the server terminated abnormally")


def _db_step(label: str, dbapi_connection: Any, call: Any) -> Any:
    state = STATE
    if state is None or not state.mine():
        return call()
    index, kind = state.step(label, db_call=True)
    if kind in {"fail", "down", "refuse"}:
        raise _db_error(dbapi_connection)
    result = call()
    if kind == "after":
        state.kill(index)
    return result


def _patch_sqlalchemy() -> None:
    from sqlalchemy.engine.default import DefaultDialect
    from sqlalchemy.pool.base import _ConnectionRecord

    def wrap_execute(name: str) -> None:
        original = getattr(DefaultDialect, name)

        def do(self: Any, cursor: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
            return _db_step(_sql_label(statement), cursor.connection,
                            lambda: original(self, cursor, statement, *args, **kwargs))

        setattr(DefaultDialect, name, do)

    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        wrap_execute(name)

    def wrap_connection_call(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def do(self: Any, dbapi_connection: Any, *args: Any, **kwargs: Any) -> Any:
            return _db_step(label, dbapi_connection, lambda: original(self, dbapi_connection, *args, **kwargs))

        setattr(owner, name, do)

    wrap_connection_call(DefaultDialect, "do_commit", "db COMMIT")
    wrap_connection_call(DefaultDialect, "do_rollback", "db ROLLBACK")
    wrap_connection_call(DefaultDialect, "do_ping", "db ping")
    try:
        from sqlalchemy.dialects.postgresql._psycopg_common import _PGDialect_common_psycopg

        wrap_connection_call(_PGDialect_common_psycopg, "do_ping", "db ping")
    except ImportError:
        pass

    # Opening a connection (and SQLAlchemy's first-connect queries) is not a step.
    connect_name = "_ConnectionRecord__connect"
    original_connect = getattr(_ConnectionRecord, connect_name)

    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        if state is None:
            return original_connect(self, *args, **kwargs)
        state.local.connecting = getattr(state.local, "connecting", 0) + 1
        try:
            return original_connect(self, *args, **kwargs)
        finally:
            state.local.connecting -= 1

    setattr(_ConnectionRecord, connect_name, connect)


# --- py-amqp -------------------------------------------------------------------------------


def _amqp_error(channel: Any) -> BaseException:
    """What a reset connection raises, the socket shut as a reset leaves it."""
    try:
        sock = channel.connection.transport.sock
        if sock is not None:
            import socket

            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # noqa: S110 - already gone
        pass
    return ConnectionResetError(104, "Connection reset by peer")


def _patch_amqp() -> None:
    from amqp import spec
    from amqp.abstract_channel import AbstractChannel
    from amqp.channel import Channel

    original_publish = Channel._basic_publish
    original_publish_confirm = Channel.basic_publish_confirm
    original_wait = AbstractChannel.wait
    original_deliver = Channel._on_basic_deliver

    def _basic_publish(self: Any, msg: Any, exchange: str = "", routing_key: str = "", *args: Any,
                       **kwargs: Any) -> Any:
        state = STATE
        if state is not None and exchange in MONITORING_EXCHANGES and state.mine():
            state.write({"event": "outside", "after": state.index - 1, "what": f"amqp publish {routing_key}"})
            with state.outside_path():
                return original_publish(self, msg, exchange, routing_key, *args, **kwargs)
        if state is None or not state.mine():
            if state is not None and state.role == "web" and getattr(state.local, "request_marker", None):
                result = original_publish(self, msg, exchange, routing_key, *args, **kwargs)
                _note_sent(state, msg)
                return result
            return original_publish(self, msg, exchange, routing_key, *args, **kwargs)
        index, kind = state.step(f"amqp basic_publish {routing_key or exchange}", family="amqp publish")
        if kind == "fail":
            raise _amqp_error(self)
        if kind == "refuse":  # the broker refuses the message: not queued, and the confirm is a nack
            state.local.nack = True
            return None
        with state.in_step():
            result = original_publish(self, msg, exchange, routing_key, *args, **kwargs)
        _note_sent(state, msg)
        if kind == "after":
            state.kill(index)
        return result

    def basic_publish_confirm(self: Any, *args: Any, **kwargs: Any) -> Any:
        """A publish with its confirm wait (a channel of a ``confirm_publish`` connection takes
        this as its ``basic_publish`` when it is made): one of Celery's own events is outside the
        path as a whole, its confirm and any frame it sends included."""
        state = STATE
        exchange = kwargs.get("exchange", args[1] if len(args) > 1 else "")
        if state is not None and exchange in MONITORING_EXCHANGES and state.mine():
            routing_key = kwargs.get("routing_key", args[2] if len(args) > 2 else "")
            state.write({"event": "outside", "after": state.index - 1, "what": f"amqp publish {routing_key}"})
            with state.outside_path():
                return original_publish_confirm(self, *args, **kwargs)
        return original_publish_confirm(self, *args, **kwargs)

    def _note_sent(state: _State, msg: Any) -> None:
        marker = getattr(state.local, "request_marker", None)
        body = msg.body if isinstance(msg.body, bytes) else str(msg.body).encode()
        if marker and marker.encode() in body:
            state.sent(marker, body, "amqp")

    def wait(self: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        confirm = isinstance(method, (list, tuple)) and spec.Basic.Ack in method
        if state is None or not confirm or not state.mine():
            return original_wait(self, method, *args, **kwargs)
        if getattr(state.local, "nack", False):  # the publish refused just before: no frame will come
            state.local.nack = False
            from amqp.exceptions import MessageNacked

            raise MessageNacked()
        index, kind = state.step("amqp confirm")
        if kind in {"fail", "refuse"}:
            raise _amqp_error(self)
        with state.in_step():
            result = original_wait(self, method, *args, **kwargs)
        if kind == "after":
            state.kill(index)
        return result

    def wrap_send(name: str) -> None:
        original = getattr(Channel, name)

        def do(self: Any, delivery_tag: Any, *args: Any, **kwargs: Any) -> Any:
            state = STATE
            if state is None or not state.mine():
                return original(self, delivery_tag, *args, **kwargs)
            own = state.role != "worker" or (str(delivery_tag) == state.delivery_tag and self is state.channel)
            if not own:  # another message's (deferred) acknowledgement: not this path's call
                return original(self, delivery_tag, *args, **kwargs)
            try:
                index, kind = state.step(f"amqp {name}")
                if kind in {"fail", "refuse"}:
                    raise _amqp_error(self)
                with state.in_step():
                    result = original(self, delivery_tag, *args, **kwargs)
                if kind == "after":
                    state.kill(index)
                return result
            finally:
                if state.role == "worker":
                    state.end(f"{name} of the path's message")

        setattr(Channel, name, do)

    for name in ("basic_ack", "basic_reject", "basic_nack"):
        if hasattr(Channel, name):
            wrap_send(name)

    def _on_basic_deliver(self: Any, consumer_tag: Any, delivery_tag: Any, redelivered: Any, exchange: Any,
                          routing_key: Any, msg: Any) -> Any:
        state = STATE
        body = msg.body if isinstance(msg.body, bytes) else str(msg.body).encode()
        marker = _marker_in(body) if state is not None and state.role == "worker" else None
        plan = state.take_plan(marker) if state is not None and marker else None
        if plan is None:
            return original_deliver(self, consumer_tag, delivery_tag, redelivered, exchange, routing_key, msg)
        state.arm(plan, marker, received_at=received_at_in(body), delivery_tag=str(delivery_tag))
        state.delivery_tag, state.channel = str(delivery_tag), self
        _index, kind = state.step(f"amqp basic_deliver {routing_key}")
        if kind == "after":
            state.kill(0)
        if kind in {"fail", "refuse"}:
            state.end("delivery failed")
            raise _amqp_error(self)
        # The path goes on after this returns: Celery acknowledges on the event loop's next turn.
        return original_deliver(self, consumer_tag, delivery_tag, redelivered, exchange, routing_key, msg)

    original_send_method = AbstractChannel.send_method

    def send_method(self: Any, sig: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        if state is not None and state.mine() and not getattr(state.local, "in_step", 0):
            # A frame no step covers (a declare, basic.qos, confirm.select): it may change what
            # the broker holds, so a kill just after the step before it and one just before the
            # step after it are not the same run.
            state.write({"event": "side", "after": state.index - 1, "what": f"amqp {sig}"})
        return original_send_method(self, sig, *args, **kwargs)

    AbstractChannel.send_method = send_method
    Channel._basic_publish = _basic_publish
    Channel.basic_publish = _basic_publish
    Channel.basic_publish_confirm = basic_publish_confirm
    AbstractChannel.wait = wait
    Channel._on_basic_deliver = _on_basic_deliver


# --- the web's requests --------------------------------------------------------------------


def _patch_flask() -> None:
    from flask.app import Flask

    original_call = Flask.__call__

    def __call__(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        state = STATE
        marker = environ.get(MARKER_HEADER) if state is not None else None
        if not marker:
            return original_call(self, environ, start_response)
        state.local.request_marker = marker
        plan = None if state.armed else state.take_plan(marker)
        if plan is not None:
            state.arm(plan, marker)
        try:
            return original_call(self, environ, start_response)
        finally:
            state.local.request_marker = None
            if plan is not None:
                state.end("request answered")

    Flask.__call__ = __call__


def _note_web_sends() -> None:
    """In the web, every Redis publish carrying the request's marker is noted, armed or not."""
    from redis.connection import AbstractConnection

    patched_send = AbstractConnection.send_packed_command
    patched_read = AbstractConnection.read_response

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        state = STATE
        marker = getattr(state.local, "request_marker", None) if state is not None else None
        if not marker or state.mine():
            return patched_send(self, command, check_health)
        chunks = [command] if isinstance(command, (bytes, str)) else command
        data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        if marker.encode() not in data:
            return patched_send(self, command, check_health)
        result = patched_send(self, command, check_health)
        self._enum_note = [len(_commands(data)), marker, data]
        return result

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        note = getattr(self, "_enum_note", None)
        response = patched_read(self, *args, **kwargs)
        if note is not None:
            note[0] -= 1
            if note[0] <= 0:
                self._enum_note = None
                if STATE is not None:
                    STATE.sent(note[1], note[2], "redis")
        return response

    AbstractConnection.send_packed_command = send_packed_command
    AbstractConnection.read_response = read_response


def _dump_stacks_on_signal() -> None:
    """SIGUSR2 writes every thread's stack to stderr (the process's log), from C: it answers even
    while the main thread is stuck where Python cannot run a signal handler (the harness sends it
    to a process that stopped answering, tests.enumerate.lane.Lane.stacks)."""
    import faulthandler
    import sys

    with contextlib.suppress(AttributeError, ValueError, OSError, RuntimeError):  # no usable stderr
        faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True, chain=False)


def _patch_batch() -> None:
    """The worker holds messages and applies them together when no more came for a moment
    (``app.applying.fastpath.Batch``): a path's message arrives (armed), waits in the batch while
    the worker asks for more (those BRPOPs are outside the path), and is applied when the batch is
    flushed by the event loop's timer. The path then ends at the start of the loop's next round of
    timers, after the callbacks the flush left for that round (the acknowledgements Celery sends
    with ``hub.call_soon``) have run."""
    from kombu.asynchronous.hub import Hub

    from app.applying import fastpath
    from app.plumbing import transport

    original_add, original_flush, original_fire = fastpath.Batch.add, fastpath.Batch.flush, Hub.fire_timers
    original_read = transport.HoldingChannel._brpop_read

    def brpop_read(self: Any, **options: Any) -> Any:
        # Between the flush and the path's end, the loop may read the reply of the BRPOP sent
        # while the batch held the path's message: another message (the path's retry), whose
        # taking is not the path's (the path has no more BRPOPs of its own to wait for).
        state = STATE
        if state is not None and state.armed and state.flushed and state.thread == threading.get_ident():
            with state.outside_path():
                return original_read(self, **options)
        return original_read(self, **options)

    def add(self: Any, held: Any) -> None:
        state = STATE
        if state is not None:
            state.holding = True
        return original_add(self, held)

    def flush(self: Any) -> None:
        state = STATE
        if state is not None:
            state.holding = False
        try:
            return original_flush(self)
        finally:
            if state is not None and state.armed:
                state.flushed = True

    def fire_timers(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = STATE
        if state is not None and state.armed and state.flushed and state.thread == threading.get_ident():
            state.end("batch applied")
        return original_fire(self, *args, **kwargs)

    fastpath.Batch.add, fastpath.Batch.flush, Hub.fire_timers = add, flush, fire_timers
    transport.HoldingChannel._brpop_read = brpop_read


def _install() -> None:
    raw = os.environ.get(PLAN_ENV)
    if not raw:
        return
    config = json.loads(raw)
    try:
        _patch(config)
    except BaseException as exc:  # a process the interceptor missed must not pass for a tested one
        import traceback

        with open(os.path.join(config.get("dir", "."), "interceptor-errors.log"), "a") as log:
            log.write(f"pid {os.getpid()} role {config.get('role')}: {exc!r}\n{traceback.format_exc()}\n")
        raise


def _patch(config: dict[str, Any]) -> None:
    global STATE
    STATE = _State(config)
    _dump_stacks_on_signal()
    _patch_redis()
    _patch_sqlalchemy()
    _patch_amqp()
    if STATE.role == "worker":
        _patch_batch()
    if STATE.role == "web":
        _patch_flask()
        _note_web_sends()
    if STATE.role == "cli":
        import atexit

        STATE.arm(config["plan"], config.get("marker", "cli"))
        atexit.register(STATE.end, "process exit")


_install()
