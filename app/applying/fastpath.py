"""What a worker does with each apply message as it arrives, before Celery builds a task request.

The apply task's strategy (``Task.Strategy``) holds the messages a worker process takes from the
project's Redis transport and applies them together (``Batch``):

- one round trip claims every event of the batch (``dedup.claim_many``); the claim's script
  recognises a copy of an event already applied and acknowledges its message in the same round
  trip, so a duplicate costs that share of a round trip, one log line and a counter;
- the claimed events are applied in one transaction (``app.applying.batch``);
- one MULTI/EXEC marks them done, drops them from the pending set and acknowledges their messages
  (``dedup.finish_many``), after the commit: a batch that fails leaves every message of it
  unacknowledged, in the broker.

A batch ends when it holds ``WORKER_BATCH_SIZE`` messages (the worker's prefetch: the broker then
sends no more until they are acknowledged) or when no message arrived for ``BATCH_IDLE_SECONDS``.

Everything a batch does not decide goes, message by message, to Celery's own strategy and the
task, as before: a claim another task holds or a copy that arrived before the applied one; an event
whose stored copy the batch found, or that shares its fingerprint with another of the batch; every
event of a batch whose transaction failed (the task then applies it alone, and retries or
dead-letters it as it always did). The task finds the claim the batch took recorded and does not
claim again (``take_claim``). A Redis error before the batch's transaction hands every message to
the task the same way, unclaimed.

Not held (Celery's path, as before): messages with an ETA (retries wait for their countdown and
claim when they run), brokers other than the project's Redis transport, a message of an unexpected
shape. With ``WORKER_BATCH_SIZE=1`` each message is a batch of its own, applied as it arrives.

A worker sending task events (Flower watching, or ``-E``) sends, for each message a batch decides,
the events Celery sends for a task that succeeds (``task-received``, ``task-started``,
``task-succeeded``, with the fields Celery's strategy and request give them), when the batch
decided it: whoever watches sees every task, and the batches stay on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from app.applying.batch import apply_batch
from app.applying.domain import DUPLICATE
from app.applying.hooks import relay_after_commit
from app.base import metrics
from app.base.extensions import db
from app.base.logs import lines_held, mask_phone
from app.base.timeutil import parse_rfc3339, utcnow
from app.payload.envelope import Envelope
from app.plumbing import dedup, transport

log = structlog.get_logger("app.applying.tasks")

_CLAIMED: dict[str, None] = {}  # task ids whose claim this process took in the strategy
_CLAIMED_LIMIT = 1000  # a task that never ran (revoked) must not grow it forever
# A batch is applied once no message arrived for this long: under a backlog messages arrive a
# fraction of a millisecond apart and a batch fills; a lone event waits this long at most.
BATCH_IDLE_SECONDS = 0.005


def take_claim(task_id: str) -> bool:
    """True once if the strategy took this task's claim in this process (the task need not)."""
    try:
        del _CLAIMED[task_id]
    except KeyError:
        return False
    return True


def _hold_claim(task_id: str) -> None:
    if len(_CLAIMED) >= _CLAIMED_LIMIT:
        _CLAIMED.clear()
    _CLAIMED[task_id] = None


@dataclass
class Held:
    """One message the strategy holds: what Celery's strategy needs to take it over, and the
    event it carries."""

    task_id: str
    call: tuple[Any, ...]  # message, body, ack, reject, callbacks
    extra: dict[str, Any]
    message: dict[str, Any]
    envelope: Envelope
    received_at: datetime


def in_batches(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The strategy: Celery's own, behind the batch (imported here: a worker's module)."""
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **kwargs)
    eventer = consumer.event_dispatcher
    flask_app = app.flask_app
    connection_errors = consumer.connection_errors
    ack_log = logging.getLogger("celery.worker.request")
    settings = flask_app.extensions["settings"]
    size = settings.worker_batch_size
    redis_broker = settings.broker_is_redis  # the pending set, and the project's transport

    def task_events() -> Any:
        # The dispatcher is on for the worker's heartbeats alone (groups == {"worker"}); task
        # events are on when it sends every group, or "task" was added (Flower's enable_events).
        on = eventer and eventer.enabled and (not eventer.groups or "task" in eventer.groups)
        return eventer.send if on else None

    def acknowledge(held: Held) -> None:
        held.call[2](ack_log, connection_errors)  # what a request's acknowledge() passes

    def to_celery(held: Held) -> None:
        handle(*held.call, **held.extra)

    # The event loop's timer (the hub fires it between polls); a worker without an event loop
    # (not the Redis transport) never holds a message anyway.
    hub = getattr(consumer, "hub", None)
    batch = Batch(flask_app, hub.timer if hub is not None else None, size, acknowledge, to_celery, task_events)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        held = None
        if redis_broker:
            held = _holdable(message, (message, body, ack, reject, callbacks), kw)
        if held is None:
            return handle(message, body, ack, reject, callbacks, **kw)
        batch.add(held)
        return None

    return task_message_handler


def _holdable(message: Any, call: tuple[Any, ...], extra: dict[str, Any]) -> Held | None:
    headers = message.headers or {}
    task_id = headers.get("id")
    if not task_id or headers.get("eta") or transport.current_delivery(task_id) is None:
        return None
    try:
        args = message.payload[0]
        envelope = Envelope(args[0], args[1], args[2] if len(args) > 2 else None)
        envelope.event  # noqa: B018 - validated here: a message that does not parse goes to the task
        return Held(task_id, call, extra, args[0], envelope, parse_rfc3339(envelope.received_at))
    except Exception:  # a message of an unexpected shape: the task decides, as before
        return None


class Batch:
    """The messages a worker process holds, applied together (see the module's docstring)."""

    def __init__(self, flask_app: Any, timer: Any, size: int, acknowledge: Any, to_celery: Any,
                 task_events: Any = lambda: None) -> None:
        self.flask_app = flask_app
        self.timer = timer
        self.size = size
        self.acknowledge = acknowledge
        self.to_celery = to_celery
        self.task_events = task_events  # () -> the event dispatcher's send while task events are on, else None
        self.send_event: Any = None
        self.started = 0.0
        self.held: list[Held] = []
        self.entry: Any = None
        self.log: Any = log

    def add(self, held: Held) -> None:
        self.held.append(held)
        if len(self.held) >= self.size or self.timer is None:
            self.flush()
            return
        if self.entry is not None:
            self.entry.cancel()
        self.entry = self.timer.call_after(BATCH_IDLE_SECONDS, self.flush)

    def flush(self) -> None:
        if self.entry is not None:
            self.entry.cancel()
            self.entry = None
        held, self.held = self.held, []
        # A message whose connection closed since it arrived was put back in its queue by kombu
        # (its delivery forgotten): it comes again.
        held = [h for h in held if transport.current_delivery(h.task_id) is not None]
        if not held:
            return
        self.send_event, self.started = self.task_events(), time.monotonic()
        # The logger as logging is configured now, bound once for the batch's lines (the module's
        # is a proxy that binds on every call).
        self.log = log.bind()
        with self.flask_app.app_context():
            alone = self._apply(held)
        for one in alone:
            try:
                self.to_celery(one)
            except Exception:  # what Celery's own handler raised: the next message must still be handed over
                log.exception("batch_handover_failed", task_id=one.task_id)

    def _apply(self, held: list[Held]) -> list[Held]:
        """Claim, apply and acknowledge what can be; returns what goes to the task, one by one."""
        try:
            states = dedup.claim_many([(h.envelope.key, h.task_id, h.received_at) for h in held])
        except Exception as exc:  # Redis: the task claims for itself, and retries as it always did
            log.warning("batch_claims_failed", events=len(held), error_type=type(exc).__name__)
            return held
        claimed, alone, duplicates = [], [], 0
        # The batch's lines in one write, as the loop ends: it waits on nothing but the task
        # events' sends while they are on, so nothing holds the lines back for long.
        with lines_held():
            for one, state in zip(held, states, strict=True):
                if state == DUPLICATE:
                    self.acknowledge(one)  # the claim's script acknowledged it: no round trip
                    duplicates += 1
                    self._log(one, DUPLICATE, turned_away="on arrival")
                    self._watched(one, DUPLICATE)
                elif state == "claimed":
                    claimed.append(one)
                else:
                    alone.append(one)
        if duplicates:
            metrics.observe_event(DUPLICATE, count=duplicates)
        if not claimed:
            return alone
        try:
            outcomes = apply_batch(db.session, [(h.envelope.event, h.received_at) for h in claimed])
        except Exception as exc:  # nothing committed: each event to the task, which holds its claim
            log.warning("batch_failed", events=len(claimed), error_type=type(exc).__name__)
            outcomes = [None] * len(claimed)
        applied = [(h, outcome) for h, outcome in zip(claimed, outcomes, strict=True) if outcome is not None]
        for one, outcome in zip(claimed, outcomes, strict=True):
            if outcome is None:
                _hold_claim(one.task_id)
                alone.append(one)
        if applied:
            relay_after_commit(db.session, {h.envelope.event.session_id for h, _ in applied})
            self._finish(applied)
        return alone

    def _finish(self, applied: list[tuple[Held, str]]) -> None:
        try:
            dedup.finish_many([(h.envelope.key, h.received_at, h.task_id) for h, _ in applied])
        except Exception as exc:
            # Committed. Each message's own acknowledgement carries its done mark, as a task's
            # does; one that fails too is logged by kombu, and its message comes again and meets
            # the stored fingerprint.
            log.warning("batch_finish_failed", events=len(applied), error_type=type(exc).__name__)
            for one, _ in applied:
                # Where it does not ride on the ack (its delivery forgotten) and fails again, the
                # sweeper sends the event again once its claim expired: it meets the stored fingerprint.
                with contextlib.suppress(Exception):
                    dedup.finish(one.envelope.key, one.received_at, one.task_id)
        now = utcnow()
        with lines_held():
            for one, outcome in applied:
                self.acknowledge(one)  # no round trip where finish_many acknowledged it
                metrics.observe_event(outcome, (now - one.received_at).total_seconds())
                self._log(one, outcome, batch=len(applied))
                self._watched(one, outcome)

    def _watched(self, one: Held, outcome: str) -> None:
        """The task events Celery sends for a task that succeeds, while task events are on: the
        fields of Celery's strategy's task-received, its request's task-started, and its trace's
        task-succeeded (the result as its repr, the runtime since the batch began)."""
        send = self.send_event
        if send is None:
            return
        headers = one.call[0].headers or {}
        send("task-received", uuid=one.task_id, name=headers.get("task"), args=headers.get("argsrepr"),
             kwargs=headers.get("kwargsrepr"), root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
             retries=headers.get("retries", 0), eta=None, expires=headers.get("expires"))
        send("task-started", uuid=one.task_id)
        send("task-succeeded", uuid=one.task_id, result=repr(outcome), runtime=time.monotonic() - self.started)

    def _log(self, one: Held, outcome: str, **extra: Any) -> None:
        message = one.message
        self.log.info("event_applied", outcome=outcome, phone_number=mask_phone(message.get("phone_number")),
                 status=message.get("status"), request_id=one.envelope.request_id, task_id=one.task_id,
                 session_id=message.get("session_id"), event_key=one.envelope.key, **extra)
